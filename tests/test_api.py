"""``group_tasks``: any method on the user's datasets, tasks and backbone, through the run engine.

Pinned: a fixed grouping trained by ``group_tasks`` gives exactly the numbers of training it by hand
with the public building blocks (no second training path); label_clusters finds the two pairs of
correlated tasks built by hand; the user's module reaches every method's networks and is left as it
was; the same seed gives the same numbers; the files written to ``out_dir``; one ConfigError line per
bad argument, nothing written; the two examples run and stay under 30 lines."""

import ast
import json
import runpy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from taskgrouping import (Task, TensorTaskDataset, TrainConfig, build_branched_model, evaluate, group_tasks,
                          train)
from taskgrouping.config import ConfigError
from taskgrouping.data.base import make_loader
from taskgrouping.methods.base import available_methods

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TASKS = [Task("a", "regression"), Task("b", "regression"), Task("c", "binary"), Task("d", "regression")]
TINY = {"epochs": 2, "batch_size": 32, "progress": False}


def split(n, seed):
    """a and b read one direction, c and d another: |r(a, b)| and |r(c, d)| are large, across ~0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    e = 0.3 * torch.randn(n, 4, generator=g)
    return TensorTaskDataset(x, {"a": x[:, :1] + e[:, :1], "b": x[:, :1] + e[:, 1:2],
                                 "c": (x[:, 1] + e[:, 2] > 0).long(), "d": x[:, 1:2] + e[:, 3:]})


SPLITS = (split(120, 0), split(60, 1), split(60, 2))


def backbone():
    torch.manual_seed(7)
    return nn.Sequential(nn.Sequential(nn.Linear(10, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 8), nn.ReLU()))


def test_fixed_grouping_equals_training_it_by_hand():
    groups = [["a", "b"], ["c", "d"]]
    res = group_tasks("fixed", *SPLITS, TASKS, K=2, backbone=backbone(), shared_blocks=1, training=TINY,
                      options={"groups": groups}, seed=3)
    bb = backbone()
    torch.manual_seed(3)  # the run seed, drawn from once the backbone exists: the heads' initialisation
    model = build_branched_model(TASKS, groups, (10,), backbone=bb, shared_blocks=1)
    by_hand = train(model, make_loader(SPLITS[0], 32, True), make_loader(SPLITS[1], 32, False), TASKS,
                    TrainConfig(**TINY), seed=3)
    assert res.groups == groups
    assert res.per_task == evaluate(by_hand.model, make_loader(SPLITS[2], 32, False), TASKS)


def test_label_clusters_pairs_the_correlated_tasks_and_keeps_the_users_module():
    bb = backbone()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    res = group_tasks("label_clusters", *SPLITS, TASKS, K=2, backbone=bb, training=TINY)
    assert res.groups == [["a", "b"], ["c", "d"]]
    assert set(res.per_task) == {"a", "b", "c", "d"} and res.record["n_networks"] == 2
    assert all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())  # copied, never trained in place
    user = [(type(m), tuple(p.shape for p in m.parameters())) for m in bb.modules()]
    for branch in res.model.branches:
        assert [(type(m), tuple(p.shape for p in m.parameters())) for m in branch.modules()] == user


@pytest.mark.parametrize("method", sorted(set(available_methods()) - {"oracle"}))
def test_every_method_trains_networks_of_the_users_module(method):
    bb = backbone()
    opts = {"groups": [["a", "b"], ["c", "d"]]} if method == "fixed" else {}
    res = group_tasks(method, *SPLITS, TASKS, K=2, backbone=bb, training=dict(TINY, epochs=1), options=opts)
    assert {t for g in res.groups for t in g} == {"a", "b", "c", "d"} and len(res.groups) <= 4
    assert set(res.per_task) == {"a", "b", "c", "d"}
    # the user's second block, Linear(16 -> 8), is in the model that answers (no built-in backbone has it)
    assert any(isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (16, 8) for m in res.model.modules())


def test_same_seed_same_numbers_and_the_files_written(tmp_path):
    runs = [group_tasks("dmtg", *SPLITS, TASKS, K=2, backbone=backbone(), shared_blocks=1, training=TINY, seed=5,
                        out_dir=tmp_path / f"run{i}") for i in range(2)]
    assert runs[0].per_task == runs[1].per_task and runs[0].groups == runs[1].groups
    out = runs[0].out_dir
    assert out == tmp_path / "run0"
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["dmtg"]["grouping"] == runs[0].groups
    assert results["methods"]["dmtg"]["total_test_loss"] == pytest.approx(runs[0].total_test_loss)
    weights = load_file(str(out / "models" / "dmtg.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in runs[0].model.state_dict().items())
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["backbone"] == "own module Sequential" and config["methods"] == ["dmtg"]
    assert (out / "figures" / "dmtg_assignment.png").is_file() and (out / "metrics.jsonl").is_file()
    listing = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match="is not empty"):
        group_tasks("dmtg", *SPLITS, TASKS, backbone=backbone(), training=TINY, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == listing


BAD = {
    "unknown method": ({"method": "dmtgg"}, r"unknown method 'dmtgg'; expected one of \[.*'dmtg'"),
    "K above N": ({"K": 5}, r"K must be an integer between 1 and the number of tasks \(4\), got 5"),
    "task not in the targets": ({"tasks": TASKS[:3] + [Task("price", "regression")]},
                                r"train: the dataset has no targets for tasks \['price'\]; its samples carry "
                                r"\['a', 'b', 'c', 'd'\]"),
    "not a Task": ({"tasks": ["a", "b"]}, r"tasks\[0\] must be a taskgrouping.Task"),
    "unknown option": ({"options": {"tau_x": 1}}, r"unknown config key dmtg.tau_x"),
    "bad training key": ({"training": {"epoch": 2}}, r"unknown training key 'epoch'"),
    "backbone cannot read the inputs": ({"backbone": nn.Sequential(nn.Linear(7, 8))},
                                        r"backbone Sequential cannot be built .* inputs of shape \(10,\)"),
    "half-size networks of a module": ({"method": "hoa", "options": {"half_size": True}},
                                       r"hoa.half_size=True needs a registered backbone name"),
    "unknown balancer": ({"balancer": "pcgradd"}, r"unknown balancer 'pcgradd'"),
    "split of another shape": ({"test": TensorTaskDataset(torch.zeros(4, 3), {t.name: torch.zeros(4, 1)
                                                                             for t in TASKS})},
                               r"test: inputs have shape \(3,\); expected \(10,\)"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_argument_is_one_clear_error_and_nothing_written(tmp_path, case):
    kw, message = BAD[case]
    args = dict(method="dmtg", train=SPLITS[0], val=SPLITS[1], test=SPLITS[2], tasks=TASKS, backbone=backbone(),
                training=TINY, out_dir=tmp_path / "run")
    args.update(kw)
    with pytest.raises(ConfigError, match=message) as info:
        group_tasks(**args)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("example, size, tasks", [("dmtg_own_tensors.py", 300, ["u0", "u1", "u2", "v0", "v1", "v2"]),
                                                  ("hoa_own_dataset.py", 80, ["top_sum", "top_pos", "bottom_sum",
                                                                              "bottom_pos"])])
def test_examples_run_and_stay_short(capsys, example, size, tasks):
    path = EXAMPLES / example
    assert len(path.read_text().splitlines()) < 30
    runpy.run_path(str(path), run_name="example")["main"](n=size, epochs=1)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("groups: "))
    groups = ast.literal_eval(line[len("groups: "):].split(" (")[0])
    assert sorted({t for g in groups for t in g}) == sorted(tasks) and 1 <= len(groups) <= 2
