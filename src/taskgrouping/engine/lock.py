"""The lock a run holds on its output directory, so that two commands never write one directory."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Any

__all__ = ["DirectoryLock", "LockHeld"]


class LockHeld(RuntimeError):
    """Another process holds the lock."""


class DirectoryLock:
    """An exclusive advisory lock (``flock``) on ``path`` (e.g. ``DIR/.lock``), held until :meth:`release`
    or the process ends. A no-op where ``fcntl`` does not exist (Windows)."""

    _held: set[str] = set()  # lock files this process holds

    @classmethod
    def held_here(cls, path: Path | str) -> bool:
        """Whether this process holds the lock on ``path``."""
        return os.path.abspath(path) in cls._held

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fh: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self, create: bool = True) -> None:
        """Take the lock without waiting; ``LockHeld`` if another process has it. With ``create=False``
        a missing lock file is not created (and nothing is locked)."""
        if self._fh is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        if not create and not self.path.exists():
            return
        fh = open(self.path, "ab")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise LockHeld(str(self.path)) from None
        except BaseException:
            fh.close()
            raise
        self._fh = fh
        self._held.add(os.path.abspath(self.path))

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the lock
            self._fh = None
            self._held.discard(os.path.abspath(self.path))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the file closes anyway
            self.release()

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
