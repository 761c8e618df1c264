"""Standley et al. (ICML 2020) network selection.

Pinned against: the curves the authors plotted (make_plots_curves.csv, transcribed from their
make_plots.py) recomputed from their measured loss files; hand-computed small instances; and
invariants (the MILP reaches the search's optimum; pruning does not change the search's answer).
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from taskgrouping.grouping.grouping import Grouping
from conftest import GROUPING_DATA
from taskgrouping.methods.standley import (
    Network,
    cheapest_cover_cost,
    esa_networks,
    hoa_networks,
    parse_budgets,
    read_standley_results,
    select_cli,
    select_networks,
    selection_curve,
)

DATA = GROUPING_DATA / "standley_taskgrouping"
RESULTS = DATA / "network_selection"
# setting -> (validation = selection, test = report, early-stopping approximation), per the data README.
SETTINGS = {
    1: ("results.txt", "results_test.txt", "results_20.txt"),
    2: ("results_large.txt", "results_large_test.txt", "results_large_20.txt"),
    3: ("results_small_data.txt", "results_small_data_test.txt", "results_small_data_at4.txt"),
    4: ("results_alt.txt", "results_alt_test.txt", "results_alt_20.txt"),
}
BUDGETS = [1 + 0.5 * i for i in range(9)]


def _read(name: str) -> list[Network]:
    return list(read_standley_results(RESULTS / name).networks)


def _expected() -> dict[tuple[int, str, float], float]:
    out = {}
    with (DATA / "make_plots_curves.csv").open() as fh:
        for r in csv.DictReader(fh):
            if r["method"] in ("optimal", "hoa", "esa"):
                out[(int(r["setting"]), r["method"], float(r["budget"]))] = float(r["total_test_loss"])
    # The data README: the plotted file lists 0.50273 for setting-1 optimal/esa at budget 1, where only the
    # 5-task network fits; that network's test total is 0.50278 (both round to the paper's 0.503).
    assert out[(1, "optimal", 1.0)] == out[(1, "esa", 1.0)] == 0.50273
    out[(1, "optimal", 1.0)] = out[(1, "esa", 1.0)] = 0.50278
    return out


EXPECTED = _expected()


@pytest.fixture(scope="module")
def loaded():
    return {s: tuple(_read(f) for f in files) for s, files in SETTINGS.items()}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("method", ["optimal", "hoa", "esa"])
def test_search_reproduces_published_curves(loaded, setting, method):
    val, test, early = loaded[setting]
    curve = selection_curve(val, test, BUDGETS, approx=method, early=early if method == "esa" else None)
    got = [curve[b]["total"] for b in BUDGETS]
    want = [EXPECTED[(setting, method, b)] for b in BUDGETS]
    assert got == pytest.approx(want, abs=5e-6)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_milp_reproduces_published_optimal_curve(loaded, setting):
    val, test, _ = loaded[setting]
    curve = selection_curve(val, test, BUDGETS, solver="milp")
    assert [curve[b]["total"] for b in BUDGETS] == pytest.approx(
        [EXPECTED[(setting, "optimal", b)] for b in BUDGETS], abs=5e-6)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_milp_reaches_the_search_optimum_for_every_candidate_list(loaded, setting):
    val, test, early = loaded[setting]
    for cands in (val, hoa_networks(val), esa_networks(early, test)):
        for b in (1.5, 2.5, 3.5, 4.5):
            s, m = select_networks(cands, b), select_networks(cands, b, solver="milp")
            assert m.optimal and m.cost <= b + 1e-9 and s.cost <= b + 1e-9
            assert m.total == pytest.approx(s.total, abs=1e-12)


def test_pruning_does_not_change_the_search_answer(loaded):
    # A user BETTER equal to the authors' rule disables pruning: the plain exhaustive search.
    def standley(new, old):
        return not old.total < new.total

    for setting, cands in ((1, hoa_networks(loaded[1][0])), (4, hoa_networks(loaded[4][0]))):
        for b in (1.0, 2.0, 3.0, 3.5):
            assert select_networks(cands, b).networks == select_networks(cands, b, better=standley).networks


def test_setting1_budget_1_is_the_all_in_one_network():
    # With cost 1 only the 5-task network (last line of results.txt) covers every task:
    # 0.07854 + 0.1864 + 0.1 + 0.09814 + 0.04453 = 0.50761.
    sel = select_networks(_read("results.txt"), 1)
    assert [n.tasks for n in sel.networks] == [("task0", "task1", "task2", "task3", "task4")]
    assert sel.total == pytest.approx(0.50761, abs=1e-12)


def three_task_networks() -> list[Network]:
    return [
        Network(("a",), 0.5, {"a": 1.0}),
        Network(("a",), 1, {"a": 0.9}),
        Network(("b",), 1, {"b": 0.8}),
        Network(("c",), 1, {"c": 0.7}),
        Network(("a", "b"), 1, {"a": 0.85, "b": 0.6}),
        Network(("b", "c"), 1, {"b": 0.75, "c": 0.65}),
        Network(("a", "c"), 1, {"a": 0.8, "c": 0.9}),
        Network(("a", "b", "c"), 1, {"a": 0.95, "b": 0.7, "c": 0.8}),
    ]


@pytest.mark.parametrize("solver", ["search", "milp"])
def test_hand_computed_three_task_example(solver):
    nets = three_task_networks()
    # budget 1: the only covering network is abc: .95 + .7 + .8 = 2.45.
    # budget 1.5: half-sized a + bc: 1.0 + .75 + .65 = 2.40 (abc + half a improves nothing).
    # budget 2: ab + bc: .85 + .6 + .65 = 2.10 (ab+c 2.15, bc+ac 2.20, ab+abc 2.25, ab+ac 2.30, ...).
    # budget 3: ab + bc + ac reach every task's best loss anywhere: .8 + .6 + .65 = 2.05.
    for budget, total, chosen in ((1, 2.45, {("a", "b", "c")}), (1.5, 2.40, {("a",), ("b", "c")}),
                                  (2, 2.10, {("a", "b"), ("b", "c")}), (2.5, 2.10, {("a", "b"), ("b", "c")}),
                                  (3, 2.05, {("a", "b"), ("b", "c"), ("a", "c")}),
                                  (4, 2.05, {("a", "b"), ("b", "c"), ("a", "c")})):
        sel = select_networks(nets, budget, solver=solver)
        assert sel.total == pytest.approx(total, abs=1e-12)
        assert {n.tasks for n in sel.networks} == chosen
    assert [n.cost for n in select_networks(nets, 1.5, solver=solver).networks if n.tasks == ("a",)] == [0.5]
    sel = select_networks(nets, 2, solver=solver)
    assert sel.scores == pytest.approx({"a": 0.85, "b": 0.6, "c": 0.65})
    assert sel.serving["a"].tasks == ("a", "b") and sel.serving["c"].tasks == ("b", "c")
    g = sel.to_grouping()
    assert isinstance(g, Grouping) and sorted(g.groups) == [("a", "b"), ("b", "c")]
    assert g.groups[g.serves["b"]] == ("a", "b")


def test_user_better_rule_with_per_task_cap():
    # Cap task a at 0.82: only networks with ac reach it; best capped pair is ac+bc = .8+.75+.65 = 2.20.
    def capped(new, old):
        ok_new, ok_old = new.scores["a"] <= 0.82, old.scores["a"] <= 0.82
        return ok_new and (not ok_old or new.total <= old.total)

    sel = select_networks(three_task_networks(), 2, better=capped)
    assert {n.tasks for n in sel.networks} == {("a", "c"), ("b", "c")}
    assert sel.total == pytest.approx(2.20, abs=1e-12)


def test_tie_rules():
    # {a (0.5), b (0.5)} and {ab (0.9)} both total 1.0 (exact in binary). Search order: the candidate
    # with the largest improvement first -> 'a' (key 98.75), within it 'b': {a, b} is found first,
    # then {ab}. The authors' rule keeps the later one.
    nets = [Network(("a", "b"), 0.9, {"a": 0.5, "b": 0.5}), Network(("a",), 0.5, {"a": 0.25}),
            Network(("b",), 0.5, {"b": 0.75})]
    pick = {tie: {n.tasks for n in select_networks(nets, 1, tie=tie).networks}
            for tie in ("standley", "first", "cheapest")}
    assert pick == {"standley": {("a", "b")}, "first": {("a",), ("b",)}, "cheapest": {("a", "b")}}
    nets[0] = Network(("a", "b"), 1.0, {"a": 0.5, "b": 0.5})
    assert {n.tasks for n in select_networks(nets, 1, tie="cheapest").networks} == {("a",), ("b",)}
    assert select_networks(nets, 1, solver="milp").total == 1.0


def test_hoa_hand_computed():
    hoa = hoa_networks(three_task_networks())
    est = next(n for n in hoa if len(n.tasks) == 3)
    # a: mean(ab .85, ac .8); b: mean(ab .6, bc .75); c: mean(bc .65, ac .9)
    assert dict(est.losses) == pytest.approx({"a": 0.825, "b": 0.675, "c": 0.775})
    assert est.cost == 1 and [n for n in hoa if len(n.tasks) <= 2] == [n for n in three_task_networks()
                                                                        if len(n.tasks) <= 2]
    extra = hoa_networks(three_task_networks()[:7], extra_sets=[("a", "b", "c")], extra_cost=2.0)[-1]
    assert extra.cost == 2.0 and dict(extra.losses) == pytest.approx(dict(est.losses))


def test_hoa_rejects_sets_without_pairs():
    nets = [Network(("a", "b"), 1, {"a": 1.0, "b": 1.0}), Network(("a", "b", "c"), 1, {"a": 1, "b": 1, "c": 1})]
    with pytest.raises(ValueError, match=r"task 'c' in network a\|b\|c"):
        hoa_networks(nets)


def test_esa_needs_final_counterparts(loaded):
    _, test, early = loaded[4]
    assert len(esa_networks(early, test)) == 35  # results_alt_20.txt lacks one pair network
    with pytest.raises(ValueError, match=r"task0\|task1 \(cost 2\) has no fully trained"):
        esa_networks([Network(("task0", "task1"), 2, {"task0": 1, "task1": 1})], test)


@pytest.mark.parametrize("solver", ["search", "milp"])
def test_budget_below_cheapest_cover(solver):
    nets = three_task_networks()
    assert cheapest_cover_cost(nets) == 1.0
    with pytest.raises(ValueError, match=r"budget 0\.5 cannot cover.*costs 1\b"):
        select_networks(nets, 0.5, solver=solver)
    without_abc = nets[:7]
    assert cheapest_cover_cost(without_abc) == 1.5  # half-sized a + bc
    with pytest.raises(ValueError, match=r"budget 1 cannot cover.*costs 1\.5\b"):
        select_networks(without_abc, 1, solver=solver)


def test_unknown_and_uncoverable_tasks():
    nets = three_task_networks()
    with pytest.raises(ValueError, match=r"unknown task 'c'"):
        select_networks(nets, 2, tasks=["a", "b"])
    with pytest.raises(ValueError, match=r"task 'd' is in no candidate network"):
        select_networks(nets, 2, tasks=["a", "b", "c", "d"])


def test_bad_options_and_values():
    nets = three_task_networks()
    with pytest.raises(ValueError, match="solver 'greedy'"):
        select_networks(nets, 2, solver="greedy")
    with pytest.raises(ValueError, match="tie rule 'last'"):
        select_networks(nets, 2, tie="last")
    with pytest.raises(ValueError, match="BETTER rule applies to solver='search'"):
        select_networks(nets, 2, solver="milp", better=lambda new, old: True)
    with pytest.raises(ValueError, match="budget must be"):
        select_networks(nets, -1)
    with pytest.raises(ValueError, match="uncovered=99 is too small"):
        select_networks([Network(("a",), 1, {"a": 50.0}), Network(("a", "b"), 1, {"a": 150.0, "b": 1.0})], 2)
    with pytest.raises(ValueError, match="loss of task 'a' must be finite"):
        Network(("a",), 1, {"a": math.nan})
    with pytest.raises(ValueError, match="exactly its tasks"):
        Network(("a", "b"), 1, {"a": 1.0})
    with pytest.raises(ValueError, match="needs the early-stopped losses"):
        selection_curve(nets, None, [2], approx="esa")


def test_selection_curve_reports_test_losses_of_chosen_networks():
    val = three_task_networks()
    test = [Network(n.tasks, n.cost, {t: v + 1 for t, v in n.losses.items()}) for n in val]
    curve = selection_curve(val, test, [2.0])
    assert curve[2.0]["networks"] == [{"tasks": ["a", "b"], "cost": 1.0}, {"tasks": ["b", "c"], "cost": 1.0}] or \
        curve[2.0]["networks"] == [{"tasks": ["b", "c"], "cost": 1.0}, {"tasks": ["a", "b"], "cost": 1.0}]
    assert curve[2.0]["total"] == pytest.approx(5.10)
    with pytest.raises(ValueError, match=r"chosen network a\|b \(cost 1\) has no entry"):
        selection_curve(val, [n for n in test if n.tasks != ("a", "b")], [2.0])


def test_parse_budgets():
    assert parse_budgets("1:5:0.5") == BUDGETS
    assert parse_budgets("1:3") == [1.0, 2.0, 3.0]
    assert parse_budgets("0.1:0.3:0.1") == [0.1, 0.2, 0.3]
    assert parse_budgets("2, 3.5") == [2.0, 3.5]
    for bad, msg in (("1:x", "'x' is not a number"), ("1:5:0", "step must be > 0"), ("5:1", "below start"),
                     ("", "empty"), ("1:2:3:4", "start:stop")):
        with pytest.raises(ValueError, match=msg):
            parse_budgets(bad)


def test_select_cli_json_document():
    out = select_cli(str(RESULTS / "results_large.txt"), "1:5:0.5", report=str(RESULTS / "results_large_test.txt"),
                     approx="esa", early=str(RESULTS / "results_large_20.txt"))
    doc = json.loads(json.dumps(out))
    assert list(doc) == ["1", "1.5", "2", "2.5", "3", "3.5", "4", "4.5", "5"]
    assert [doc[k]["total"] for k in doc] == pytest.approx([EXPECTED[(2, "esa", b)] for b in BUDGETS], abs=5e-6)
    assert all(set(n) == {"tasks", "cost"} for v in doc.values() for n in v["networks"])
    hoa = select_cli(str(RESULTS / "results.txt"), [3.5], report=str(RESULTS / "results_test.txt"), approx="hoa",
                     tasks=["s", "d", "n", "k", "t"])
    assert hoa["3.5"]["total"] == pytest.approx(EXPECTED[(1, "hoa", 3.5)], abs=5e-6)
    assert {t for n in hoa["3.5"]["networks"] for t in n["tasks"]} == {"s", "d", "n", "k", "t"}


def test_auto_solver_uses_the_exact_search_only_while_it_is_cheap():
    from taskgrouping.methods.standley import SEARCH_MAX_CANDIDATES, resolve_solver

    assert resolve_solver("auto", SEARCH_MAX_CANDIDATES) == "search"
    assert resolve_solver("auto", SEARCH_MAX_CANDIDATES + 1) == "milp"
    assert resolve_solver("search", 10_000) == "search" and resolve_solver("milp", 3) == "milp"


def test_selection_curve_auto_equals_both_exact_solvers():
    import itertools

    tasks = ["a", "b", "c", "d"]
    rng = __import__("random").Random(0)
    nets = [Network(tuple(c), 1.0, {t: rng.uniform(0.5, 1.5) for t in c})
            for r in range(1, 5) for c in itertools.combinations(tasks, r)]
    curves = [selection_curve(nets, None, [1, 2, 3], solver=s) for s in ("auto", "search", "milp")]
    assert [[round(c[b]["total"], 12) for b in c] for c in curves] == [[round(curves[1][b]["total"], 12)
                                                                          for b in curves[1]]] * 3
