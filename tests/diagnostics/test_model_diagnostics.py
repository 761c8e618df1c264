"""Mao et al. (2024) diagnostics on a model: per-task gradients (one pass per task and the one-pass
feature gradients), measures equal to the standalone functions, and the invariant that logging
the measures leaves training bit-for-bit unchanged."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from taskgrouping.balancing.task_gradients import feature_gradients_one_pass
from taskgrouping.diagnostics import (
    DiagnosticsCallback,
    diagnose,
    feature_disentanglement,
    feature_disentanglement_from_saliency,
    gradient_direction_similarity,
    gradient_magnitude_similarity,
    plot_trajectories,
    task_gradients,
)


# -- task gradients on a model --------------------------------------------------------------------

class TinyMTL(nn.Module):
    def __init__(self, n_tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(n_tasks))

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads], z


def _losses(model, x, ys):
    preds, z = model(x)
    return {f"t{i}": ((p - y) ** 2).mean() for i, (p, y) in enumerate(zip(preds, ys))}, z


def test_task_gradients_match_manual_autograd_and_leave_grad_alone():
    torch.manual_seed(0)
    model = TinyMTL()
    x, ys = torch.randn(7, 5), [torch.randn(7) for _ in range(3)]
    shared = list(model.trunk.parameters())
    losses, z = _losses(model, x, ys)
    G = task_gradients(losses, shared)
    assert G.shape == (3, sum(p.numel() for p in shared))
    assert all(p.grad is None for p in model.parameters())
    for i in range(3):  # reference: a fresh forward and a plain .backward() per task
        ref = copy.deepcopy(model)
        _losses(ref, x, ys)[0][f"t{i}"].backward()
        manual = torch.cat([p.grad.reshape(-1) for p in ref.trunk.parameters()])
        assert torch.allclose(G[i], manual, atol=1e-6)
    # feature-level gradients: dL_i/dz is the head weight times the residual, per sample
    Gz = task_gradients(losses, z)
    preds, _ = model(x)
    for i in range(3):
        expected = (2 / 7 * (preds[i] - ys[i]))[:, None] * model.heads[i].weight
        assert torch.allclose(Gz[i].reshape(7, 6), expected.detach(), atol=1e-6)
    # the graph was retained: the training backward still works
    torch.stack(list(losses.values())).sum().backward()


def test_task_gradients_unreached_and_constant_losses():
    w = torch.ones(3, requires_grad=True)
    v = torch.ones(2, requires_grad=True)
    G = task_gradients({"a": (2 * w).sum(), "none": torch.tensor(0.5)}, [w, v])
    assert torch.equal(G, torch.tensor([[2.0, 2, 2, 0, 0], [0, 0, 0, 0, 0]]))


def test_task_gradients_errors():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="does not require grad"):
        task_gradients({"a": w.sum()}, [torch.ones(3)])
    with pytest.raises(ValueError, match="task 'a' must be a scalar"):
        task_gradients({"a": w * 2}, [w])
    loss = (w * 2).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="before the training backward"):
        task_gradients({"a": loss}, [w])


# -- callback -------------------------------------------------------------------------------------

def _train(model, callback, steps=12, seed=1):
    """A hand-rolled loop that measures from explicit tensors (``measure``) before each backward."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    grads_at_measured = []
    for step in range(steps):
        x = torch.randn(16, 5, generator=gen)
        ys = [torch.randn(16, generator=gen) for _ in range(len(model.heads))]
        opt.zero_grad(set_to_none=True)
        losses, z = _losses(model, x, ys)
        if callback is not None:
            entry = callback.measure(step, losses, list(model.trunk.parameters()), [z])
            if entry is not None:
                assert all(p.grad is None for p in model.parameters())
        torch.stack(list(losses.values())).sum().backward()
        grads_at_measured.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads_at_measured


@pytest.mark.parametrize("level", ["param", "feature"])
def test_measure_leaves_training_identical(level):
    torch.manual_seed(0)
    base = TinyMTL()
    plain, logged = copy.deepcopy(base), copy.deepcopy(base)
    cb = DiagnosticsCallback(every=3, level=level)
    g_plain = _train(plain, None)
    g_logged = _train(logged, cb)
    for a, b in zip(g_plain, g_logged):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for p, q in zip(plain.parameters(), logged.parameters()):
        assert torch.equal(p, q)
    assert [h["step"] for h in cb.history] == [0, 3, 6, 9]
    for h in cb.history:
        assert set(h) == {"step", "gds", "gms", "fd"}
        assert -1 <= h["gds"] <= 1 and 0 <= h["gms"] <= 1 and 0 <= h["fd"] <= math.log(3)


def _trainer_setup():
    """A 3-task regression problem and a one-branch model for the real trainer."""
    from taskgrouping.data.base import TensorTaskDataset, make_loader
    from taskgrouping.models.branched import build_branched_model
    from taskgrouping.tasks import Task

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g)
    tasks = [Task(f"t{i}", "regression") for i in range(3)]
    ys = {t.name: (x @ torch.randn(5, 1, generator=g)).tanh() for t in tasks}
    ds = TensorTaskDataset(x, ys)
    torch.manual_seed(0)
    model = build_branched_model(tasks, [[t.name for t in tasks]], (5,), backbone="mlp",
                                 backbone_options={"widths": [8, 6]})
    return model, tasks, make_loader(ds, 8, shuffle=True), make_loader(ds, 20, shuffle=False)


@pytest.mark.parametrize("level", ["param", "feature"])
def test_callback_in_the_trainer_leaves_training_identical(level):
    from taskgrouping.engine.trainer import TrainConfig, train

    model, tasks, tr, va = _trainer_setup()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, progress=False, device="cpu", select="last")
    plain = train(copy.deepcopy(model), tr, va, tasks, cfg, seed=5)
    cb = DiagnosticsCallback(every=2, level=level)
    logged = train(copy.deepcopy(model), tr, va, tasks, cfg, seed=5, callbacks=[cb])
    for p, q in zip(plain.model.parameters(), logged.model.parameters()):
        assert torch.equal(p, q)
    # 5 steps per epoch: measured at global steps 0, 2, 4 (epoch 0) and 6, 8 (epoch 1)
    assert [(h["step"], h["epoch"]) for h in cb.history] == [(0, 0), (2, 0), (4, 0), (6, 1), (8, 1)]
    for h in cb.history:
        assert -1 <= h["gds"] <= 1 and 0 <= h["gms"] <= 1 and 0 <= h["fd"] <= math.log(3)
    # the epoch records carry the latest entry and the epoch's mean, computed by hand here
    for epoch, rec in enumerate(logged.history):
        diag = rec["diagnostics"]
        entries = [h for h in cb.history if h["epoch"] == epoch]
        assert diag["n_measured"] == len(entries) and diag["last"] == entries[-1]
        for m in ("gds", "gms", "fd"):
            assert diag["epoch_mean"][m] == pytest.approx(sum(h[m] for h in entries) / len(entries))
    assert cb.epoch_means() == pytest.approx(logged.history[-1]["diagnostics"]["epoch_mean"])


def test_on_step_reads_the_trainer_output_and_model():
    from taskgrouping.engine.hooks import TaskLossObjective

    model, tasks, tr, _ = _trainer_setup()
    x, targets = next(iter(tr))
    out = TaskLossObjective(tasks)(model, x, targets)
    entry = DiagnosticsCallback(every=5).on_step(10, out, model, (x, targets))
    G = task_gradients(out.losses, model.shared_parameters())
    z = out.features[0]
    assert entry == pytest.approx({"step": 10, "gds": gradient_direction_similarity(G),
                                   "gms": gradient_magnitude_similarity(G),
                                   "fd": feature_disentanglement(out.losses, z)}, rel=1e-5)
    assert DiagnosticsCallback(every=5).on_step(11, out, model, (x, targets)) is None
    feat = DiagnosticsCallback(every=1, level="feature", measures=("gds",)).on_step(0, out, model)
    assert feat == pytest.approx({"step": 0, "gds": gradient_direction_similarity(task_gradients(out.losses, z))},
                                 rel=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_callback_values_equal_standalone_functions():
    torch.manual_seed(0)
    model = TinyMTL()
    losses, z = _losses(model, torch.randn(9, 5), [torch.randn(9) for _ in range(3)])
    shared = list(model.trunk.parameters())
    G = task_gradients(losses, shared)
    entry = DiagnosticsCallback(every=5).measure(10, losses, shared, [z])
    assert entry == pytest.approx({"step": 10, "gds": gradient_direction_similarity(G),
                                   "gms": gradient_magnitude_similarity(G), "fd": feature_disentanglement(losses, z)},
                                  rel=1e-5)
    feat = diagnose(losses, features={0: z}, level="feature", measures=("gds",))
    assert feat == pytest.approx({"gds": gradient_direction_similarity(task_gradients(losses, z))}, rel=1e-5)
    assert DiagnosticsCallback(every=5).measure(11, losses, shared, [z]) is None


def _one_pass(losses, feats):
    """(whether the one-pass path applied, its rows) for the losses and feature tensors."""
    out = torch.full((len(losses), sum(z.numel() for z in feats)), float("nan"))
    return feature_gradients_one_pass(out, losses, list(feats)), out


def test_one_pass_feature_gradients_equal_per_task_passes():
    torch.manual_seed(0)
    # separate heads on one feature tensor (the trainer's case): bit-for-bit the per-task rows
    model = TinyMTL(4)
    losses, z = _losses(model, torch.randn(9, 5), [torch.randn(9) for _ in range(4)])
    applied, G = _one_pass(losses, [z])
    assert applied and torch.equal(G, task_gradients(losses, z))
    # two branches (as in DMTG), each task reading both through its own layers, one head using a
    # feature twice, a loss without graph (zero row) and a leaf feature tensor (AccumulateGrad edge)
    z1, z2 = torch.randn(6, 4, requires_grad=True), torch.randn(6, 3).tanh().requires_grad_()
    w = [torch.randn(4), torch.randn(3), torch.randn(4)]
    losses = {"a": (z1 @ w[0]).square().mean() + (z2 @ w[1]).sin().sum(),
              "b": (z1 * z1 * w[2]).sum() - z2.mean(),
              "c": torch.tensor(0.3),
              "d": (z2.exp() * 0.5).sum()}
    applied, G = _one_pass(losses, [z1, z2])
    assert applied
    assert torch.allclose(G, task_gradients(losses, [z1, z2]), rtol=1e-6, atol=1e-7)
    assert torch.equal(G[2], torch.zeros(G.shape[1]))


def test_one_pass_declines_when_tasks_share_graph_nodes():
    torch.manual_seed(0)
    z = torch.randn(5, 4).requires_grad_()
    hidden = (z @ torch.randn(4, 3)).relu()  # a layer both heads share: not one pass
    shared = {"a": hidden[:, 0].sum(), "b": hidden[:, 1:].square().sum()}
    z2 = z.tanh()  # a feature computed from another: dL/dz includes the path through z2
    chained = {"a": (z * 2).sum() + z2.sum(), "b": z2.square().sum()}
    for losses, feats in ((shared, [z]), (chained, [z, z2])):
        G_before = torch.full((2, sum(f.numel() for f in feats)), float("nan"))
        assert not feature_gradients_one_pass(G_before, losses, feats)
        assert torch.isnan(G_before).all()  # declined before touching anything
        # diagnose falls back to one pass per task and matches the standalone functions
        G = task_gradients(losses, feats)
        got = diagnose(losses, features=feats, level="feature")
        assert got == pytest.approx({"gds": gradient_direction_similarity(G), "gms": gradient_magnitude_similarity(G),
                                     "fd": feature_disentanglement_from_saliency(G.abs())}, rel=1e-6)


def test_callback_buffers_reused_across_batch_sizes():
    # the callback keeps its work buffers; a smaller then a larger batch must not see stale values
    torch.manual_seed(0)
    model = TinyMTL()
    shared = list(model.trunk.parameters())
    for level in ("param", "feature"):
        cb = DiagnosticsCallback(every=1, level=level)
        for step, n in enumerate((9, 4, 9, 13)):
            losses, z = _losses(model, torch.randn(n, 5), [torch.randn(n) for _ in range(3)])
            entry = cb.measure(step, losses, shared, [z])
            fresh = diagnose(losses, shared, [z], level=level)
            assert {k: v for k, v in entry.items() if k != "step"} == fresh


def test_diagnose_after_the_training_backward_names_the_task():
    torch.manual_seed(0)
    model = TinyMTL()
    losses, z = _losses(model, torch.randn(4, 5), [torch.randn(4) for _ in range(3)])
    torch.stack(list(losses.values())).sum().backward()
    with pytest.raises(RuntimeError, match="task 't0'.*before the training backward"):
        diagnose(losses, features=[z], level="feature")


def test_callback_config_errors_and_state_roundtrip():
    from taskgrouping.engine.hooks import StepOutput

    with pytest.raises(ValueError, match="every"):
        DiagnosticsCallback(every=0)
    with pytest.raises(ValueError, match="level"):
        DiagnosticsCallback(level="layer")
    with pytest.raises(ValueError, match="unknown measure"):
        DiagnosticsCallback(measures=("gds", "pcgrad"))
    w = torch.ones(3, requires_grad=True)
    losses = {"a": w.sum(), "b": (2 * w).sum()}
    with pytest.raises(ValueError, match="features are needed"):
        DiagnosticsCallback().measure(0, losses, [w], None)
    with pytest.raises(ValueError, match="Linear has no shared_parameters"):
        DiagnosticsCallback().on_step(0, StepOutput(losses, {0: w}), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="step output of Linear has none"):
        DiagnosticsCallback(level="feature").on_step(0, StepOutput(losses), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="StepOutput"):
        DiagnosticsCallback().on_step(0, losses, nn.Linear(2, 2))
    cb = DiagnosticsCallback(every=2, level="feature", measures=("gds", "fd"))
    cb.history = [{"step": 0, "gds": 0.5, "fd": 0.3, "epoch": 0}, {"step": 2, "gds": 0.4, "fd": 0.2}]
    resumed = DiagnosticsCallback(every=2, level="feature", measures=("gds", "fd"))
    resumed.load_state_dict(cb.state_dict())
    assert resumed.history == cb.history
    # the untagged entry belongs to the running epoch: the next epoch end tags it alone
    assert resumed.on_epoch_end(1)["diagnostics"]["n_measured"] == 1
    assert resumed.epoch_means(1) == {"gds": 0.4, "fd": 0.2} and resumed.epoch_means(0) == {"gds": 0.5, "fd": 0.3}
    with pytest.raises(ValueError, match="level 'feature'"):
        DiagnosticsCallback(level="param", measures=("gds", "fd")).load_state_dict(cb.state_dict())


def test_plots_written(tmp_path):
    cb = DiagnosticsCallback(every=1)
    cb.history = [{"step": s, "gds": 0.1 * s, "gms": 0.9, "fd": 1.0 - 0.05 * s} for s in range(5)]
    single = cb.plot(tmp_path / "one.png")
    assert single.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and single.stat().st_size > 1000
    other = [{"step": s, "gds": -0.1 * s, "gms": 0.5, "fd": 0.8} for s in range(0, 5, 2)]
    multi = plot_trajectories({"naive": cb.history, "grouped": other}, tmp_path / "sub" / "multi.pdf")
    assert multi.read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="entry 0 has no 'step'"):
        plot_trajectories({"bad": [{"gds": 1.0}]}, tmp_path / "bad.png")
