"""Every registered balancer trains naive MTL end to end (config ``balancer:`` -> run_experiment)
without NaNs, on real data (scikit-learn digits, 4 binary tasks) and on a tiny planted regression
problem, at its default level and, on planted, at feature level where the balancer has both.

Invariants checked: the trainer finishes (it raises TrainingDiverged on a non-finite loss), every
epoch's training losses and every test metric are finite, and results.json carries the standard
fields for every task.
"""

from __future__ import annotations

import json
import math

import pytest

from taskgrouping.balancing.catalogue import BALANCERS
from taskgrouping.balancing.study import balancer_levels
from taskgrouping.config import build_config
from taskgrouping.experiment import run_experiment

DATA = {
    "digits": ["data.name=digits", "model.options.widths=[16,8]", "train.batch_size=128"],
    "planted": ["data={name: planted, n_tasks: 4, group_sizes: [2, 2], input_dim: 8, feature_dim: 3, "
                "n_train: 96, n_val: 32, n_test: 32}", "model={backbone: mlp, options: {widths: [8, 6]}}",
                "train.batch_size=32"],
}
# "default": the balancer as configured without options (parameter level, except MGDA-UB and
# Aligned-MTL-UB, which are feature-level by definition)
CASES = [(name, "default", data) for name in sorted(BALANCERS) for data in DATA]
CASES += [(name, "feature", "planted") for name in sorted(BALANCERS)
          if balancer_levels(name, ["a", "b"]) == ("param", "feature")]


@pytest.mark.parametrize("name,level,data", CASES)
def test_balancer_trains_naive_mtl_without_nans(name, level, data, tmp_path):
    overrides = DATA[data] + ["methods=[naive_mtl]", "train.epochs=1", "train.lr=0.01", f"balancer.name={name}"]
    if level == "feature":
        overrides.append("balancer.options={feature_level: true}")
    cfg = build_config(overrides=overrides)
    run_experiment(cfg, tmp_path, echo=lambda s: None)
    rec = json.loads((tmp_path / "results.json").read_text())["methods"]["naive_mtl"]
    tasks = json.loads((tmp_path / "results.json").read_text())["dataset"]["tasks"]
    assert rec["grouping"] == [tasks] and set(rec["per_task"]) == set(tasks)
    for t in tasks:
        assert all(math.isfinite(v) for v in rec["per_task"][t].values()), (t, rec["per_task"][t])
    assert math.isfinite(rec["total_test_loss"]) and rec["epochs_run"] == 1 and rec["train_seconds"] > 0
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 1 and all(math.isfinite(v) for v in epochs[0]["train_loss"].values())


def test_parameter_level_cosreg_trains_a_vit(tmp_path):
    """CosReg's Hessian-vector products differentiate the network's gradients; the fused attention kernels
    have no second derivative ("derivative for ..._flash_attention_for_cpu_backward is not implemented"
    before the trainer ran such forward passes with the math kernel)."""
    cfg = build_config(preset="multimnist", overrides=[
        "methods=[naive_mtl]", "data.n_train=64", "data.n_val=32", "data.n_test=32", "train.epochs=1",
        "train.progress=false", "model.backbone=vit", "model.options={dim: 16, depth: 1, heads: 2, patch_size: 7}",
        "balancer.name=cosreg"])
    run_experiment(cfg, tmp_path, echo=lambda s: None)
    rec = json.loads((tmp_path / "results.json").read_text())["methods"]["naive_mtl"]
    assert math.isfinite(rec["total_test_loss"]) and rec["epochs_run"] == 1
