"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file the package writes goes through here: write a temporary sibling, flush and fsync it,
then ``os.replace`` it over the target (atomic on POSIX and Windows within one file system). Also
strict JSON (NaN / inf written as ``null``), content digests of the files a run reads, and the
advisory lock that keeps two commands out of one run directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import errno
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save as save_tensor_bytes

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "save_state_dict", "tensor_bytes",
           "json_default", "finite_json", "strict_json", "append_text", "named_os_error", "file_sha256",
           "tree_digest", "fsync_dir"]


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk or an interrupt leaves no half-written temporary behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise named_os_error(exc, path)


def named_os_error(exc: BaseException, path: Path | str) -> BaseException:
    """``exc``, naming ``path`` if it is an OS error that names no file (e.g. a full disk on write)."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        named = OSError(exc.errno, exc.strerror, str(path))
        named.__cause__ = exc
        return named
    return exc


def append_text(path: Path | str, text: str) -> None:
    """Append ``text`` to ``path`` in one write (a log line is written whole or, on error, reported)."""
    try:
        with open(path, "a") as fh:
            fh.write(text)
    except OSError as exc:
        raise named_os_error(exc, path) from None


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def json_default(obj: Any) -> Any:
    """JSON fallback for tensors, sets and tuples (lists), numpy scalars and other numbers (floats)."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "__float__"):
        return float(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN / inf float replaced by ``None`` (in nested dicts, lists and tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: int | None = None) -> str:
    """``obj`` as standard JSON: NaN and inf become ``null`` (``NaN`` is not JSON)."""
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False,
                      default=lambda o: finite_json(json_default(o)))


def atomic_write_json(path: Path | str, obj: Any, indent: int | None = 1, strict: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` atomically; ``strict``: NaN / inf as ``null`` (for results
    meant for other programs; state read back by the package keeps them so that it round-trips)."""
    text = strict_json(obj, indent) if strict else json.dumps(obj, indent=indent, default=json_default)
    atomic_write_text(path, text)


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Tensors (e.g. a ``state_dict``) as the bytes of a safetensors file (detached, on the CPU, each
    with storage of its own, as safetensors requires)."""
    return save_tensor_bytes({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})


def save_state_dict(path: Path | str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write tensors (e.g. a ``state_dict``) as a safetensors file, atomically and fsynced."""
    atomic_write_bytes(path, tensor_bytes(tensors))


def file_sha256(path: Path | str, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's content (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digest(root: Path | str) -> dict[str, Any]:
    """A cheap digest of a directory: SHA-256 of every file's relative path, size and modification time
    (hidden entries, e.g. caches written next to the data, are skipped), and the number of files."""
    h = hashlib.sha256()
    n = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            full = os.path.join(folder, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            n += 1
    return {"files": n, "listing_sha256": h.hexdigest()}


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (new files, renames) durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot sync directories; other errors are real
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
