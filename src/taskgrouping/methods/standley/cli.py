"""Back end of ``taskgrouping select``: Standley et al.'s selection curve from loss files
(:func:`select_cli`), with budgets given as a range or a list (:func:`parse_budgets`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from taskgrouping.methods.standley.curve import Approx, selection_curve
from taskgrouping.methods.standley.io import read_networks

__all__ = ["MAX_BUDGETS", "parse_budgets", "select_cli"]

#: Most budgets one selection curve may have (each budget is one full network selection).
MAX_BUDGETS = 10_000


def parse_budgets(spec: str) -> list[float]:
    """Budgets from ``"start:stop:step"`` (stop inclusive), ``"start:stop"`` (step 1), ``"a,b,c"`` or ``"a"``;
    at most :data:`MAX_BUDGETS` of them."""
    text = spec.strip()
    shown = spec if len(spec) <= 40 else spec[:37] + "..."
    too_many = (f"budget spec {shown!r}: gives more than {MAX_BUDGETS:,} budgets; at most {MAX_BUDGETS:,} are "
                "allowed (use a larger step or a shorter range)")

    def num(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"budget spec {spec!r}: {s!r} is not a number") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"budget spec {spec!r}: budgets must be finite and >= 0, got {s!r}")
        return v

    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"budget spec {spec!r}: expected start:stop[:step]")
        start, stop = num(parts[0]), num(parts[1])
        step = num(parts[2]) if len(parts) == 3 else 1.0
        if step <= 0:
            raise ValueError(f"budget spec {spec!r}: step must be > 0")
        if stop < start:
            raise ValueError(f"budget spec {spec!r}: stop {stop:g} is below start {start:g}")
        span = (stop - start) / step
        if not span < MAX_BUDGETS or math.floor(span + 1e-9) >= MAX_BUDGETS:
            raise ValueError(too_many)
        count = math.floor(span + 1e-9)
        return [round(start + i * step, 12) for i in range(count + 1)]
    if not text:
        raise ValueError("budget spec is empty; expected e.g. '1:5:0.5'")
    if text.count(",") >= MAX_BUDGETS:
        raise ValueError(too_many)
    return [num(s) for s in text.split(",")]


def select_cli(losses: str, budgets: str | Sequence[float], *, report: str | None = None,
               approx: Approx = "optimal", early: str | None = None, solver: str = "auto",
               tasks: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Backend of ``taskgrouping select``: read loss files, run :func:`selection_curve`.

    Files are read with :func:`~taskgrouping.methods.standley.io.read_networks` (``.csv`` = plain CSV,
    anything else = Standley's tab-separated results format, whose columns get ``tasks`` as names).
    Returns the JSON document ``{"<budget>": {"networks": [...], "total": <sum of report losses>}}``.
    """
    val = read_networks(losses, tasks=tasks)
    rep = read_networks(report, tasks=tasks) if report is not None else None
    ear = read_networks(early, tasks=tasks) if early is not None else None
    for name, table in (("report", rep), ("early", ear)):
        if table is not None and set(table.tasks) != set(val.tasks):
            unknown = sorted(set(table.tasks) ^ set(val.tasks))
            raise ValueError(f"{name} losses name tasks {list(table.tasks)} but the selection losses name "
                             f"{list(val.tasks)} (differ in {unknown})")
    values = parse_budgets(budgets) if isinstance(budgets, str) else [float(b) for b in budgets]
    if len(values) > MAX_BUDGETS:
        raise ValueError(f"{len(values):,} budgets given; at most {MAX_BUDGETS:,} are allowed")
    curve = selection_curve(val.networks, rep.networks if rep else None, values, approx=approx,
                            early=ear.networks if ear else None, solver=solver, tasks=val.tasks)
    return {f"{b:g}": v for b, v in curve.items()}
