"""The planted benchmark is meaningful, and DMTG's default recipe solves it (seed 0 of the preset).

These pin the claims the preset makes: training the planted grouping beats both naive MTL and
single-task learning on test loss, and DMTG recovers the planted grouping exactly.
"""

import pytest

from conftest import run_preset


@pytest.fixture(scope="module")
def planted_runs():
    return run_preset("planted", ("naive_mtl", "single_task", "oracle", "dmtg"))


def total(res):
    return sum(m["loss"] for m in res.per_task.values())


def test_planted_grouping_beats_naive_and_single_task(planted_runs):
    _, r = planted_runs
    assert total(r["oracle"]) < total(r["naive_mtl"])
    assert total(r["oracle"]) < total(r["single_task"])


def test_dmtg_recovers_the_planted_grouping_and_beats_naive(planted_runs):
    data, r = planted_runs
    found = sorted(sorted(g) for g in r["dmtg"].grouping.groups)
    assert found == sorted(sorted(g) for g in data.groups)
    assert total(r["dmtg"]) < total(r["naive_mtl"])
    assert r["dmtg"].extra["live_heads_final"] == len(data.tasks)
