"""InterroGate: gate primitives against hand-computed values, invariants of the gated network,
exact equivalence of the compiled network (CNN on MultiMNIST, ViT, ResNets), FLOPs against
hand counts and the baselines, save / reload, an end-to-end run and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from taskgrouping.data.builtin import multimnist
from taskgrouping.methods.interrogate import (InterroGateObjective, interrogate_sweep, parse_options,
                                              sparsity_loss, summarise_sweep, sweep_table)
from taskgrouping.models.backbones import build_backbone, output_shape
from taskgrouping.models.branched import build_branched_model
from taskgrouping.models.gated import (GatedNetwork, build_gated_network, count_flops, gate_select, load_compiled,
                                       mix_streams, save_compiled, straight_through_gate)
from taskgrouping.models.heads import make_head
from taskgrouping.tasks import Task

torch.set_num_threads(1)

VIT = ("vit", (1, 28, 28), {"patch_size": 7, "dim": 24, "depth": 2, "heads": 2})


@pytest.fixture(scope="module")
def mnist():
    return multimnist(n_train=16, n_val=8, n_test=16, seed=0)


def make_gated(backbone: str, shape: tuple, options: dict, tasks: list[Task], seed: int = 0):
    """A gated network whose shared and task streams are independently initialised backbones."""
    torch.manual_seed(seed)
    shared = build_backbone(backbone, shape, **options)
    branches = {t.name: build_backbone(backbone, shape, **options) for t in tasks}
    feat = output_shape(shared, shape)
    heads = {t.name: make_head(t, feat, shape) for t in tasks}
    return build_gated_network(shared, branches, heads), shared, branches, heads


def mixed_gates(net: GatedNetwork, seed: int = 1) -> dict[str, torch.Tensor]:
    """Task 0 fully task-specific, task 1 fully shared, the others a random half; random β."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, point in net.gate_points().items():
        m = torch.rand(point.alpha.shape, generator=g) > 0.5
        m[0], m[1] = True, False
        masks[name] = m
        with torch.no_grad():
            point.beta.copy_(torch.randn(point.beta.shape, generator=g))
    net.set_gates(masks)
    return masks


def warm_norm_statistics(net: nn.Module, shape: tuple) -> None:
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, *shape))
    net.eval()


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[t] - b[t]).detach().abs().max()) for t in a)


# --------------------------------------------------------------------------------------------
# Gate primitives (hand-computed)
# --------------------------------------------------------------------------------------------

def test_straight_through_gate_forward_is_hard_and_gradient_is_sigmoid_derivative():
    alpha = torch.tensor([[2.0, 0.0], [-1.0, 0.5]], requires_grad=True)
    own = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]]])  # (T=2, B=1, C=2)
    shared = torch.tensor([[0.5, 4.0]])
    weights = torch.tensor([[1.0, -2.0]])  # loss = sum(weights * φ'_t) over tasks
    gates = straight_through_gate(alpha)
    # σ(0) = 0.5 is not > 0.5, so α = 0 selects the shared channel.
    assert gates.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    out = [gate_select(gates[t], own[t], shared, dim=1) for t in range(2)]
    assert out[0].tolist() == [[1.0, 4.0]] and out[1].tolist() == [[0.5, -1.0]]
    sum((weights * o).sum() for o in out).backward()

    def dsig(a: float) -> float:
        s = 1 / (1 + math.exp(-a))
        return s * (1 - s)

    # dL/dα_tc = σ'(α_tc) · (φ_tc − ψ_c) · w_c
    expected = [[dsig(2.0) * (1.0 - 0.5) * 1.0, dsig(0.0) * (2.0 - 4.0) * -2.0],
                [dsig(-1.0) * (3.0 - 0.5) * 1.0, dsig(0.5) * (-1.0 - 4.0) * -2.0]]
    assert alpha.grad.flatten().tolist() == pytest.approx([v for row in expected for v in row], rel=1e-6)


def test_beta_mixing_is_a_per_channel_softmax_over_tasks():
    beta = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])  # C=2, T=2
    streams = [torch.tensor([[1.0, 10.0]]), torch.tensor([[5.0, 20.0]])]
    mixed = mix_streams(streams, torch.softmax(beta, dim=1), dim=1)
    # channel 0: weights (1/4, 3/4); channel 1: weights (4/5, 1/5)
    assert mixed[0].tolist() == pytest.approx([0.25 * 1 + 0.75 * 5, 0.8 * 10 + 0.2 * 20])


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


# --------------------------------------------------------------------------------------------
# Invariants of the gated network
# --------------------------------------------------------------------------------------------

def test_all_task_specific_gates_reproduce_the_single_task_networks_and_cut_the_shared_branch(mnist):
    net, shared, branches, heads = make_gated("small_cnn", mnist.input_shape, {}, mnist.tasks[:3])
    net.set_gates({k: torch.ones_like(g.alpha, dtype=torch.bool) for k, g in net.gate_points().items()})
    x = mnist.test.x[:8]
    out = net(x)
    for t in mnist.tasks[:3]:
        assert torch.equal(out[t.name], heads[t.name](branches[t.name](x)))
    sum(o.square().sum() for o in out.values()).backward()
    shared_grads = [p.grad for item in net.items if hasattr(item, "shared") for p in item.shared.parameters()]
    assert shared_grads and all(g is None or not g.any() for g in shared_grads)


@pytest.mark.parametrize("backbone,shape,options", [("small_cnn", (1, 28, 28), {}), VIT])
def test_all_shared_gates_reproduce_the_shared_network(backbone, shape, options):
    tasks = [Task(f"t{i}", "binary") for i in range(3)]
    net, shared, _, heads = make_gated(backbone, shape, options, tasks)
    net.set_gates({k: torch.zeros_like(g.alpha, dtype=torch.bool) for k, g in net.gate_points().items()})
    x = torch.randn(4, *shape)
    out = net(x)
    z = shared(x)
    # the β mixture of identical streams only re-rounds (Σ_t w_t = 1)
    assert max_diff(out, {t.name: heads[t.name](z) for t in tasks}) < 1e-5


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------

def test_compiled_small_cnn_equals_gated_on_multimnist_and_counts_only_kept_channels(mnist):
    tasks = mnist.tasks
    net, *_ = make_gated("small_cnn", mnist.input_shape, {}, tasks)
    masks = mixed_gates(net)
    net.eval()
    compiled = net.compile().eval()
    x = mnist.test.x
    with torch.no_grad():
        assert max_diff(net(x), compiled(x)) <= 1e-5
    # small_cnn on 1x28x28 (FlopCounter: 2 FLOPs per multiply-add, biases not counted), per output channel:
    # conv 1->16 3x3/2 -> 14x14: 2*9*196; conv 16->32 3x3/2 -> 7x7: 2*16*9*49; linear 1568->64: 2*1568.
    per_channel = {"0.0": 2 * 9 * 196, "1.0": 2 * 16 * 9 * 49, "2.1": 2 * 1568}
    assert set(masks) == set(per_channel)
    heads = len(tasks) * 2 * 64 * 2
    kept = {k: int(m.sum()) + int((~m).any(0).sum()) for k, m in masks.items()}
    expected = heads + sum(per_channel[k] * kept[k] for k in masks)
    assert count_flops(compiled, mnist.input_shape) == expected
    gated_flops = heads + sum(per_channel[k] * (len(tasks) + 1) * m.shape[1] for k, m in masks.items())
    assert count_flops(net, mnist.input_shape) == gated_flops > expected


def test_compiled_vit_equals_gated():
    backbone, shape, options = VIT
    tasks = [Task(f"t{i}", "binary") for i in range(4)]
    net, *_ = make_gated(backbone, shape, options, tasks)
    assert [k for k in net.gate_points() if k.startswith("1.")] == [
        "1.attn.q", "1.attn.k", "1.attn.v", "1.attn.out", "1.ffn.fc1", "1.ffn.fc2"]
    mixed_gates(net)
    net.eval()
    compiled = net.compile().eval()
    x = torch.randn(6, *shape)
    with torch.no_grad():
        assert max_diff(net(x), compiled(x)) <= 1e-5
    assert count_flops(compiled, shape) < count_flops(net, shape)


@pytest.mark.parametrize("backbone,shape,options", [
    ("resnet20", (3, 16, 16), {"width": 4}),                       # zero-padding shortcuts
    ("resnet18", (3, 16, 16), {"width": 4, "small_input": True}),  # projection shortcuts
    ("tag_resnet", (3, 16, 16), {"width": 8}),                     # conv stem + max pool, block + pool + flatten
    ("mlp", (64,), {"widths": (32, 16)}),
])
def test_compiled_resnets_and_mlp_equal_gated(backbone, shape, options):
    tasks = [Task(f"t{i}", "binary") for i in range(3)]
    net, *_ = make_gated(backbone, shape, options, tasks)
    warm_norm_statistics(net, shape)
    mixed_gates(net)
    compiled = net.compile().eval()
    x = torch.randn(5, *shape)
    with torch.no_grad():
        assert max_diff(net(x), compiled(x)) <= 1e-5


def test_extreme_gates_compile_to_exactly_the_stl_and_naive_mtl_costs(mnist):
    tasks = mnist.tasks[:4]
    names = [t.name for t in tasks]
    shape = mnist.input_shape
    net, *_ = make_gated("small_cnn", shape, {}, tasks)
    stl = build_branched_model(tasks, [[n] for n in names], shape, "small_cnn")
    mtl = build_branched_model(tasks, [names], shape, "small_cnn")
    net.set_gates({k: torch.ones_like(g.alpha, dtype=torch.bool) for k, g in net.gate_points().items()})
    assert count_flops(net.compile(), shape) == count_flops(stl, shape)
    net.set_gates({k: torch.zeros_like(g.alpha, dtype=torch.bool) for k, g in net.gate_points().items()})
    assert count_flops(net.compile(), shape) == count_flops(mtl, shape)


def test_a_few_training_steps_with_sparsity_prune_below_the_gated_and_stl_cost(mnist):
    tasks = mnist.tasks[:3]
    shape = mnist.input_shape
    net, *_ = make_gated("small_cnn", shape, {}, tasks)
    opts = parse_options({"lambda_s": 50.0, "tau": 0.0, "gate_lr": 0.5, "gate_optimizer": "adam"}, tasks)
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


def test_saved_compiled_network_reloads_on_its_own_with_identical_outputs(tmp_path):
    backbone, shape, options = VIT
    tasks = [Task("a.b", "binary"), Task("c", "regression")]
    net, *_ = make_gated(backbone, shape, options, tasks)
    mixed_gates(net)
    compiled = net.compile().eval()
    save_compiled(compiled, tmp_path / "net")
    arch = json.loads((tmp_path / "net" / "architecture.json").read_text())
    assert arch["task_names"] == ["a.b", "c"]
    reloaded = load_compiled(tmp_path / "net")
    x = torch.randn(3, *shape)
    with torch.no_grad():
        a, b = compiled(x), reloaded(x)
    assert all(torch.equal(a[t], b[t]) for t in a)


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
    opts = parse_options({"gate_optimizer": "adam"}, tasks)
    obj = InterroGateObjective(net, tasks, opts)
    out = obj(net, torch.randn(4, 8), {"a": torch.tensor([0, 1, 0, 1]), "b": torch.tensor([1, 1, 0, 0])})
    (sum(out.losses.values()) + out.extra_loss).backward()
    obj.after_step()
    state = json.loads(json.dumps(obj.state_dict()))
    other = InterroGateObjective(net, tasks, opts)
    other.load_state_dict(state)
    a, b = obj.gate_optimizer.state_dict()["state"], other.gate_optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_sweep_summary_averages_seeds_and_answers_the_two_questions():
    def run(seed, d_mtl, points):
        return {"seed": seed, "single_task": {"delta_mtl": 0.0, "flops": 100.0, "params": 10},
                "naive_mtl": {"delta_mtl": d_mtl, "flops": 20.0, "params": 2},
                "interrogate": {f"{lam:g}": {"delta_mtl": d, "flops": f, "params": 5,
                                             "task_specific_fraction": {"a": fr, "b": fr}}
                                for lam, (d, f, fr) in points.items()}}

    runs = [run(0, 0.01, {0.1: (0.03, 90.0, 0.9), 1.0: (0.00, 50.0, 0.5), 10.0: (-0.02, 60.0, 0.2)}),
            run(1, 0.03, {0.1: (0.05, 110.0, 0.7), 1.0: (0.02, 50.0, 0.3), 10.0: (-0.04, 20.0, 0.0)})]
    s = summarise_sweep(runs, [0.1, 1.0, 10.0])
    assert s["naive_mtl"]["delta_mtl"] == pytest.approx(0.02)
    p = {x["lambda_s"]: x for x in s["interrogate"]}
    assert p[0.1]["delta_mtl"] == pytest.approx(0.04) and p[0.1]["delta_mtl_std"] == pytest.approx(math.sqrt(2e-4))
    assert p[0.1]["flops"] == pytest.approx(100.0) and p[1.0]["task_specific_fraction"] == pytest.approx(0.4)
    # λ=0.1: Δ 0.04 ≥ 0.02 at 100 ≤ 100 FLOPs; λ=1: Δ 0.01 < 0.02; λ=10: Δ < 0
    assert s["answers"]["point_beating_naive_mtl_within_stl_flops"] == [0.1]
    assert s["answers"]["flops_monotone_nonincreasing_in_lambda"]  # 100, 50, 40
    runs[0]["interrogate"]["10"]["flops"] = 90.0  # mean 55 > 50
    assert not summarise_sweep(runs, [0.1, 1.0, 10.0])["answers"]["flops_monotone_nonincreasing_in_lambda"]
    assert "| InterroGate λ_s=0.1 | +4.00 ± 1.41 |" in sweep_table(s)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

TASKS = [Task("left", "binary"), Task("right", "binary")]


@pytest.mark.parametrize("options,match", [
    ({"tau": 1.5}, r"tau .*'left'.*1\.5.*outside \[0\.0, 1\.0\]"),
    ({"tau": -0.1}, r"outside \[0\.0, 1\.0\]"),
    ({"tau": {"left": 0.1, "middle": 0.2}}, r"tau names unknown task.*'middle'"),
    ({"tau": {"left": 0.1}}, r"tau has no value for task.*'right'"),
    ({"lambda_s": -1}, r"lambda_s must be >= 0"),
    ({"sparsity": "l2"}, r"sparsity must be one of \['hinge', 'l1'\]"),
    ({"gate_optimizer": "rmsprop"}, r"gate_optimizer must be one of"),
    ({"init": "imagenet"}, r"init must be one of"),
    ({"omega": {"up": 1.0}}, r"omega names unknown task.*'up'"),
    ({"gate_lr": 0}, r"gate_lr must be > 0"),
    ({"tau": "high"}, r"tau must be a number"),
    ({"temperature": 1}, r"unknown interrogate option"),
])
def test_bad_options_are_rejected_with_the_key_named(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options(options, TASKS)


def test_backbone_without_gateable_layers_is_rejected():
    heads = {t.name: nn.Linear(4, 2) for t in TASKS}
    plain = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(ValueError, match="no layer to gate"):
        build_gated_network(plain, {t.name: plain for t in TASKS}, heads)
    odd = nn.Sequential(nn.Conv1d(1, 4, 3))
    with pytest.raises(ValueError, match=r"cannot gate layer '0' \(Conv1d\)"):
        build_gated_network(odd, {t.name: odd for t in TASKS}, heads)
    with pytest.raises(ValueError, match="does not have the shared branch's architecture"):
        build_gated_network(nn.Sequential(nn.Linear(4, 4)),
                            {"left": nn.Sequential(nn.Linear(4, 4)), "right": nn.Sequential(nn.Linear(4, 5))}, heads)


def test_forcing_unknown_or_misshaped_gates_is_rejected():
    net, *_ = make_gated("mlp", (8,), {"widths": (4,)}, TASKS)
    with pytest.raises(ValueError, match="unknown gated layer 'nope'"):
        net.set_gates({"nope": torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"must have shape \(2, 4\)"):
        net.set_gates({"0.1": torch.ones(3, 4, dtype=torch.bool)})


def test_load_compiled_rejects_missing_files_and_foreign_classes(tmp_path):
    with pytest.raises(FileNotFoundError, match="architecture.json"):
        load_compiled(tmp_path)
    net, *_ = make_gated("mlp", (8,), {"widths": (4,)}, TASKS)
    save_compiled(net.compile(), tmp_path)
    arch = json.loads((tmp_path / "architecture.json").read_text())
    arch["architecture"]["children"]["stem"]["class"] = "subprocess.Popen"
    (tmp_path / "architecture.json").write_text(json.dumps(arch))
    with pytest.raises(ValueError, match="'subprocess.Popen' is not a torch.nn or taskgrouping.models module"):
        load_compiled(tmp_path)


@pytest.mark.parametrize("lambdas,seeds,match", [
    ((), (0,), "at least one lambda_s"),
    ((0.1, -0.2), (0,), "numbers >= 0"),
    ((0.1,), (), "at least one seed"),
    ((0.1,), (1.5,), "seeds must be integers"),
])
def test_sweep_rejects_bad_arguments_before_training(tmp_path, lambdas, seeds, match):
    with pytest.raises(ValueError, match=match):
        interrogate_sweep({"data": {"name": "digits"}}, lambdas, seeds, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()
