"""The ``interrogate`` method: its options, the sparsity loss, the objective's training steps and
state, and an end-to-end run through ``run_experiment``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from interrogate_helpers import TASKS, make_gated

from taskgrouping.data.builtin import multimnist
from taskgrouping.flops import count_flops
from taskgrouping.methods.interrogate import (InterroGateObjective, InterroGateOptions, load_compiled,
                                              sparsity_loss)
from taskgrouping.models.branched import build_branched_model
from taskgrouping.tasks import Task


@pytest.fixture(scope="module")
def mnist():
    return multimnist(n_train=16, n_val=8, n_test=16, seed=0)


def test_sparsity_hinge_and_l1_on_a_hand_example():
    ln3 = math.log(3.0)  # σ(ln 3) = 0.75
    layer1 = torch.tensor([[0.0, 0.0], [ln3, ln3]])  # σ: task0 (0.5, 0.5), task1 (0.75, 0.75)
    layer2 = torch.tensor([[ln3], [-ln3]])  # σ: task0 0.75, task1 0.25
    # u_t = mean over layers of the per-layer channel mean: u0 = (0.5 + 0.75)/2, u1 = (0.75 + 0.25)/2
    u0, u1 = 0.625, 0.5
    tau = torch.tensor([0.5, 0.6])
    assert float(sparsity_loss([layer1, layer2], tau, "hinge")) == pytest.approx(((u0 - 0.5) + 0.0) / 2)
    assert float(sparsity_loss([layer1, layer2], 0.0, "hinge")) == pytest.approx((u0 + u1) / 2)
    assert float(sparsity_loss([layer1, layer2], tau, "l1")) == pytest.approx((u0 + u1) / 2)


def test_a_few_training_steps_with_sparsity_prune_below_the_gated_and_stl_cost(mnist):
    tasks = mnist.tasks[:3]
    shape = mnist.input_shape
    net, *_ = make_gated("small_cnn", shape, {}, tasks)
    opts = InterroGateOptions(lambda_s=50.0, tau=0.0, gate_lr=0.5, gate_optimizer="adam")
    objective = InterroGateObjective(net, tasks, opts)
    optimizer = torch.optim.SGD(objective.param_groups(net)[0]["params"], lr=0.01)
    x, y = mnist.train.x, {t.name: mnist.train.targets[t.name] for t in tasks}
    for _ in range(4):
        out = objective(net, x, y)
        optimizer.zero_grad()
        (sum(out.losses.values()) + out.extra_loss).backward()
        optimizer.step()
        objective.after_step()
    assert all(p.grad is None for p in net.gate_parameters())  # after_step cleared the gates' grads
    hard = net.hard_gates()
    assert any((~m).any() for m in hard.values())  # some channels now shared
    stl = build_branched_model(tasks, [[t.name] for t in tasks], shape, "small_cnn")
    flops = count_flops(net.compile(), shape)
    assert flops < count_flops(net, shape) and flops < count_flops(stl, shape)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

def test_interrogate_method_end_to_end_through_run_experiment(tmp_path):
    from taskgrouping.config import build_config
    from taskgrouping.experiment import run_experiment

    cfg = build_config(None, "planted", [
        "data.n_tasks=3", "data.group_sizes=[2,1]", "data.n_train=96", "data.n_val=32", "data.n_test=64",
        "model.options.widths=[8,4]", "train.epochs=1", "train.early_stopping=0", "train.batch_size=32",
        "train.progress=false", "methods=[naive_mtl,interrogate]", "interrogate.lambda_s=0.1"])
    summary = run_experiment(cfg, tmp_path / "run", echo=lambda s: None)
    rec = summary["methods"]["interrogate"]
    names = summary["dataset"]["tasks"]
    assert set(rec["per_task"]) == set(names) and rec["grouping"] == [names]
    assert math.isfinite(rec["total_test_loss"]) and rec["delta_mtl"] is None  # no single_task method in the run
    assert rec["compile_max_abs_diff"] <= 1e-5
    assert rec["flops"]["compiled"] < rec["flops"]["gated"]
    # FLOPs and parameters are the kept channels' (the paper's count); what the CPU form computes is extra
    assert rec["flops"]["compiled"] <= rec["flops"]["compiled_executed"]
    assert rec["params"]["compiled"] <= rec["params"]["compiled_executed"]
    assert {"single_task", "naive_mtl"} <= set(rec["flops"]) and rec["params"]["compiled"] < rec["params"]["gated"]
    assert len(rec["sharing_pattern"]) == 2 and set(rec["task_specific_fraction"]) == set(names)
    # the gates' optimiser stepped: the soft usage left σ(gate_init)
    usage = rec["gate_history"][0]["soft_usage"]
    assert any(abs(u - 1 / (1 + math.exp(-rec["options"]["gate_init"]))) > 1e-4 for u in usage.values())
    reloaded = load_compiled(rec["compiled_dir"])
    assert reloaded.task_names == names
    assert (tmp_path / "run" / "models" / "interrogate.safetensors").is_file()


def test_objective_state_round_trips_through_json():
    tasks = [Task("a", "binary"), Task("b", "binary")]
    net, *_ = make_gated("mlp", (8,), {"widths": (4,)}, tasks)
    opts = InterroGateOptions(gate_optimizer="adam")
    obj = InterroGateObjective(net, tasks, opts)
    out = obj(net, torch.randn(4, 8), {"a": torch.tensor([0, 1, 0, 1]), "b": torch.tensor([1, 1, 0, 0])})
    (sum(out.losses.values()) + out.extra_loss).backward()
    obj.after_step()
    state = json.loads(json.dumps(obj.state_dict()))
    other = InterroGateObjective(net, tasks, opts)
    other.load_state_dict(state)
    a, b = obj.gate_optimizer.state_dict()["state"], other.gate_optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

def test_option_defaults_and_what_results_json_records():
    assert InterroGateOptions.defaults() == {
        "lambda_s": 1.0, "tau": 0.2, "sparsity": "hinge", "gate_lr": 0.03, "gate_optimizer": "adam",
        "init": "baselines", "omega": None, "gate_init": 0.5, "weight_lr_scale": 0.1, "epochs": None}
    tasks = [Task("left", "binary", weight=2.0), Task("right", "binary")]
    opts = InterroGateOptions.from_section("interrogate", {"lambda_s": 3, "tau": {"left": 0, "right": 0.5}})
    assert opts.resolved(tasks) == {
        "lambda_s": 3.0, "tau": {"left": 0.0, "right": 0.5}, "sparsity": "hinge", "gate_lr": 0.03,
        "gate_optimizer": "adam", "init": "baselines", "omega": {"left": 2.0, "right": 1.0}, "gate_init": 0.5,
        "weight_lr_scale": 0.1}
    assert all(isinstance(v, float) for v in opts.resolved(tasks)["tau"].values())
    assert InterroGateOptions(omega=0.5).per_task("omega", tasks) == {"left": 0.5, "right": 0.5}


@pytest.mark.parametrize("options,match", [
    ({"tau": 1.5}, r"^interrogate\.tau must be a finite number >= 0 and <= 1, got 1\.5$"),
    ({"tau": -0.1}, r"^interrogate\.tau must be a finite number >= 0 and <= 1, got -0\.1$"),
    ({"tau": {"left": 0.1, "right": 1.5}}, r"^interrogate\.tau\.right must be .*<= 1, got 1\.5$"),
    ({"tau": {"left": 0.1, "middle": 0.2}}, r"^interrogate\.tau names unknown task.*'middle'"),
    ({"tau": {"left": 0.1}}, r"^interrogate\.tau has no value for task.*'right'"),
    ({"lambda_s": -1}, r"^interrogate\.lambda_s must be a finite number >= 0, got -1$"),
    ({"sparsity": "l2"}, r"^interrogate\.sparsity must be one of \['hinge', 'l1'\]"),
    ({"gate_optimizer": "rmsprop"}, r"^interrogate\.gate_optimizer must be one of"),
    ({"init": "imagenet"}, r"^interrogate\.init must be one of"),
    ({"omega": {"up": 1.0}}, r"^interrogate\.omega names unknown task.*'up'"),
    ({"gate_lr": 0}, r"^interrogate\.gate_lr must be a finite number > 0, got 0$"),
    ({"tau": "high"}, r"^interrogate\.tau must be a finite number .*, got 'high'$"),
    ({"epochs": 0}, r"^interrogate\.epochs must be an integer >= 1 or null, got 0$"),
    ({"weight_lr_scale": 0}, r"^interrogate\.weight_lr_scale must be a finite number > 0, got 0$"),
    ({"temperature": 1}, r"^unknown config key interrogate\.temperature"),
])
def test_bad_options_are_rejected_with_the_key_named(options, match):
    with pytest.raises(ValueError, match=match):
        InterroGateOptions.from_section("interrogate", options).check_tasks([t.name for t in TASKS])


def test_bad_option_values_fail_at_config_validation():
    from taskgrouping.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"^interrogate\.tau must be"):
        build_config(None, "planted", ["interrogate.tau=-1"])
    with pytest.raises(ConfigError, match=r"^interrogate\.lambda_s must be"):
        build_config(None, "planted", ["interrogate.lambda_s=-1"])

