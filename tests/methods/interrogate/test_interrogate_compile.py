"""InterroGate's compiled network: exact equivalence with the gated network (CNN on MultiMNIST, ViT,
ResNets, MLP), FLOPs against hand counts and the baselines, and save / reload."""

from __future__ import annotations

import json

import pytest
import torch
from interrogate_helpers import TASKS, VIT, make_gated, max_diff, mixed_gates, warm_norm_statistics

from taskgrouping.data.builtin import multimnist
from taskgrouping.flops import count_flops
from taskgrouping.methods.interrogate import load_compiled, save_compiled
from taskgrouping.models.branched import build_branched_model
from taskgrouping.tasks import Task


@pytest.fixture(scope="module")
def mnist():
    return multimnist(n_train=16, n_val=8, n_test=16, seed=0)


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

