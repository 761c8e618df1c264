"""InterroGate's compiled network: equivalence with the gated network (CNN on MultiMNIST, ViT, ResNets,
MLP; every gate pattern), FLOPs against hand counts and the baselines, how it runs (the STL networks'
computation when nothing is shared, the first layer merged, aligned widths) and save / reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from interrogate_helpers import TASKS, VIT, make_gated, max_diff, mixed_gates, warm_norm_statistics
from torch.overrides import TorchFunctionMode

from taskgrouping.data.builtin import multimnist
from taskgrouping.flops import count_flops
from taskgrouping.methods.interrogate import load_compiled, save_compiled
from taskgrouping.methods.interrogate.compiled import ALIGN, CompiledUnit, MergedUnit
from taskgrouping.methods.interrogate.pruning import concat_output_channels, pad_output_channels
from taskgrouping.models.branched import build_branched_model
from taskgrouping.models.vit import PatchEmbedding
from taskgrouping.tasks import Task


@pytest.fixture(scope="module")
def mnist():
    return multimnist(n_train=16, n_val=8, n_test=16, seed=0)


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------

def _aligned(width: int, channels: int) -> int:
    return min(-(-width // ALIGN) * ALIGN, channels)


def test_compiled_small_cnn_equals_gated_on_multimnist_and_counts_the_channels_it_computes(mnist):
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
    # The first conv reads the input every stream reads: it runs merged, T full-width copies. The others
    # run each stream's kept channels (own: G_t = 1; shared: read by some task) widened to ALIGN.
    assert isinstance(compiled.items[0], MergedUnit)
    computed = {"0.0": len(tasks) * masks["0.0"].shape[1]}
    for k in ("1.0", "2.1"):
        m = masks[k]
        computed[k] = _aligned(int((~m).any(0).sum()), m.shape[1]) + sum(_aligned(int(r.sum()), m.shape[1]) for r in m)
    expected = heads + sum(per_channel[k] * computed[k] for k in masks)
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


def test_load_compiled_rejects_missing_files_and_foreign_classes(tmp_path):
    with pytest.raises(FileNotFoundError, match="architecture.json"):
        load_compiled(tmp_path)
    net, *_ = make_gated("mlp", (8,), {"widths": (4,)}, TASKS)
    save_compiled(net.compile(), tmp_path)
    arch = json.loads((tmp_path / "architecture.json").read_text())
    arch["architecture"]["children"]["stem"]["class"] = "subprocess.Popen"
    (tmp_path / "architecture.json").write_text(json.dumps(arch))
    with pytest.raises(ValueError, match="'subprocess.Popen' is not a torch.nn, taskgrouping.models or "
                                         "taskgrouping.methods.interrogate module"):
        load_compiled(tmp_path)


def test_networks_saved_before_the_move_to_this_package_still_load(tmp_path):
    """Files written when the compiled modules lived in ``taskgrouping.models.gated`` name that module."""
    net, *_ = make_gated("mlp", (8,), {"widths": (4,)}, TASKS)
    compiled = net.compile().eval()
    save_compiled(compiled, tmp_path)
    text = (tmp_path / "architecture.json").read_text()
    assert '"taskgrouping.methods.interrogate.compiled.CompiledInterroGate"' in text
    (tmp_path / "architecture.json").write_text(text.replace("taskgrouping.methods.interrogate.compiled.",
                                                             "taskgrouping.models.gated."))
    reloaded = load_compiled(tmp_path)
    x = torch.randn(3, 8)
    with torch.no_grad():
        a, b = compiled(x), reloaded(x)
    assert all(torch.equal(a[t], b[t]) for t in a)


# --------------------------------------------------------------------------------------------
# Every gate pattern, every backbone: the compiled network's outputs are the gated network's
# --------------------------------------------------------------------------------------------

BACKBONES = [("small_cnn", (1, 28, 28), {}), ("mlp", (64,), {"widths": (32, 16)}), VIT,
             ("resnet20", (3, 16, 16), {"width": 4}), ("resnet18", (3, 16, 16), {"width": 4, "small_input": True}),
             ("tag_resnet", (3, 16, 16), {"width": 8})]


def _patterns(net, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Named gate patterns: the extremes, random fractions, layers alternating between all shared and all
    task-specific (the shared stream dies and restarts), shared early / task-specific late and the reverse."""
    points = net.gate_points()
    g = torch.Generator().manual_seed(seed)
    out = {"all task-specific": {k: torch.ones_like(p.alpha, dtype=torch.bool) for k, p in points.items()},
           "all shared": {k: torch.zeros_like(p.alpha, dtype=torch.bool) for k, p in points.items()}}
    for frac in (0.1, 0.5, 0.9):
        out[f"random {frac}"] = {k: torch.rand(p.alpha.shape, generator=g) < frac for k, p in points.items()}
    out["per layer random"] = {k: torch.rand(p.alpha.shape, generator=g) < float(torch.rand((), generator=g))
                               for k, p in points.items()}
    names = list(points)
    out["alternating"] = {k: torch.full(points[k].alpha.shape, i % 2 == 0) for i, k in enumerate(names)}
    half = len(names) // 2
    out["shared early"] = {k: torch.full(points[k].alpha.shape, i >= half) for i, k in enumerate(names)}
    out["shared late"] = {k: torch.full(points[k].alpha.shape, i < half) for i, k in enumerate(names)}
    return out


def _relative_difference(a: dict, b: dict) -> float:
    return max(float((a[t] - b[t]).abs().max() / a[t].abs().max().clamp_min(1e-12)) for t in a)


@pytest.mark.parametrize("backbone,shape,options", BACKBONES)
def test_compiled_network_equals_the_gated_one_for_every_gate_pattern(backbone, shape, options):
    tasks = [Task(f"t{i}", "binary") for i in range(4)]
    net, *_ = make_gated(backbone, shape, options, tasks)
    warm_norm_statistics(net, shape)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for point in net.gate_points().values():
            point.beta.copy_(torch.randn(point.beta.shape, generator=g))
    x = torch.randn(5, *shape, generator=g)
    for name, masks in _patterns(net, seed=3).items():
        net.set_gates(masks)
        compiled = net.compile().eval()
        with torch.no_grad():
            assert _relative_difference(net(x), compiled(x)) <= 1e-6, name


class _Calls(TorchFunctionMode):
    """Records (function, argument shapes) of every torch call that computes (not attribute reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if not name.startswith("__"):
            self.calls.append((name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def _calls(model, x) -> list[tuple[str, tuple]]:
    with torch.no_grad(), _Calls() as mode:
        model(x)
    return mode.calls


@pytest.mark.parametrize("backbone,shape,options", [("small_cnn", (1, 28, 28), {}),
                                                    ("mlp", (64,), {"widths": (32, 16)})])
def test_all_task_specific_gates_run_exactly_the_single_task_networks_computation_task_by_task(
        backbone, shape, options):
    tasks = [Task(f"t{i}", "binary") for i in range(3)]
    net, *_ = make_gated(backbone, shape, options, tasks)
    net.set_gates({k: torch.ones_like(p.alpha, dtype=torch.bool) for k, p in net.gate_points().items()})
    compiled = net.compile().eval()
    stl = build_branched_model(tasks, [[t.name] for t in tasks], shape, backbone, options).eval()
    x = torch.randn(4, *shape)
    got, reference = _calls(compiled, x), _calls(stl, x)
    assert sorted(got) == sorted(reference)  # the same calls on the same shapes
    per_task = len(got) // len(tasks)
    assert got == got[:per_task] * len(tasks)  # one task after the other, each through to its head


def test_mixed_gates_compile_to_a_merged_first_layer_and_aligned_copies(mnist):
    net, *_ = make_gated("small_cnn", mnist.input_shape, {}, mnist.tasks)
    masks = mixed_gates(net)
    compiled = net.compile().eval()
    first = compiled.items[0]
    assert isinstance(first, MergedUnit)
    # each task's merged conv is its own conv with the shared rows swapped in where G_t = 0
    g = masks["0.0"]
    shared_w = net.items[0].shared[0].weight
    for t, merged in enumerate(first.tasks):
        own_w = net.items[0].tasks[t][0].weight
        assert torch.equal(merged[0].weight, torch.where(g[t].view(-1, 1, 1, 1), own_w, shared_w))
    units = [i for i in compiled.items if isinstance(i, CompiledUnit)]
    assert units
    for unit in units:
        channels = len(unit.assembly.index_0)
        copies = ([unit.shared] if unit.has_shared else []) + [m for m, h in zip(unit.tasks, unit.has_own) if h]
        for c in copies:
            width = c[0].weight.shape[0]
            assert width % ALIGN == 0 or width == channels


def test_no_layer_merges_when_every_task_reads_only_the_shared_stream():
    net, *_ = make_gated("small_cnn", (1, 28, 28), {}, TASKS)
    net.set_gates({k: torch.zeros_like(p.alpha, dtype=torch.bool) for k, p in net.gate_points().items()})
    compiled = net.compile()
    assert not any(isinstance(i, MergedUnit) for i in compiled.items)


def test_saved_merged_and_aligned_network_reloads_with_identical_outputs(tmp_path, mnist):
    net, *_ = make_gated("small_cnn", mnist.input_shape, {}, mnist.tasks)
    mixed_gates(net)
    compiled = net.compile().eval()
    assert isinstance(compiled.items[0], MergedUnit)
    save_compiled(compiled, tmp_path / "net")
    reloaded = load_compiled(tmp_path / "net")
    assert [type(i) for i in reloaded.items] == [type(i) for i in compiled.items]
    x = mnist.test.x
    with torch.no_grad():
        a, b = compiled(x), reloaded(x)
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_networks_saved_before_merging_and_alignment_still_load_and_run(tmp_path, mnist):
    """Files written before the first layer merged and the copies were widened hold plain pruned units,
    as ``compile(kept_only=True)`` builds them, and count exactly the kept channels' FLOPs."""
    net, *_ = make_gated("small_cnn", mnist.input_shape, {}, mnist.tasks)
    masks = mixed_gates(net)
    net.eval()
    old = net.compile(kept_only=True).eval()
    assert not any(isinstance(i, MergedUnit) for i in old.items)
    per_channel = {"0.0": 2 * 9 * 196, "1.0": 2 * 16 * 9 * 49, "2.1": 2 * 1568}
    kept = {k: int(m.sum()) + int((~m).any(0).sum()) for k, m in masks.items()}
    heads = len(mnist.tasks) * 2 * 64 * 2
    assert count_flops(old, mnist.input_shape) == heads + sum(per_channel[k] * kept[k] for k in masks)
    save_compiled(old, tmp_path)
    reloaded = load_compiled(tmp_path)
    x = mnist.test.x
    with torch.no_grad():
        assert _relative_difference(net(x), reloaded(x)) <= 1e-6


@pytest.mark.parametrize("ops,shape", [
    (torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.ReLU()), (3, 8, 8)),
    (torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU()), (6,)),
    (torch.nn.Sequential(PatchEmbedding(1, (8, 8), 4, 5), torch.nn.GELU()), (1, 8, 8)),
])
def test_padded_and_concatenated_copies_compute_the_same_channels(ops, shape):
    torch.manual_seed(0)
    if isinstance(ops[1], torch.nn.BatchNorm2d):
        ops[1].running_mean.uniform_(-1, 1)
        ops[1].running_var.uniform_(0.5, 2)
    other = copy.deepcopy(ops)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    ops.eval(), other.eval()
    x = torch.randn(4, *shape)
    dim = -1 if isinstance(ops[0], PatchEmbedding) else 1
    with torch.no_grad():
        a, b = ops(x), other(x)
        padded = pad_output_channels(ops, 8).eval()(x)
        joined = concat_output_channels([ops, other]).eval()(x)
    # a wider matrix product may sum in another order: equal up to float rounding
    assert padded.shape[dim] == 8 and _relative_difference({0: a}, {0: padded.narrow(dim, 0, a.shape[dim])}) <= 1e-6
    assert torch.isfinite(padded).all()
    assert _relative_difference({0: torch.cat([a, b], dim)}, {0: joined}) <= 1e-6
