"""Shared mechanics of the name -> factory registries (datasets, backbones, methods, balancers)."""

from __future__ import annotations

import importlib
from typing import Iterable


def import_modules(package: str, names: Iterable[str]) -> None:
    """Import ``package.name`` for each name, so that the modules register their factories."""
    for name in names:
        importlib.import_module(f"{package}.{name}")
