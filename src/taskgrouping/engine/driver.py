"""What every command that trains does around its trainings (``run``, the balancer study, the
InterroGate sweep): set the threads, check the output directory before anything is written, lock
it, write the resolved config and the data's fingerprint, log epoch records as JSON lines, build
method contexts, and record provenance (versions, git revision, times) with the results.

The output directory. :meth:`Driver.check_out_dir` does every check (a file, not writable, not
empty, locked by another run, ``--resume`` with another config or other data) before anything is
written; :meth:`Driver.open` then creates it and takes ``DIR/.lock`` (``flock``) for the rest of the
command. :func:`discard_on_error` removes what a failed command created when nothing was trained.

Under ``torchrun`` (:mod:`taskgrouping.engine.distributed`) every rank runs the same command: every
rank makes the checks (rank 0 alone takes the lock), then rank 0 alone writes into the output
directory, while the other ranks write what the command writes into a private temporary directory
(:attr:`Driver.out`) that :meth:`Driver.close` removes. A resumed run gives them rank 0's finished
methods (``partial/``, ``models/``); checkpoints reach them from rank 0 through the trainer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from taskgrouping import __version__
from taskgrouping.config import ConfigError, check_config_against_data, dump
from taskgrouping.data.base import TaskData
from taskgrouping.data.checks import validate_data
from taskgrouping.data.registry import load_dataset
from taskgrouping.engine.distributed import check_batches, check_config as check_distributed, env_rank
from taskgrouping.engine.distributed import env_world_size, setup
from taskgrouping.engine.trainer import TrainConfig, TrainingDiverged
from taskgrouping.engine.lock import DirectoryLock, LockHeld
from taskgrouping.io import (append_text, atomic_write_json, atomic_write_text, file_sha256,
                             strict_json, tree_digest)


__all__ = ["Driver", "prepare_data", "versions", "git_revision", "data_fingerprint", "fingerprint_change",
           "discard_on_error", "LOCK_NAME", "FINGERPRINT_NAME"]

#: built-in generators whose draw follows the run seed unless ``data.seed`` is given
SEEDED_DATA = ("planted", "multimnist", "digits")
LOCK_NAME = ".lock"
FINGERPRINT_NAME = "data_fingerprint.json"
#: files the driver writes before any training; a directory holding only these has nothing to resume
SKELETON = ("config.yaml", LOCK_NAME, FINGERPRINT_NAME)
#: ``data.*`` keys that name caches, not data
NOT_DATA = ("cache_dir",)


def versions() -> dict[str, str]:
    import numpy
    import scipy

    return {"taskgrouping": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "platform": platform.platform()}


def git_revision() -> str:
    """HEAD of the checkout the package is imported from (``+dirty`` if modified), else ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare_data(config: Mapping[str, Any]) -> TaskData:
    """Load the configured dataset and check its content, and K, the model and the balancer against it
    (and, under ``torchrun``, that every batch gives every rank a sample)."""
    options = {k: v for k, v in config["data"].items() if k != "name"}
    if "seed" not in options and config["data"]["name"] in SEEDED_DATA:
        options["seed"] = config["seed"]
    data = load_dataset(config["data"]["name"], **options)
    validate_data(data)  # finite inputs, labels of every task in every split, sizes
    check_config_against_data(dict(config), data)  # K, the model and the balancer on this data
    try:
        check_batches(data, TrainConfig(**config["train"]).batch_size, env_world_size())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return data


def _logged_epochs(path: Path, fields: Mapping[str, Any]) -> set[tuple[Any, Any]]:
    """(network, epoch) of the epoch records in the JSON-lines file ``path`` that carry ``fields``."""
    seen: set[tuple[Any, Any]] = set()
    if not path.is_file():
        return seen
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(rec, dict) and "epoch" in rec and all(rec.get(k) == v for k, v in fields.items()):
            seen.add((rec.get("network"), rec["epoch"]))
    return seen


# -- the data's fingerprint --------------------------------------------------------------------------

def _names_data(key: str, value: Any) -> bool:
    """Whether ``data.<key>: value`` names files the data is read from."""
    if key in NOT_DATA or not isinstance(value, (str, os.PathLike)) or not str(value):
        return False
    if key in ("path", "root") or key.endswith("_path"):
        return True
    return Path(value).expanduser().is_file()  # e.g. taskonomy's *_buildings given as a list file


def data_fingerprint(config: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a run's data: the ``data`` section and the seed that draws a built-in
    generator's data, the SHA-256 of every file it names and a digest of every directory (relative
    paths, sizes and modification times of the files under it)."""
    section = dict(config["data"])
    seeded = section.get("name") in SEEDED_DATA and "seed" not in section
    files: dict[str, dict[str, Any]] = {}
    for key, value in sorted(section.items()):
        if not _names_data(key, value):
            continue
        path = Path(value).expanduser().absolute()
        if path.is_file():
            files[f"data.{key}"] = {"path": str(path), "size": path.stat().st_size, "sha256": file_sha256(path)}
        elif path.is_dir():
            files[f"data.{key}"] = {"path": str(path), "directory": tree_digest(path)}
        else:
            files[f"data.{key}"] = {"path": str(path), "missing": True}
    return {"data": section, "seed": config.get("seed") if seeded else None, "files": files}


def fingerprint_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The first difference between two fingerprints, in words (``None`` when they match)."""
    for key in sorted(set(old.get("data", {})) | set(new.get("data", {}))):
        a, b = old.get("data", {}).get(key), new.get("data", {}).get(key)
        if a != b:
            return f"data.{key} was {a!r}, now {b!r}"
    if old.get("seed") != new.get("seed"):
        return f"seed (which draws the data) was {old.get('seed')!r}, now {new.get('seed')!r}"
    for key in sorted(set(old.get("files", {})) | set(new.get("files", {}))):
        a, b = old.get("files", {}).get(key) or {}, new.get("files", {}).get(key) or {}
        if a == b:
            continue
        path = b.get("path") or a.get("path")
        if a.get("path") != b.get("path"):
            return f"{key} was {a.get('path')!r}, now {b.get('path')!r}"
        if b.get("missing"):
            return f"{key}: {path!r} no longer exists"
        if "directory" in a or "directory" in b:
            return f"{key}: the files under {path!r} changed (names, sizes or modification times)"
        return f"{key}: the file {path!r} changed (its SHA-256 differs from the one recorded)"
    return None


# -- the output directory ----------------------------------------------------------------------------

def _entries(path: Path) -> list[Path]:
    """What a directory holds besides a lock file (a file or a missing path holds nothing)."""
    return [p for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []


def _untouched(out: Path) -> bool:
    """Whether ``out`` holds only what the driver writes before training (and empty folders)."""
    for folder, _, files in os.walk(out):
        for name in files:
            if not (Path(folder) == out and (name in SKELETON or name.endswith(".tmp"))):
                return False
    return True


def _discard(out: Path, existed: bool, top: Path | None) -> None:
    """Remove what a failed command created in ``out`` when nothing was trained and no other run holds it."""
    if not out.is_dir() or not _untouched(out):
        return
    lock = DirectoryLock(out / LOCK_NAME)
    if not DirectoryLock.held_here(lock.path):
        try:
            lock.acquire(create=False)
        except (LockHeld, OSError):
            return  # another run holds the directory: it is theirs
    try:
        if existed:
            for p in out.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        else:
            shutil.rmtree(out)
            parent = out.parent
            while top is not None and parent != top.parent and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    except OSError:
        pass  # best effort: the command's own error is the one to report
    finally:
        lock.release()


@contextlib.contextmanager
def discard_on_error(out: Path | str | None) -> Iterator[None]:
    """On an error, remove what this command created in ``out`` if ``out`` did not exist or was empty
    before and nothing was trained (only the config, fingerprint and lock are there); parent folders
    it created go too. A diverged training keeps its directory (it can be resumed)."""
    if out is None or env_rank() != 0:  # under torchrun, only rank 0 writes into ``out``
        yield
        return
    out = Path(out)
    existed = out.exists()
    fresh = not existed or (out.is_dir() and not _entries(out))
    top = None
    if not existed:
        top = out
        while not top.parent.exists() and top.parent != top:
            top = top.parent
    try:
        yield
    except BaseException as exc:
        if fresh and not isinstance(exc, TrainingDiverged):
            _discard(out, existed, top)
        raise


def _check_creatable(out: Path) -> None:
    """``out`` does not exist: its nearest existing ancestor must be a writable directory."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create output directory {str(out)!r}: {str(parent)!r} is a file; "
                          "expected a directory path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create output directory {str(out)!r}: {str(parent)!r} is not writable; "
                          "choose another --out")


class Driver:
    """One command's output directory and the run-wide settings of a validated ``config``.

    Args:
        config: the resolved, validated config.
        out_dir: the output directory.
        resume: continue a directory written by the same config (only commands that can resume pass it).

    Use it as a context manager (or call :meth:`close`) to release the directory's lock.

    Attributes:
        run_dir: the output directory.
        out: where this process writes: ``run_dir`` (rank 0 under ``torchrun``), or a private temporary
            directory on the other ranks.
    """

    def __init__(self, config: Mapping[str, Any], out_dir: Path | str, resume: bool = False) -> None:
        self.config = dict(config)
        check_distributed(self.config)  # under torchrun: methods, balancer and settings that can run distributed
        self.ranks = setup(str((self.config.get("train") or {}).get("device", "auto")))
        self.run_dir = Path(out_dir)
        self.out = self.run_dir if self.ranks.is_main else Path(tempfile.mkdtemp(
            prefix=f"taskgrouping-rank{self.ranks.rank}-"))
        self.resume = resume
        self.train = TrainConfig(**self.config["train"])
        self.started = datetime.now(timezone.utc).isoformat()
        self.lock = DirectoryLock(self.run_dir / LOCK_NAME)
        self._fingerprint: dict[str, Any] | None = None
        self._was_empty = False  # check_out_dir found the directory absent or empty
        if self.config.get("threads"):
            torch.set_num_threads(int(self.config["threads"]))

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The data's fingerprint (:func:`data_fingerprint`), computed once."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.config)
        return self._fingerprint

    def _take_lock(self, create: bool) -> None:
        try:
            self.lock.acquire(create=create)
        except LockHeld:
            raise ConfigError(f"output directory {str(self.run_dir)!r} is in use: another run holds its lock "
                              f"({str(self.lock.path)!r}); wait for it to finish or choose another --out") from None

    def check_out_dir(self, can_resume: bool = False) -> None:
        """Every check of the output directory, before anything is written: a directory that is
        absent or empty (or, with ``--resume``, a run of the same config on the same data), writable,
        and not locked by another run. An existing lock file is taken here and kept."""
        out = self.run_dir
        self._was_empty = True
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output directory {str(out)!r} is a file; expected a directory (absent or empty)")
        if not out.exists():
            _check_creatable(out)
            return
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"output directory {str(out)!r} is not writable; choose another --out")
        if self.ranks.is_main:
            self._take_lock(create=False)
        if not _entries(out):
            return
        self._was_empty = False
        if not (can_resume and self.resume):
            hint = "pass --resume to continue it or choose another --out" if can_resume else "choose another --out"
            raise ConfigError(f"output directory {str(out)!r} is not empty; {hint}")
        old = out / "config.yaml"
        if old.is_file() and old.read_text() != dump(self.config):
            raise ConfigError(f"--resume: the config differs from {old}; resume with the same config")
        recorded = out / FINGERPRINT_NAME
        if recorded.is_file():
            try:
                before = json.loads(recorded.read_text())
            except ValueError as exc:
                raise ConfigError(f"--resume: {str(recorded)!r} is not valid JSON ({exc}); expected the data "
                                  "fingerprint the run wrote") from None
            change = fingerprint_change(before, self.fingerprint)
            if change:
                raise ConfigError(f"--resume: the data differs from the run in {str(out)!r}: {change}; resume on "
                                  "the data it started with or start a new --out")

    def open(self, write_config: bool = True) -> None:
        """Create the directory, take its lock, write ``config.yaml`` (unless ``write_config`` is false)
        and the data's fingerprint (kept as it is when resuming)."""
        self.ranks.barrier()  # every rank passed every check before rank 0 writes anything
        if not self.ranks.is_main:
            self._mirror_finished()
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._take_lock(create=True)
        if self._was_empty and _entries(self.out):  # another command filled it since the check
            raise ConfigError(f"output directory {str(self.out)!r} is not empty any more (another command wrote "
                              "to it meanwhile); choose another --out")
        if write_config:
            atomic_write_text(self.out / "config.yaml", dump(self.config))
        if not (self.out / FINGERPRINT_NAME).is_file():
            atomic_write_json(self.out / FINGERPRINT_NAME, self.fingerprint, strict=True)
        self._mirror_finished()

    def _mirror_finished(self) -> None:
        """Resuming under torchrun: rank 0's finished methods (``partial/``, ``models/``) reach the other
        ranks' directories, so that every rank skips the same methods."""
        if not (self.resume and self.ranks.active):
            return
        files: dict[str, bytes] = {}
        if self.ranks.is_main:
            for sub in ("partial", "models"):
                folder = self.run_dir / sub
                if folder.is_dir():
                    files.update({f"{sub}/{f.name}": f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()})
        files = self.ranks.broadcast_object(files)
        if not self.ranks.is_main:
            for name, data in files.items():
                (self.out / name).parent.mkdir(parents=True, exist_ok=True)
                (self.out / name).write_bytes(data)

    def close(self) -> None:
        """Release the directory's lock (and remove a non-zero rank's temporary directory)."""
        self.lock.release()
        if not self.ranks.is_main:
            shutil.rmtree(self.out, ignore_errors=True)

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if kind is None:  # under torchrun, no rank leaves before rank 0 has written everything
            self.ranks.barrier()
        self.close()

    @staticmethod
    def logger(path: Path, *, resume: bool = False, **fields: Any) -> Callable[[dict[str, Any]], None]:
        """A log function appending each record, plus ``fields``, as one strict-JSON line to ``path``.

        With ``resume``, an epoch record already in the file (same ``fields``, network and epoch) is
        not written again (a run killed after logging an epoch but before committing its checkpoint
        trains that epoch again on resume, to the same numbers), and a last line cut short by a kill
        is ended first."""
        logged = _logged_epochs(path, fields) if resume else set()
        if resume and path.is_file() and path.stat().st_size:
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a line cut short by a kill: later records start on their own line
                    append_text(path, "\n")

        def write(record: dict[str, Any]) -> None:
            if "epoch" in record:
                key = (record.get("network"), record["epoch"])
                if key in logged:
                    return
            append_text(path, strict_json(dict(record, **fields)) + "\n")
        return write

    def context(self, data: TaskData, name: str, *, seed: int | None = None,
                options: Mapping[str, Any] | None = None, balancer: Mapping[str, Any] | None = None,
                workdir: Path | None = None, log: Callable[[dict[str, Any]], None] | None = None,
                cache: dict[str, Any] | None = None, figures_dir: Path | None = None,
                diagnostics: bool = False) -> Any:
        """A :class:`~taskgrouping.methods.base.MethodContext` for method ``name`` on ``data``
        (the config's seed, K, model, balancer and training settings unless given)."""
        from taskgrouping.methods.base import MethodContext

        cfg = self.config
        return MethodContext(
            data=data, seed=cfg["seed"] if seed is None else seed, K=cfg["K"], train=self.train, model=cfg["model"],
            balancer=dict(cfg["balancer"] if balancer is None else balancer),
            options=dict(cfg.get(name) or {}) if options is None else dict(options), workdir=workdir,
            resume=self.resume, log=log or (lambda record: None), cache={} if cache is None else cache, name=name,
            diagnostics=dict(cfg.get("diagnostics") or {}) if diagnostics else {}, figures_dir=figures_dir,
            jobs_dir=self.jobs_dir, data_key=self.data_key)

    @property
    def jobs_dir(self) -> Path:
        """The job cache of the fanned-out trainings: ``jobs_dir`` from the config, else ``DIR/jobs``."""
        return Path(self.config["jobs_dir"]) if self.config.get("jobs_dir") else self.out / "jobs"

    @property
    def data_key(self) -> str:
        """A hash of the data's fingerprint: what the job cache keys the data on."""
        return hashlib.sha256(strict_json(self.fingerprint).encode()).hexdigest()

    def provenance(self) -> dict[str, Any]:
        """Times, versions and git revision recorded with every result."""
        return {"started": self.started, "finished": datetime.now(timezone.utc).isoformat(), "versions": versions(),
                "git_revision": git_revision(), "out_dir": str(self.run_dir), "ranks": self.ranks.world}
