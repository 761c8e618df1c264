"""TAG: affinity files and group selection pinned to the authors' Taskonomy affinity table (the
lookahead and its accumulation are in test_tag_affinity.py)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from conftest import GROUPING_DATA
from taskgrouping.methods.tag import load_affinity, select_groups, tag_select_cli

DATA = GROUPING_DATA / "tag_google_research" / "network_selection_inputs"
TASKONOMY = DATA / "tag_taskonomy_affinity.json"
CELEBA = DATA / "tag_celeba_affinity.json"


def as_sets(groups):
    return {frozenset(g) for g in groups}


# ------------------------------------------------------------------ loading


def test_load_affinity_orientation_matches_file():
    names, mat = load_affinity(TASKONOMY)
    raw = json.loads(TASKONOMY.read_text())
    assert names == ["ss_l", "depth_l", "norm_l", "key_l", "edge2d_l"]
    # A[source, recipient] == file[recipient][source]
    for s, src in enumerate(names):
        for r, rec in enumerate(names):
            assert mat[s, r] == raw[rec][src]


@pytest.mark.parametrize("payload, words", [
    ([1, 2], ["JSON object"]),
    ({"a": {"a": 1.0, "b": 2.0}, "b": {"a": 1.0}}, ["'b'", "different source set"]),
    ({"a": {"a": 1.0, "c": 2.0}, "b": {"a": 1.0, "c": 2.0}}, ["'a'", "not square"]),
    ({"a": {"a": 1.0, "b": "x"}, "b": {"a": 1.0, "b": 2.0}}, ["'b'", "'a'", "finite number"]),
    ({"a": 3, "b": {"a": 1.0, "b": 2.0}}, ["'a'", "must be an object"]),
])
def test_load_affinity_rejects_bad_tables(tmp_path, payload, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError) as err:
        load_affinity(path)
    assert str(path) in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_load_affinity_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_affinity(tmp_path / "nope.json")


# ------------------------------------------------------------------ selection


def test_taskonomy_published_groupings():
    """DESIGN.md / the TAG notebook: 2 groups {s,d,n},{k,t}; 3 groups {s,d},{d,n},{k,t}."""
    names, mat = load_affinity(TASKONOMY)
    two = select_groups(mat, names, 2)
    assert as_sets(two.groups) == {frozenset({"ss_l", "depth_l", "norm_l"}), frozenset({"key_l", "edge2d_l"})}
    three = select_groups(mat, names, 3)
    assert as_sets(three.groups) == {frozenset({"ss_l", "depth_l"}), frozenset({"depth_l", "norm_l"}),
                                     frozenset({"key_l", "edge2d_l"})}
    assert not three.is_partition
    for g in (two, three):
        for task, k in g.serves.items():
            assert task in g.groups[k]


def _brute_force(raw: dict, k: int) -> float:
    """Independent statement of TAG's rule straight on the {recipient: {source: v}} dict."""
    tasks = list(raw)
    cands = [c for r in range(2, len(tasks) + 1) for c in itertools.combinations(tasks, r)]

    def score(group, t):
        return np.mean([raw[t][s] for s in group if s != t])

    best = -np.inf
    for m in range(1, k + 1):
        for combo in itertools.combinations(cands, m):
            if set().union(*combo) != set(tasks):
                continue
            best = max(best, np.mean([max(score(g, t) for g in combo if t in g) for t in tasks]))
    return best


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_selection_matches_brute_force_and_milp(k):
    raw = json.loads(TASKONOMY.read_text())
    g_ex = select_groups(raw, None, k, method="exhaustive")
    g_milp = select_groups(raw, None, k, method="milp")
    assert g_milp.info["score"] == pytest.approx(g_ex.info["score"], abs=1e-9)
    assert len(g_ex.groups) <= k and len(g_milp.groups) <= k
    if k <= 3:  # the plain-Python reference is too slow beyond 3 groups
        assert g_ex.info["score"] == pytest.approx(_brute_force(raw, k), abs=1e-12)


def test_celeba_exhaustive_and_milp_agree():
    names, mat = load_affinity(CELEBA)
    assert len(names) == 9
    ex = select_groups(mat, names, 2, method="exhaustive")
    mi = select_groups(mat, names, 2, method="milp")
    assert ex.info["score"] == pytest.approx(mi.info["score"], rel=1e-9)
    assert set(ex.serves) == set(names)


def test_subset_of_tasks_and_singletons():
    raw = json.loads(TASKONOMY.read_text())
    g = select_groups(raw, ["key_l", "edge2d_l", "ss_l"], 3)
    assert set(g.serves) == {"key_l", "edge2d_l", "ss_l"}
    assert all(len(grp) >= 2 for grp in g.groups)  # singletons never preferred
    one = select_groups(raw, ["norm_l"], 2)
    assert one.groups == (("norm_l",),)


def test_selection_errors():
    raw = json.loads(TASKONOMY.read_text())
    with pytest.raises(ValueError, match="foo"):
        select_groups(raw, ["ss_l", "foo"], 2)
    with pytest.raises(ValueError, match="square"):
        select_groups(np.zeros((3, 2)), ["a", "b", "c"], 2)
    with pytest.raises(ValueError, match="3 task names"):
        select_groups(np.zeros((2, 2)), ["a", "b", "c"], 2)
    with pytest.raises(ValueError, match="positive integer"):
        select_groups(raw, None, 0)


def test_cli_backend():
    out = tag_select_cli(TASKONOMY, 2)
    assert set(out) == {"groups", "serves"}
    assert as_sets(out["groups"]) == {frozenset({"ss_l", "depth_l", "norm_l"}), frozenset({"key_l", "edge2d_l"})}
    assert set(out["serves"]) == {"ss_l", "depth_l", "norm_l", "key_l", "edge2d_l"}
    json.dumps(out)
