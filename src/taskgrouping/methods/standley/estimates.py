"""The approximations of Standley et al. (ICML 2020, Section 3.3) that spare training every task subset.

* Higher-order approximation (:func:`hoa_networks`): train only single-task and pair networks; the
  loss of a task in a network of >= 3 tasks is estimated as the mean of its losses in the pair
  networks inside the set.
* Early-stopping approximation (:func:`esa_networks`): select on losses measured after ~20 % of
  training, report the fully trained networks' losses.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from taskgrouping.methods.standley.networks import Network

__all__ = ["hoa_networks", "esa_networks"]


def hoa_networks(measured: Sequence[Network], *, extra_sets: Iterable[Iterable[str]] = (),
                 extra_cost: float = 1.0) -> list[Network]:
    """Higher-order approximation (Standley et al., Section 3.3).

    Networks of one or two tasks are kept as measured. For every network of >= 3 tasks -- the
    measured ones, whose losses are replaced, and ``extra_sets`` (never trained, cost ``extra_cost``)
    -- each task's loss is the mean of its losses in all pair networks inside the set. Means are
    summed in the order the pairs appear in ``measured``.

    Raises:
        ValueError: two pair networks for the same pair, or a task of a >= 3-task set that appears in
            no pair network inside the set.
    """
    pairs: list[Network] = []
    seen: dict[frozenset[str], Network] = {}
    for n in measured:
        if len(n.tasks) == 2:
            if frozenset(n.tasks) in seen:
                raise ValueError(f"two pair networks for tasks {set(n.tasks)}: {seen[frozenset(n.tasks)].label} and "
                                 f"{n.label}; HOA needs one loss per pair")
            seen[frozenset(n.tasks)] = n
            pairs.append(n)

    def estimate(tasks: tuple[str, ...], cost: float) -> Network:
        members = frozenset(tasks)
        sums = dict.fromkeys(tasks, 0.0)
        counts = dict.fromkeys(tasks, 0)
        for p in pairs:
            if members.issuperset(p.tasks):
                for t in p.tasks:
                    sums[t] += p.losses[t]
                    counts[t] += 1
        missing = [t for t in tasks if counts[t] == 0]
        if missing:
            raise ValueError(f"HOA cannot estimate task {missing[0]!r} in network {'|'.join(tasks)}: no measured "
                             f"pair network inside that set contains it")
        return Network(tasks, cost, {t: sums[t] / counts[t] for t in tasks})

    out = [n if len(n.tasks) <= 2 else estimate(n.tasks, n.cost) for n in measured]
    for s in extra_sets:
        s = tuple(sorted(s)) if isinstance(s, (set, frozenset)) else tuple(s)
        if len(s) < 3:
            raise ValueError(f"extra_sets are for networks of >= 3 tasks, got {list(s)}")
        out.append(estimate(s, extra_cost))
    return out


def esa_networks(early: Sequence[Network], final: Sequence[Network]) -> list[Network]:
    """Early-stopping approximation (Standley et al., Section 3.3): select on ``early`` losses.

    ``early`` holds the losses of networks stopped after a fraction (~20 %) of training. Each must be a
    network of ``final`` (same task set and cost), so that its fully trained losses can be reported;
    ``final`` may hold networks that were not early-evaluated. Returns ``early`` as a list.
    """
    keys = {n.key for n in final}
    for n in early:
        if n.key not in keys:
            raise ValueError(f"early-stopped network {n.label} has no fully trained counterpart")
    return list(early)
