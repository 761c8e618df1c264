"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file the package writes goes through here: write a temporary sibling, flush and fsync it,
then ``os.replace`` it over the target (atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save as save_tensor_bytes

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "save_state_dict", "json_default"]


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def json_default(obj: Any) -> Any:
    """JSON fallback for tensors, sets and tuples (lists) and numpy scalars (floats)."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def atomic_write_json(path: Path | str, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default))


def save_state_dict(path: Path | str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write tensors (e.g. a ``state_dict``) as a safetensors file, atomically and fsynced."""
    atomic_write_bytes(path, save_tensor_bytes({k: v.detach().cpu().contiguous().clone()
                                                for k, v in tensors.items()}))
