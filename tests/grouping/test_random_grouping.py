"""Random partitions: coverage, determinism, and uniformity over the Stirling set partitions."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from taskgrouping.grouping.random_grouping import random_partition, random_partitions, stirling2

TASKS = ["a", "b", "c", "d"]


def _set_partitions(items, k):
    """Reference enumeration of all partitions of ``items`` into exactly ``k`` blocks."""
    out = set()
    for labels in itertools.product(range(k), repeat=len(items)):
        if len(set(labels)) == k:
            out.add(frozenset(frozenset(t for t, l in zip(items, labels) if l == g) for g in range(k)))
    return out


def test_stirling_numbers_known_values():
    # S(4,2)=7, S(5,3)=25, S(10,4)=34105 (OEIS A008277), S(n,n)=1, S(n,1)=1
    assert [stirling2(4, 2), stirling2(5, 3), stirling2(10, 4)] == [7, 25, 34105]
    assert stirling2(6, 6) == 1 and stirling2(6, 1) == 1 and stirling2(3, 4) == 0


@pytest.mark.parametrize("n, k", [(4, 1), (4, 2), (5, 3), (6, 6), (27, 5)])
def test_every_group_non_empty_and_covers(n, k):
    tasks = [f"t{i}" for i in range(n)]
    for g in random_partitions(tasks, k, 50, seed=3):
        assert len(g.groups) == k
        assert all(len(grp) > 0 for grp in g.groups)
        assert g.is_partition and sorted(g.serves) == sorted(tasks)
        assert sorted(t for grp in g.groups for t in grp) == sorted(tasks)


def test_deterministic_per_seed():
    tasks = [f"t{i}" for i in range(9)]
    assert random_partition(tasks, 3, seed=11) == random_partition(tasks, 3, seed=11)
    draws = random_partitions(tasks, 3, 20, seed=5)
    assert draws == random_partitions(tasks, 3, 20, seed=5)
    assert draws[:5] == random_partitions(tasks, 3, 5, seed=5)
    assert len({d.groups for d in draws}) > 1
    assert random_partitions(tasks, 3, 20, seed=6) != draws


@pytest.mark.parametrize("items, k, draws", [(TASKS, 2, 7000), (list("abcde"), 3, 5000)])
def test_roughly_uniform_over_set_partitions(items, k, draws):
    reference = _set_partitions(items, k)
    assert len(reference) == stirling2(len(items), k)
    counts = Counter(frozenset(frozenset(grp) for grp in g.groups) for g in random_partitions(items, k, draws, seed=0))
    assert set(counts) == reference
    expected = draws / len(reference)
    # binomial sd = sqrt(draws p (1-p)) <= sqrt(expected); 5 sd tolerance
    tol = 5 * expected ** 0.5
    for part, c in counts.items():
        assert abs(c - expected) < tol, (sorted(map(sorted, part)), c, expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="between 1 and the number of tasks"):
        random_partition(TASKS, 5, seed=0)
    with pytest.raises(ValueError, match="between 1"):
        random_partition(TASKS, 0, seed=0)
    with pytest.raises(ValueError, match="repeated"):
        random_partition(["a", "a", "b"], 2, seed=0)
    with pytest.raises(ValueError, match="draws"):
        random_partitions(TASKS, 2, -1, seed=0)
