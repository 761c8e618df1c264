"""Shared pieces of the MTG-Net tests: the authors' measured gain tables (grouping-data/mtg_net/collected_gain),
loaded once, a small fast learner setting, and an outside brute-force reference for the best partition."""

from __future__ import annotations

import functools

import numpy as np
from conftest import GROUPING_DATA

from taskgrouping.methods.mtg_net import GainTable, load_mtgnet_gains

ROOT = GROUPING_DATA / "mtg_net" / "collected_gain"
# the small, paper-rule setting the MIMIC-27 and invariant tests run in (fast on one CPU thread)
FAST = dict(dim=16, layers=1, epochs=15, warm_start=True, ensemble=1, weight_decay=5e-4, acquisition="active")


@functools.cache
def load_table(name: str) -> GainTable:
    """A measured table, loaded once: ``"taskonomy"`` (Taskonomy-5) or ``"ett"`` (ETTm1-7 validation gains)."""
    if name == "taskonomy":
        return load_mtgnet_gains(ROOT, "taskonomy")
    if name == "ett":
        return load_mtgnet_gains(ROOT, "ETTm1", "valid")
    raise ValueError(f"no test table {name!r}")


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in set_partitions(rest):
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1:]
        yield [[first]] + p


def brute_force_best(table: GainTable, k: int):
    """Outside reference: every set partition into <= k groups, scored straight from the table rows."""
    rows = {frozenset(t for t, m in zip(table.tasks, mask) if m): g for mask, g in zip(table.masks, table.gains)}
    best, arg = -np.inf, None
    for p in set_partitions(list(table.tasks)):
        if len(p) > k:
            continue
        value = sum(sum(rows[frozenset(g)][table.tasks.index(t)] for t in g) for g in p if len(g) > 1)
        if value > best + 1e-12:
            best, arg = value, p
    return best, {frozenset(g) for g in arg}


def as_sets(groups):
    return {frozenset(g) for g in groups}
