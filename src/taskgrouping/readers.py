"""Checked reads of user files: a bad file is a ``FileNotFoundError`` or ``ValueError`` naming the file
and what was expected, never a traceback from deep inside a parser, a hang or an unbounded allocation.

* :func:`read_text` reads at most ``max_bytes`` of UTF-8 text (directories, binary files and
  unreadable files are refused);
* :func:`read_json` adds strict JSON (no repeated keys) with a nesting bound;
* :func:`tensor_layout` and :func:`load_tensors` read safetensors files, checking a truncated or
  foreign file and the names, dtypes and shapes a model expects *before* any tensor is allocated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["MAX_TEXT_BYTES", "MAX_JSON_DEPTH", "MAX_INT_DIGITS", "read_text", "read_json", "expected_layout",
           "tensor_layout", "load_tensors"]

#: Largest text file read (64 MiB): loss tables, affinity tables, gain tables and model descriptions
#: are far smaller.
MAX_TEXT_BYTES = 64 * 2**20
#: Deepest JSON nesting accepted (lists and objects).
MAX_JSON_DEPTH = 64
#: Longest integer literal accepted in JSON.
MAX_INT_DIGITS = 100

#: safetensors dtype codes of the torch dtypes.
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}

Layout = dict[str, tuple[str, tuple[int, ...]]]


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


def read_text(path: str | Path, expected: str, max_bytes: int | None = None) -> str:
    """The UTF-8 text of ``path`` (at most ``max_bytes``, default :data:`MAX_TEXT_BYTES`); ``expected``
    (e.g. ``"a CSV loss table"``) ends every error message."""
    path = Path(path)
    max_bytes = MAX_TEXT_BYTES if max_bytes is None else max_bytes
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected {expected}")
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; expected {expected}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc}); expected {expected}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than {_size(max_bytes)}; expected {expected} of at most that size")
    if b"\0" in data:
        raise ValueError(f"{path}: holds NUL bytes (a binary file?); expected {expected} as UTF-8 text")
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark (Excel's "CSV UTF-8") is dropped
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); "
                         f"expected {expected}") from None


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def _int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits ({text[:12]}...); at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _depth(obj: Any) -> int:
    """Nesting depth of lists and objects (iterative: safe on any parsed document)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in node if isinstance(v, (list, dict)))
    return deepest


def read_json(path: str | Path, expected: str, max_bytes: int | None = None,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse the JSON file ``path``: at most ``max_bytes``, lists/objects nested at most ``max_depth``
    deep, no key repeated within an object."""
    text = read_text(path, expected, max_bytes)
    try:
        obj = json.loads(text, object_pairs_hook=_no_repeats, parse_int=_int)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); expected {expected}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested more than {max_depth} levels deep; expected {expected}") from None
    except ValueError as exc:  # a repeated key or an overlong integer
        raise ValueError(f"{path}: {exc}; expected {expected}") from None
    if _depth(obj) > max_depth:
        raise ValueError(f"{path}: JSON nested more than {max_depth} levels deep; expected {expected}")
    return obj


def expected_layout(tensors: Mapping[str, Tensor]) -> Layout:
    """``{name: (safetensors dtype, shape)}`` of a state dict (meta tensors are fine)."""
    return {k: (_ST_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in tensors.items()}


def tensor_layout(path: str | Path, expected: str = "a safetensors file") -> Layout:
    """Names, dtypes and shapes stored in a safetensors file, read from its header only; a truncated,
    padded or foreign file is a ``ValueError`` naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected {expected}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {expected}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape())) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc, expected) from None


def _unreadable(path: Path, exc: BaseException, expected: str) -> ValueError:
    reason = " ".join(str(exc).split())
    return ValueError(f"{path}: not a readable safetensors file ({reason}); expected {expected}")


def _describe(entries: list[str]) -> str:
    return ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


def load_tensors(path: str | Path, layout: Layout, fits: str = "the model") -> dict[str, Tensor]:
    """Load a safetensors file after checking that it holds exactly ``layout`` (names, dtypes, shapes);
    ``fits`` names what the layout comes from (e.g. ``"the architecture in m.json"``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    expected = f"the weights of {fits}"
    found = tensor_layout(path, expected)
    missing = sorted(set(layout) - set(found))
    extra = sorted(set(found) - set(layout))
    wrong = [f"{k} ({found[k][0]} {list(found[k][1])}, expected {layout[k][0]} {list(layout[k][1])})"
             for k in layout if k in found and found[k] != layout[k]]
    problems = [f"{what} {_describe(names)}" for what, names in (("missing", missing), ("unexpected", extra),
                                                                ("mismatched", wrong)) if names]
    if problems:
        raise ValueError(f"{path}: tensors do not fit {fits}: {'; '.join(problems)}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc, expected) from None
