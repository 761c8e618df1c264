"""Option values checked against a factory's type annotations, before the factory runs.

Datasets, backbones and balancers take keyword options straight from a config. Their annotations
(``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``Sequence[int]``, ``X | None``, ...)
already say what each option must be; :func:`check_factory_options` reads them and refuses an
unknown option or a value of the wrong type (a float epoch count, a string learning rate, NaN or
infinity where a number is expected, a bool where a number is expected) with one line naming the
key. :func:`check_value` does the same for one value, with optional bounds and choices.

Annotations this module does not understand accept any value (the factory's own checks still run).
"""

from __future__ import annotations

import collections.abc as abc
import inspect
import math
import numbers
import os
import types
import typing
from typing import Any, Callable, Literal, Mapping, Sequence, Union

__all__ = ["matches", "describe", "check_value", "short_repr", "accepted_options", "check_factory_options"]

_SEQUENCES = (list, tuple, abc.Sequence, abc.Iterable, abc.Collection, abc.MutableSequence)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) is Union or isinstance(hint, types.UnionType)


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as parsed from YAML) fits the annotation ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if _is_union(hint):
        return any(matches(value, a) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if hint is str:  # paths given through the Python API as pathlib objects are fine
        return isinstance(value, (str, os.PathLike))
    if origin in _SEQUENCES or hint in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        return not args or all(matches(v, args[0]) for v in value)
    if origin in _MAPPINGS or hint in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if origin is abc.Callable or hint is abc.Callable:
        return callable(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:
    """What ``hint`` accepts, in words (``"an integer or null"``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        parts = [describe(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " or ".join(dict.fromkeys(parts))
    if origin is Literal:
        return f"one of {list(args)}"
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             type(None): "null"}
    if hint in words:
        return words[hint]
    if origin in _SEQUENCES or hint in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} items ({', '.join(describe(a) for a in args)})"
        return f"a list (each item {describe(args[0])})" if args else "a list"
    if origin in _MAPPINGS or hint in _MAPPINGS:
        return "a mapping"
    if isinstance(hint, type):
        return f"a {hint.__name__}"
    return str(hint)


def check_value(key: str, value: Any, hint: Any, *, choices: Sequence[Any] | None = None,
                low: float | None = None, high: float | None = None, low_open: bool = False,
                high_open: bool = False, or_null: bool = False) -> None:
    """Raise ``ValueError("<key> must be <what>, got <value>")`` unless ``value`` fits ``hint``, is one
    of ``choices`` (when given) and lies within the bounds (``(low`` / ``high)`` when open); with
    ``or_null``, ``None`` is accepted too (and the message says so after the bounds)."""
    if or_null and value is None:
        return
    ok = matches(value, hint)
    expected = describe(hint)
    if choices is not None:
        ok = ok and value in choices
        expected = f"one of {list(choices)}"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{key} must be {expected}{' ' + ' and '.join(bounds) if bounds else ''}"
                         f"{' or null' if or_null else ''}, got {short_repr(value)}")


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved is simply not checked
        return {}


def accepted_options(factory: Callable[..., Any]) -> dict[str, Any] | None:
    """Option name -> annotation of everything ``factory`` accepts, or ``None`` when it takes any
    keyword (``**kw`` that no base class ``__init__`` resolves).

    A class whose ``__init__`` passes ``**kw`` on is followed up its method resolution order."""
    chain: list[Callable[..., Any]] = []
    if isinstance(factory, type):
        chain = [c.__dict__["__init__"] for c in factory.__mro__ if "__init__" in c.__dict__ and c is not object]
    else:
        chain = [factory]
    out: dict[str, Any] = {}
    if not chain:  # no __init__ of its own anywhere: takes no options
        return out
    for fn in chain:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return None
        hints = _hints(fn)
        for name, p in params.items():
            if name in ("self", "input_shape") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            hint = hints.get(name, Any)
            if p.default is None and hint is not Any:  # ``x: int = None`` also takes null
                hint = typing.Optional[hint]
            out.setdefault(name, hint)
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return out
    return None


def check_factory_options(factory: Callable[..., Any], options: Mapping[str, Any], owner: str,
                          prefix: str = "") -> None:
    """Refuse options ``factory`` does not accept, and values that do not fit its annotations.

    Unknown names: ``ValueError("<owner>: unknown option(s) <prefix>k; expected some of [...]")``;
    a bad value: ``ValueError("<owner>: <prefix>k must be <what>, got <value>")``.
    """
    accepted = accepted_options(factory)
    if accepted is None:
        return
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        expected = f"expected some of {[prefix + a for a in accepted]}" if accepted else "it takes none"
        raise ValueError(f"{owner}: unknown option(s) {', '.join(prefix + str(u) for u in unknown)}; {expected}")
    for name, value in options.items():
        try:
            check_value(prefix + name, value, accepted[name])
        except ValueError as exc:
            raise ValueError(f"{owner}: {exc}") from None
