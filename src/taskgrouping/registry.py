"""Shared mechanics of the name -> factory registries (datasets, backbones, methods, balancers)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterable


def import_modules(package: str, names: Iterable[str]) -> None:
    """Import ``package.name`` for each name, so that the modules register their factories."""
    for name in names:
        importlib.import_module(f"{package}.{name}")


def check_options(factory: Callable[..., Any], options: dict[str, Any], owner: str, prefix: str = "") -> None:
    """Raise ``ValueError`` naming ``owner`` if ``options`` has keys ``factory`` does not accept.

    ``prefix`` is prepended to the key names in the message (e.g. ``"data."`` for config keys).
    """
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("self", "input_shape")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{owner}: unknown option(s) {', '.join(prefix + u for u in unknown)}; "
                         f"expected some of {[prefix + a for a in accepted]}")
