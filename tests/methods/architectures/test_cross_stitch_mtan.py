"""Cross-stitch (Misra et al. 2016) and MTAN (Liu et al. 2019) baselines.

Pinned against invariants: identity cross-stitch units make the network the independent
single-task networks (same outputs, same training); MTAN with every attention mask at 1 reads the
shared backbone's features, i.e. is naive MTL; the features both networks hand to feature-level
balancers form a cut of the graph, so feature-level EW reproduces plain back-propagation; a
hand-computed cross-stitch mix. Plus both methods end to end through run_experiment on digits.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from taskgrouping.balancing.base import get_balancer
from taskgrouping.config import build_config
from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.experiment import run_experiment
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext
from taskgrouping.methods.architectures.cross_stitch import CrossStitchObjective, CrossStitchUnit, build_cross_stitch, stitch_init

from taskgrouping.methods.architectures.mtan import build_mtan
from taskgrouping.tasks import Task
from taskgrouping.engine.hooks import TaskLossObjective
from taskgrouping.engine.trainer import TrainConfig, train

BACKBONES = {  # name -> (input shape, options); small enough to build in milliseconds
    "mlp": ((12,), {"widths": [10, 6]}),
    "small_cnn": ((1, 12, 12), {"channels": [4, 6], "feature_dim": 8}),
    "tag_resnet": ((3, 8, 8), {"width": 4}),
    "vit": ((3, 8, 8), {"patch_size": 4, "dim": 8, "depth": 2, "heads": 2}),
}


def _context(backbone: str, shared_blocks: int = 0, n: int = 24, epochs: int = 1) -> MethodContext:
    shape, options = BACKBONES[backbone]
    g = torch.Generator().manual_seed(7)
    tasks = [Task("a", "binary"), Task("b", "regression"), Task("c", "multiclass", num_classes=3)]

    def split() -> TensorTaskDataset:
        x = torch.randn(n, *shape, generator=g)
        return TensorTaskDataset(x, {"a": torch.randint(0, 2, (n,), generator=g), "b": torch.randn(n, 1, generator=g),
                                     "c": torch.randint(0, 3, (n,), generator=g)})

    data = TaskData("toy", tasks, split(), split(), split(), input_shape=shape)
    return MethodContext(data=data, seed=3, K=1, model={"backbone": backbone, "options": options,
                                                        "shared_blocks": shared_blocks},
                         train=TrainConfig(epochs=epochs, batch_size=8, lr=0.01, progress=False, device="cpu"),
                         balancer={"name": "ew"}, options={}, name="test")


def _batch(ctx: MethodContext):
    return next(iter(ctx.loaders()[0]))


# -- cross-stitch ---------------------------------------------------------------------------------

def test_stitch_unit_hand_computed_mix():
    assert torch.allclose(stitch_init(3, 0.9), torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05],
                                                             [0.05, 0.05, 0.9]]))
    unit = CrossStitchUnit(2, channels=2, axis=1)
    with torch.no_grad():
        unit.alpha.copy_(torch.tensor([[[1.0, 0.5], [2.0, 0.0]], [[0.0, 1.0], [-1.0, 3.0]]]))  # [i, j, channel]
    x0 = torch.tensor([[1.0, 2.0]])
    x1 = torch.tensor([[10.0, 20.0]])
    out0, out1 = unit([x0, x1])
    # channel 0: out0 = 1*1 + 2*10, out1 = 0*1 - 1*10; channel 1: out0 = 0.5*2 + 0*20, out1 = 1*2 + 3*20
    assert torch.equal(out0, torch.tensor([[21.0, 1.0]])) and torch.equal(out1, torch.tensor([[-10.0, 62.0]]))
    layer = CrossStitchUnit(2, channels=5, axis=1, init_self=0.75, granularity="layer")
    assert torch.allclose(layer([x0, x1])[0], 0.75 * x0 + 0.25 * x1)


@pytest.mark.parametrize("backbone,shared_blocks", [("mlp", 0), ("small_cnn", 0), ("small_cnn", 1), ("vit", 0)])
def test_identity_cross_stitch_equals_independent_single_task_networks(backbone, shared_blocks):
    ctx = _context(backbone, shared_blocks)
    names = ctx.data.task_names
    stl = ctx.build_model(Grouping.partition([[t] for t in names]))  # what method single_task trains
    cs = build_cross_stitch(ctx, init_self=1.0)
    for u in cs.stitches:
        assert torch.equal(u.alpha, torch.eye(3).unsqueeze(-1).expand_as(u.alpha))
        u.alpha.requires_grad_(False)
    x, _ = _batch(ctx)
    stl.eval(), cs.eval()
    a, b = stl(x), cs(x)
    # equal up to float rounding (the mixed activations reach the BLAS kernels with another memory layout)
    assert all(torch.allclose(a[t], b[t], rtol=0, atol=1e-6) for t in names)
    # training with the units held at the identity is training the single-task networks
    # (SGD: Adam would blow the rounding noise of parameters with zero true gradient, such as the
    # ViT's attention key bias, up to full-size steps)
    stl.train(), cs.train()
    tr, va, _ = ctx.loaders()
    sgd = TrainConfig(epochs=1, batch_size=8, optimizer="sgd", lr=0.05, progress=False, device="cpu")
    r_stl = train(stl, tr, va, ctx.data.tasks, sgd, seed=1)
    r_cs = train(cs, tr, va, ctx.data.tasks, sgd, seed=1,
                 objective=CrossStitchObjective(ctx.data.tasks, ctx.train.lr, 10.0))
    for k, t in enumerate(names):
        col = [p for blk in r_cs.model.columns[k] for p in blk.parameters()]
        branch = list(r_stl.model.branches[r_stl.model.serves[t]].parameters())
        assert len(col) == len(branch) and all(torch.allclose(p, q, atol=1e-6) for p, q in zip(col, branch))
    r_cs.model.eval(), r_stl.model.eval()
    a, b = r_stl.model(x), r_cs.model(x)
    assert all(torch.allclose(a[t], b[t], atol=1e-5) for t in names)


def test_cross_stitch_mixes_tasks_and_units_get_their_learning_rate():
    ctx = _context("mlp")
    cs = build_cross_stitch(ctx)  # 0.9 / 0.05 init: every task's loss reaches every column
    x, targets = _batch(ctx)
    out = TaskLossObjective(ctx.data.tasks)(cs, x, targets)
    g = torch.autograd.grad(out.losses["a"], list(cs.columns[2].parameters()))
    assert all(v.abs().sum() > 0 for v in g)
    groups = CrossStitchObjective(ctx.data.tasks, 0.01, 100.0).param_groups(cs)
    assert groups[1]["lr"] == pytest.approx(1.0) and len(groups[1]["params"]) == len(cs.stitches)
    n_all = sum(1 for p in cs.parameters())
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_all


# -- MTAN -----------------------------------------------------------------------------------------

def _force_attention_to_one(net) -> None:
    """Last layer of every attention module: weight 0, bias 30, so sigmoid gives exactly 1.0 (float32)."""
    with torch.no_grad():
        for per_task in net.attention:
            for g in per_task:
                last = [m for m in g if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
                last.weight.zero_()
                last.bias.fill_(30.0)


@pytest.mark.parametrize("backbone,shared_blocks", [("mlp", 0), ("small_cnn", 0), ("small_cnn", 1),
                                                    ("tag_resnet", 0), ("vit", 1)])
def test_mtan_with_attention_one_is_the_shared_backbone(backbone, shared_blocks):
    ctx = _context(backbone, shared_blocks)
    naive = ctx.build_model(Grouping.partition([ctx.data.task_names]))  # what method naive_mtl trains
    net = build_mtan(ctx)
    _force_attention_to_one(net)
    x, _ = _batch(ctx)
    naive.eval(), net.eval()
    shared = naive.features(x)[0]
    feats = net.task_features(x)
    assert set(feats) == set(ctx.data.task_names)
    assert all(torch.equal(f, shared) for f in feats.values())
    a, b = naive(x), net(x)
    assert all(torch.equal(a[t], b[t]) for t in ctx.data.task_names)
    # with real (random) attention the tasks read different features
    other = build_mtan(ctx).eval()
    f = other.task_features(x)
    assert not torch.allclose(f["a"], f["b"])


# -- the features both networks expose are a cut: feature-level EW = plain back-propagation -------

@pytest.mark.parametrize("method", ["cross_stitch", "mtan"])
@pytest.mark.parametrize("backbone", ["mlp", "small_cnn"])
def test_feature_level_ew_reproduces_plain_backprop(method, backbone):
    ctx = _context(backbone)
    net = build_cross_stitch(ctx) if method == "cross_stitch" else build_mtan(ctx)
    twin = copy.deepcopy(net)
    x, targets = _batch(ctx)
    objective = TaskLossObjective(ctx.data.tasks)
    out = objective(net, x, targets)
    assert out.features and all(f.requires_grad for f in out.features.values())
    get_balancer("ew", feature_level=True).backward(out.losses, net.shared_parameters(), list(out.features.values()))
    ref = objective(twin, x, targets)
    torch.stack(list(ref.losses.values())).sum().backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-6), name


# -- end to end -----------------------------------------------------------------------------------

def test_both_methods_through_run_experiment_on_digits(tmp_path):
    cfg = build_config(None, "digits", ["methods=[cross_stitch,mtan,single_task]", "train.epochs=2",
                                        "cross_stitch.init_self=0.8", "model.options.widths=[16,8]"])
    summary = run_experiment(cfg, tmp_path / "run", echo=lambda s: None)
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    tasks = summary["dataset"]["tasks"]
    for name in ("cross_stitch", "mtan"):
        rec = stored["methods"][name]
        assert rec["grouping"] == [tasks] and rec["n_networks"] == 1 and "not a grouping method" in rec["note"]
        assert set(rec["per_task"]) == set(tasks)
        for t in tasks:
            assert 0 <= rec["per_task"][t]["error"] <= 1 and math.isfinite(rec["per_task"][t]["loss"])
        assert math.isfinite(rec["delta_mtl"]) and math.isfinite(rec["mean_rank"])
        assert rec["epochs_run"] == 2 and (tmp_path / "run" / "models" / f"{name}.safetensors").is_file()
    alpha = stored["methods"]["cross_stitch"]["stitch_alpha"]
    assert len(alpha) == 2 and all(len(a) == 4 and all(len(r) == 4 for r in a) for a in alpha)
    assert stored["methods"]["cross_stitch"]["options"]["init_self"] == 0.8
    attn = stored["methods"]["mtan"]["mean_attention"]
    assert set(attn) == set(tasks) and all(len(v) == 2 and all(0 < m < 1 for m in v) for v in attn.values())


def test_bad_options_are_named():
    from taskgrouping.config import ConfigError
    from taskgrouping.methods.architectures.cross_stitch import cross_stitch

    ctx = _context("mlp")
    ctx.options = {"init_self": 1.5}
    with pytest.raises(ValueError, match="cross_stitch.init_self"):
        cross_stitch(ctx)
    with pytest.raises(ConfigError, match="cross_stitch.alpha"):
        build_config(None, "digits", ["cross_stitch.alpha=1"])
    ctx = _context("mlp", shared_blocks=2)
    with pytest.raises(ValueError, match="shared_blocks"):
        build_mtan(ctx)


@pytest.mark.parametrize("method", ["cross_stitch", "mtan"])
def test_a_task_without_a_label_in_the_batch_costs_no_head(method):
    """A long table's batch labels a few tasks: the absent task's head (and MTAN's attention modules for
    it) are not run, its loss is a constant 0, and the other losses equal the full computation."""
    ctx = _context("mlp")
    net = build_cross_stitch(ctx) if method == "cross_stitch" else build_mtan(ctx)
    x, y = _batch(ctx)
    full = TaskLossObjective(ctx.data.tasks)(net, x, y).losses
    calls = []
    modules = [net.heads[1]] + (list(net.attention[1]) if method == "mtan" else [])
    for m in modules:
        m.register_forward_hook(lambda *_: calls.append(1))
    y = dict(y, b=torch.full_like(y["b"], float("nan")))
    sparse = TaskLossObjective(ctx.data.tasks)(net, x, y).losses
    assert calls == [] and sparse["b"].item() == 0.0 and not sparse["b"].requires_grad
    for t in ("a", "c"):
        assert torch.allclose(sparse[t], full[t], atol=1e-6), t
