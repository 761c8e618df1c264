"""The two-shot grouping methods end to end (Standley's optimal / HOA / ESA, TAG, MTG-Net).

Everything runs on a tiny planted problem (4 regression tasks in 2 planted pairs) for 2 epochs.
Expectations come from outside the code under test: brute-force network selection over the
recorded candidate losses, HOA estimates recomputed by hand from the recorded pair losses, the
MTG-Net gain formula applied by hand, hand-counted multiply-accumulates, and a copied task whose
lookahead affinity with its original must be the largest.
"""

import dataclasses
import itertools
import json
import math

import pytest
import torch

import taskgrouping.methods.mtg_net  # noqa: F401  (registers mtg_net)
import taskgrouping.methods.standley  # noqa: F401  (registers optimal, hoa, esa)
import taskgrouping.methods.tag  # noqa: F401  (registers tag)
from taskgrouping.config import build_config
from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.engine.driver import prepare_data
from taskgrouping.experiment import run_experiment
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext
from taskgrouping.methods.baselines import fit_grouping
from taskgrouping.methods.standley import half_size_options, hoa, optimal
from taskgrouping.methods.tag import tag
from taskgrouping.tasks import Task
from taskgrouping.engine.trainer import TrainConfig

TINY = ["data.name=planted", "data.n_tasks=4", "data.group_sizes=[2,2]", "data.input_dim=8", "data.feature_dim=4",
        "data.n_train=256", "data.n_val=128", "data.n_test=128", "model.backbone=mlp", "model.options.widths=[8,4]",
        "train.epochs=2", "train.batch_size=64", "train.lr=0.01", "train.progress=false", "train.early_stopping=0",
        "K=2"]
METHODS = ["hoa", "optimal", "esa", "tag", "mtg_net"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_shot")
    config = build_config(overrides=TINY + [f"methods=[{','.join(METHODS)}]", "hoa.budget=2",
                                            "mtg_net.rounds=2", "mtg_net.meta_epochs=20"])
    summary = run_experiment(config, out, echo=lambda m: None)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, logged, json.loads((out / "results.json").read_text())


def _ctx(name, options, overrides=()):
    config = build_config(overrides=TINY + list(overrides))
    return MethodContext(data=prepare_data(config), seed=0, K=config["K"], train=TrainConfig(**config["train"]),
                         model=config["model"], balancer=config["balancer"], options=options, name=name)


def test_every_method_reports_the_standard_fields(run):
    summary, logged, on_disk = run
    tasks = summary["dataset"]["tasks"]
    for name in METHODS:
        rec = on_disk["methods"][name]
        assert set(rec["per_task"]) == set(tasks) and set(rec["val_per_task"]) == set(tasks)
        assert math.isfinite(rec["total_test_loss"])
        assert rec["total_test_loss"] == pytest.approx(sum(rec["per_task"][t]["loss"] for t in tasks))
        grouping = Grouping.from_json({"groups": rec["grouping"], "serves": rec["serves"]})
        assert set(grouping.tasks) == set(tasks)
        assert rec["train_seconds"] > 0 and rec["n_networks"] >= len(rec["grouping"])
    # every network a Standley method trained wrote its epochs to metrics.jsonl under its tag
    for name in ("hoa", "optimal", "esa", "mtg_net"):
        tags = {n["tag"] for n in on_disk["methods"][name]["networks"]}
        assert tags == {r["network"] for r in logged if r["method"] == name}
        assert on_disk["methods"][name]["n_networks"] == len(tags) - (name == "esa") * sum(
            n["phase"] == "full" for n in on_disk["methods"][name]["networks"])


def _brute_force(candidates, tasks, budget):
    """Smallest sum over tasks of the best loss, over every candidate subset within the budget."""
    best = math.inf
    for r in range(1, 5):
        for combo in itertools.combinations(candidates, r):
            if sum(c["cost"] for c in combo) > budget + 1e-9:
                continue
            scores = [min((c["loss"][t] for c in combo if t in c["loss"]), default=math.inf) for t in tasks]
            best = min(best, sum(scores))
    return best


def test_hoa_trains_singles_pairs_and_half_singles_and_estimates_from_pairs(run):
    summary, _, _ = run
    rec = summary["methods"]["hoa"]
    tasks = summary["dataset"]["tasks"]
    first = [n for n in rec["networks"] if n["phase"] == "candidate"]
    got = sorted((tuple(n["tasks"]), n["cost"]) for n in first)
    want = sorted([((t,), 1.0) for t in tasks] + [((t,), 0.5) for t in tasks]
                  + [(p, 1.0) for p in itertools.combinations(tasks, 2)])
    assert got == want
    pairs = [n for n in first if len(n["tasks"]) == 2]
    candidates = [{"tasks": n["tasks"], "cost": n["cost"], "loss": n["val_loss"]} for n in first]
    for r in (3, 4):
        for s in itertools.combinations(tasks, r):
            est = {t: sum(p["val_loss"][t] for p in pairs if set(p["tasks"]) <= set(s) and t in p["tasks"]) / (r - 1)
                   for t in s}
            candidates.append({"tasks": list(s), "cost": 1.0, "loss": est})
    assert rec["n_candidates"] == len(candidates) == 14 + 5
    assert rec["selection_total"] == pytest.approx(_brute_force(candidates, tasks, 2.0), abs=1e-12)
    assert rec["selection_cost"] <= rec["budget"] == 2.0 == rec["encoder_complexity"]
    # chosen networks of >= 3 tasks were trained in the second shot; the others reused
    for net in rec["chosen"]:
        assert net["reused"] == (len(net["tasks"]) <= 2)
    extra_trained = sum(len(n["tasks"]) >= 3 for n in rec["chosen"])
    assert rec["n_networks"] == 14 + extra_trained
    assert rec["trained_cost"] == 4 * 0.5 + 10 + extra_trained


def test_optimal_reuses_networks_and_serves_each_task_by_its_best_network(run):
    summary, _, _ = run
    rec = summary["methods"]["optimal"]
    tasks = summary["dataset"]["tasks"]
    assert rec["n_networks"] == 15 + 4
    candidates = [{"tasks": n["tasks"], "cost": n["cost"], "loss": n["val_loss"]} for n in rec["networks"]]
    assert rec["selection_total"] == pytest.approx(_brute_force(candidates, tasks, 2.0), abs=1e-12)  # budget = K
    assert all(n["reused"] for n in rec["chosen"]) and rec["selection_cost"] <= 2.0
    for t in tasks:
        k = rec["serves"][t]
        chosen = rec["chosen"]
        assert chosen[k]["val_loss"][t] == min(n["val_loss"][t] for n in chosen if t in n["tasks"])
        # the assembled model gives exactly the serving network's own test loss
        assert rec["per_task"][t]["loss"] == chosen[k]["test_loss"][t]


def test_esa_selects_on_early_losses_and_continues_the_chosen(run):
    summary, _, _ = run
    rec = summary["methods"]["esa"]
    assert rec["early_epochs"] == 1  # round(0.2 * 2) -> at least one epoch
    early = [n for n in rec["networks"] if n["phase"] == "early"]
    assert len(early) == 19 and all(n["epochs"] == 1 for n in early)
    full = [n for n in rec["chosen"]]
    assert all(n["phase"] == "full" and not n["reused"] for n in full)
    # seconds of the continued networks cover only their later epochs
    assert rec["train_seconds"] == pytest.approx(sum(n["train_seconds"] for n in rec["networks"]))


def test_mtg_net_gains_follow_the_definition(run):
    summary, _, _ = run
    rec = summary["methods"]["mtg_net"]
    tasks = summary["dataset"]["tasks"]
    sampled = rec["sampled_gains"]
    assert rec["n_sampled"] == len(sampled) == 4 + 1 + 2
    single = {s["tasks"][0]: s["val_loss"][s["tasks"][0]] for s in sampled if len(s["tasks"]) == 1}
    for s in sampled:
        for t in s["tasks"]:
            assert s["gain"][t] == pytest.approx((single[t] - s["val_loss"][t]) / single[t], rel=1e-12, abs=1e-15)
    groups = rec["grouping"]
    assert len(groups) <= 2 and sorted(t for g in groups for t in g) == sorted(tasks)  # a partition


def test_tag_copied_task_has_the_largest_mutual_affinity():
    """Task b is an exact copy of task a; c and d are unrelated. Lookahead steps of a help b (and
    vice versa) more than any other pair."""
    g = torch.Generator().manual_seed(0)
    n = 384
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(3, 8, generator=g)
    a = x @ w[0] + 0.1 * torch.randn(n, generator=g)
    targets = {"a": a[:, None], "b": a[:, None].clone(), "c": torch.tanh(x @ w[1])[:, None],
               "d": (x @ w[2]).sin()[:, None]}
    splits = [TensorTaskDataset(x[s], {k: v[s] for k, v in targets.items()})
              for s in (slice(0, 256), slice(256, 320), slice(320, 384))]
    data = TaskData("copy", [Task(t, "regression") for t in "abcd"], *splits, input_shape=(8,))
    ctx = MethodContext(data=data, seed=0, K=2, train=TrainConfig(epochs=2, batch_size=32, lr=0.01, progress=False),
                        model={"backbone": "mlp", "options": {"widths": [16]}}, balancer={"name": "ew"},
                        options={}, name="tag")
    res = tag(ctx)
    aff = res.extra["affinity"]  # {recipient: {source: value}}
    off = {(s, r): aff[r][s] for r in "abcd" for s in "abcd" if s != r}
    top2 = sorted(off, key=off.get, reverse=True)[:2]
    assert set(top2) == {("a", "b"), ("b", "a")}
    assert any({"a", "b"} <= set(grp) for grp in res.grouping.groups)
    assert res.extra["affinity_epochs"] == 2 and res.extra["affinity_steps"] == 2 * 8
    # the lookahead leaves training untouched: the affinity run is bit-for-bit a naive-MTL run
    naive = fit_grouping(ctx, Grouping.partition([list("abcd")]), "naive")
    ref, got = naive.model.state_dict(), ctx.cache["naive_mtl_model"].state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # the optimiser-aware lookahead (Adam) gets the optimiser from the trainer: every 3rd step from step 0
    aware = tag(dataclasses.replace(ctx, options={"lookahead": "optimizer", "every": 3}, cache={}))
    assert aware.extra["affinity_steps"] == len(range(0, 16, 3)) and aware.extra["affinity_skipped_steps"] == 0


def test_half_size_halves_the_compute():
    def macs(d_in, widths):
        return sum(i * o for i, o in zip([d_in] + list(widths), widths))

    half = half_size_options("mlp", {"widths": [64, 16]}, (32,))
    assert abs(macs(32, half["widths"]) / macs(32, [64, 16]) - 0.5) < 0.02
    assert half_size_options("xception", {}, (3, 64, 64)) == {"width": 2 ** -0.5}
    with pytest.raises(ValueError, match="backbone 'vit' has no half-size rule"):
        half_size_options("vit", {}, (3, 32, 32))


def test_budget_below_the_cheapest_cover_fails_before_training():
    ctx = _ctx("hoa", {"budget": 0.4})
    with pytest.raises(ValueError, match="budget 0.4 cannot cover all tasks: the cheapest set of networks covering "
                                         "every task costs 1"):
        hoa(ctx)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="optimal.max_tasks=3"):
        optimal(_ctx("optimal", {"max_tasks": 3}))
    with pytest.raises(ValueError, match="hoa.backend: unknown backend 'threads'"):
        hoa(_ctx("hoa", {"backend": "threads", "half_size": False}))
    with pytest.raises(ValueError, match="mtg_net.rounds"):
        taskgrouping.methods.mtg_net.mtg_net(_ctx("mtg_net", {"rounds": -1}))
    with pytest.raises(ValueError, match="mtg_net.acquisition must be auto, active, search or random, got 'greedy'"):
        taskgrouping.methods.mtg_net.mtg_net(_ctx("mtg_net", {"acquisition": "greedy"}))
    with pytest.raises(ValueError, match="mtg_net.initial must be auto, paper or leave_one_out"):
        taskgrouping.methods.mtg_net.mtg_net(_ctx("mtg_net", {"initial": "all"}))
