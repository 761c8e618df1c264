"""MTG-Net group search on the measured gains (oracle): the partition and overlapping searches against
brute force, and their argument errors."""

from __future__ import annotations

import itertools

import pytest

from mtgnet_cases import as_sets, brute_force_best, load_table
from taskgrouping.methods.mtg_net import beam_partition_search, grouping_gain, search_groups


@pytest.mark.parametrize("name", ["taskonomy", "ett"])
@pytest.mark.parametrize("k", [2, 3])
def test_oracle_search_finds_measured_best_partition(name, k):
    table = load_table(name)
    best, groups = brute_force_best(table, k)
    for method in ("exhaustive", "milp"):
        g = search_groups(table.tasks, table.masks, table.gains, k, method=method)
        assert g.is_partition and len(g.groups) <= k
        assert g.info["objective"] == pytest.approx(best, abs=1e-9)
        assert grouping_gain(table, g) == pytest.approx(best, abs=1e-9)
        assert as_sets(g.groups) == groups
    beam = beam_partition_search(table.tasks, table.gains_of_masks, k, beam_width=8)
    assert beam.info["objective"] == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("name, k, exact", [("taskonomy", 2, "exhaustive"), ("taskonomy", 3, "exhaustive"),
                                            ("ett", 2, "exhaustive"), ("ett", 3, "milp"), ("ett", 4, "milp")])
def test_overlap_search_local_matches_exact(name, k, exact):
    table = load_table(name)
    ex = search_groups(table.tasks, table.masks, table.gains, k, overlap=True, method=exact)
    lo = search_groups(table.tasks, table.masks, table.gains, k, overlap=True, method="local")
    assert lo.info["objective"] == pytest.approx(ex.info["objective"], abs=1e-9)
    assert len(ex.groups) <= k and set(ex.serves) == set(table.tasks)
    # each task counted at its gain in the group serving it
    assert grouping_gain(table, ex) == pytest.approx(ex.info["objective"], abs=1e-9)
    if name == "taskonomy":  # independent brute force over combinations of measured rows
        best = max(sum(max(table.gains[r, t] for r in combo if table.masks[r, t]) for t in range(table.n_tasks))
                   for m in range(1, k + 1) for combo in itertools.combinations(range(len(table)), m)
                   if table.masks[list(combo)].any(axis=0).all())
        assert ex.info["objective"] == pytest.approx(best, abs=1e-9)


def test_search_argument_errors():
    taskonomy = load_table("taskonomy")
    with pytest.raises(ValueError, match="positive integer"):
        search_groups(taskonomy.tasks, taskonomy.masks, taskonomy.gains, 0)
    with pytest.raises(ValueError, match=r"\[M, 5\]"):
        search_groups(taskonomy.tasks, taskonomy.masks[:, :4], taskonomy.gains, 2)
    with pytest.raises(ValueError, match="partition search"):
        search_groups(taskonomy.tasks, taskonomy.masks, taskonomy.gains, 2, method="local")
