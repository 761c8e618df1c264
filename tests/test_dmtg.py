"""DMTG: the loss is sum_k Z_ik L_ik, the pruned model answers exactly like the selected heads, gradient
scaling scales gradients, head pruning keeps the argmax head, and bad options fail clearly."""

import math

import pytest
import torch
import torch.nn.functional as F

from taskgrouping.data.builtin import planted
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext
from taskgrouping.methods.dmtg import (DMTGModel, DMTGObjective, cluster_prior, dmtg, label_affinity,
                                       resolve_options, scale_grad)
from taskgrouping.models.branched import build_branched_model, load_branched, save_branched
from taskgrouping.engine.trainer import TrainConfig


def _data():
    return planted(n_tasks=4, group_sizes=[2, 2], input_dim=8, feature_dim=3, n_train=96, n_val=48, n_test=48)


def _model(data, K=2, s=None, scaling="none"):
    torch.manual_seed(0)
    net = build_branched_model(data.tasks, [data.task_names] * K, data.input_shape, backbone="mlp",
                               backbone_options={"widths": [8, 4]})
    s = torch.zeros(len(data.tasks), K) if s is None else s
    return DMTGModel(net, data.task_names, s, scaling)


def test_loss_is_gumbel_weighted_sum_of_head_losses():
    data = _data()
    model = _model(data, s=torch.tensor([[1.0, -1.0], [0.0, 0.5], [2.0, 0.0], [0.0, 0.0]]))
    opts = resolve_options({"recipe": "paper", "tau": 0.7})
    x, y = data.train[list(range(16))]
    torch.manual_seed(11)
    out = DMTGObjective(data.tasks, opts)(model, x, y)
    torch.manual_seed(11)
    preds, _ = model.forward_heads(x)
    z = F.gumbel_softmax(model.S, tau=0.7, dim=1)
    for i, t in enumerate(data.task_names):
        expected = sum(z[i, k] * data.task(t).loss(preds[(k, t)], y[t]) for k in range(2))
        assert out.losses[t].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["softmax", "probe"])
def test_warmup_weighs_head_losses_by_softmax_then_samples(mode):
    """While S is held fixed (warm-up), ``warmup=softmax`` and ``warmup=probe`` weigh head (k, i)'s loss by
    softmax(S/tau) (no Gumbel draw: nothing about S is being learnt yet, and a draw puts about twice the
    softmax mass on other groups' heads); after the warm-up the Gumbel sample returns."""
    data = _data()
    model = _model(data, s=torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]))
    obj = DMTGObjective(data.tasks, resolve_options({"warmup": mode, "s_warmup_epochs": 2, "tau": 0.5}))
    x, y = data.train[list(range(16))]
    preds, _ = model.forward_heads(x)
    w = torch.softmax(model.S / 0.5, dim=1)
    obj.on_epoch_start(1, model)
    assert not model.S.requires_grad
    out = obj(model, x, y)
    for i, t in enumerate(data.task_names):
        expected = sum(w[i, k] * data.task(t).loss(preds[(k, t)], y[t]) for k in range(2))
        assert out.losses[t].item() == pytest.approx(expected.item(), rel=1e-6)
    obj.on_epoch_start(2, model)
    assert model.S.requires_grad
    first, second = (obj(model, x, y).losses[data.task_names[0]].item() for _ in range(2))
    assert first != second  # a fresh Gumbel draw per step


def _unfused(model: DMTGModel) -> DMTGModel:
    """The same weights with every head wrapped in a Sequential, so the per-head (not fused) path runs."""
    net = model.net
    for hs in net.heads:
        for j in range(len(hs)):
            hs[j] = torch.nn.Sequential(hs[j]).requires_grad_(True)
    out = DMTGModel(net, model.task_names, model.S.detach(), "none")
    assert not out.fused
    return out


@pytest.mark.parametrize("fused", [True, False])
def test_probe_warmup_trains_branches_only_through_assigned_heads(fused):
    """``warmup=probe``: the branches get exactly the gradient of the assigned heads' weighted losses (what
    training the initial grouping gives them); every head, assigned or not, gets its full gradient."""
    data = _data()
    s = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])  # task 3 assigned to branch 0
    model = _model(data, s=s)
    model = model if fused else _unfused(model)
    obj = DMTGObjective(data.tasks, resolve_options({"warmup": "probe", "s_warmup_epochs": 1}))
    obj.on_epoch_start(0, model)
    x, y = data.train[list(range(32))]
    sum(obj(model, x, y).losses.values()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    preds, _ = model.forward_heads(x, [(k, t) for k in range(2) for t in data.task_names])
    w = torch.softmax(model.S / obj.tau, dim=1).detach()
    assign = s.argmax(dim=1).tolist()
    assigned = sum(w[i, assign[i]] * data.task(t).loss(preds[(assign[i], t)], y[t])
                   for i, t in enumerate(data.task_names))
    branch_params = list(model.net.branches.parameters())
    for p, g in zip(branch_params, torch.autograd.grad(assigned, branch_params, retain_graph=True)):
        name = next(n for n, q in model.named_parameters() if q is p)
        assert torch.allclose(got[name], g, atol=1e-7), name
    every = sum(w[i, k] * data.task(t).loss(preds[(k, t)], y[t]) for i, t in enumerate(data.task_names)
                for k in range(2))
    heads = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (".heads." in n or "banks." in n)]
    assert heads
    for (name, p), g in zip(heads, torch.autograd.grad(every, [p for _, p in heads], retain_graph=True)):
        assert torch.allclose(got[name], g, atol=1e-7), name
    # and the branch gradient is not the one every head would give (the probes do not reach the branches)
    full = torch.autograd.grad(every, branch_params[0])[0]
    assert not torch.allclose(full, got[next(n for n, q in model.named_parameters() if q is branch_params[0])])


def test_pruned_model_equals_selected_heads_and_reloads(tmp_path):
    data = _data()
    model = _model(data, K=3, s=torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [0, 0, 3.0], [0, 0, 1.0]]))
    x = data.test.x
    full, _ = model.forward_heads(x, [(k, t) for k in range(3) for t in data.task_names])
    pruned = model.pruned()
    assert len(pruned.branches) == 2 and model.grouping().as_lists() == [["g0_t0", "g0_t1"], ["g1_t0", "g1_t1"]]
    out = pruned(x)
    for t, k in zip(data.task_names, model.assignment()):
        assert torch.equal(out[t], full[(k, t)])
    save_branched(pruned, tmp_path / "m")
    again = load_branched(tmp_path / "m")
    for t in data.task_names:
        assert torch.equal(again(x)[t], out[t])


def test_scale_grad_is_identity_forward_scaled_backward():
    x = torch.randn(5, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((5,), 0.25))


def test_intended_gradient_scaling_divides_branch_gradient_by_sqrt_n():
    data = _data()
    grads = {}
    for scaling in ("none", "intended"):
        model = _model(data, scaling=scaling)
        x, y = data.train[list(range(8))]
        preds, _ = model.forward_heads(x)
        sum(data.task(t).loss(p, y[t]) for (k, t), p in preds.items()).backward()
        grads[scaling] = model.net.branches[0][0][1].weight.grad.clone()
    assert torch.allclose(grads["intended"], grads["none"] / math.sqrt(4), atol=1e-7)


def test_head_pruning_keeps_the_assigned_head():
    data = _data()
    model = _model(data, K=3, s=torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0], [0.1, 0, 0]]))
    obj = DMTGObjective(data.tasks, resolve_options({"prune_threshold": 0.05, "prune_patience": 2,
                                                     "s_warmup_epochs": 0}))
    obj.on_epoch_end(0, model)
    assert int(model.live.sum()) == 12
    log = obj.on_epoch_end(1, model)
    # tasks 0-2: only the argmax head survives; task 3 (nearly uniform) keeps all three
    assert log["live_heads"] == 3 + 3 and model.live[:, 3].all()
    assert model.assignment()[:3] == [0, 1, 2]
    x, y = data.train[list(range(8))]
    preds, _ = model.forward_heads(x)
    assert len(preds) == 6


def test_head_pruning_waits_until_the_tasks_row_has_converged():
    """A task whose probability is still split between two groups keeps every head, even one that is already
    below the threshold: pruning must not end S's learning for that task early."""
    data = _data()
    s = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0], [3.0, 3.0, -3.0]])  # task 3: 0.5 / 0.5 / 0.001
    model = _model(data, K=3, s=s)
    obj = DMTGObjective(data.tasks, resolve_options({"prune_threshold": 0.05, "prune_patience": 2,
                                                     "s_warmup_epochs": 0}))
    for epoch in range(4):
        obj.on_epoch_end(epoch, model)
    assert model.live[:, 3].all() and int(model.live.sum()) == 3 + 3
    with torch.no_grad():  # task 3 settles on group 1: after prune_patience epochs its other heads go together
        model.S[3] = torch.tensor([-3.0, 9.0, -3.0])
    obj.on_epoch_end(4, model)
    assert model.live[:, 3].all()
    obj.on_epoch_end(5, model)
    assert model.live[:, 3].tolist() == [False, True, False]


def test_label_affinity_and_cluster_prior_recover_groups():
    data = planted(n_tasks=6, group_sizes=[3, 3], within_group_similarity=0.8, n_train=600, n_val=10, n_test=10)
    from taskgrouping.data.base import make_loader

    aff = label_affinity(make_loader(data.train, 100, False), data.tasks)
    s = cluster_prior(aff, 2, 3.0)
    labels = s.argmax(1).tolist()
    assert labels[:3] == [labels[0]] * 3 and labels[3:] == [labels[3]] * 3 and labels[0] != labels[3]


def _ctx(data, K, options, tmp_path=None):
    return MethodContext(data=data, seed=0, K=K, train=TrainConfig(epochs=3, batch_size=32, progress=False),
                         model={"backbone": "mlp", "options": {"widths": [8, 4]}}, balancer={"name": "ew"},
                         options=options, name="dmtg")


def test_dmtg_method_end_to_end_records_history():
    data = _data()
    res = dmtg(_ctx(data, 2, {"retrain": ["scratch"]}))
    assert isinstance(res.grouping, Grouping) and sorted(res.grouping.tasks) == sorted(data.task_names)
    assert set(res.per_task) == set(data.task_names)
    # the default recipe holds S fixed for its 3 warm-up epochs, and no head is pruned while S is not learning
    assert res.extra["live_heads_history"] == [2 * len(data.tasks)] * 3 == [res.extra["live_heads_final"]] * 3
    assert "retrain_scratch" in res.extra["variants"]


def test_dmtg_pinned_to_a_grouping_trains_like_that_grouping():
    """DMTG starts from the weights the grouped model of its initial assignment would have at this seed
    (each task's head copied into every branch). With S pinned to the planted grouping (logit gap 30:
    Gumbel weights of other groups ~1e-13; S frozen; no pruning) its one-shot result is therefore that
    grouping trained from scratch: same selected epoch, same test losses. So on planted, DMTG vs the
    oracle measures what S's learning costs or gains, not initialisation luck."""
    from taskgrouping.methods.baselines import fit_grouping

    data = _data()
    grouping = Grouping.partition([list(g) for g in data.groups])
    prior = [[30.0 if t in g else 0.0 for g in grouping.as_lists()] for t in data.task_names]
    got = dmtg(_ctx(data, 2, {"init": "prior", "prior": prior, "s_warmup_epochs": 1000, "head_pruning": False,
                              "samples": 1}))
    ref = fit_grouping(_ctx(data, 2, {}), grouping, "oracle")
    assert got.grouping.as_lists() == grouping.as_lists()
    assert got.extra["best_epoch"] == ref.extra["best_epoch"]
    for t in data.task_names:
        assert got.per_task[t]["loss"] == pytest.approx(ref.per_task[t]["loss"], rel=1e-4)


@pytest.mark.parametrize("K, options, msg", [
    (5, {}, "1 <= K <= number of tasks"), (0, {}, "1 <= K"), (2, {"tau": 0}, "dmtg.tau must be > 0"),
    (2, {"tau": -1.0}, "dmtg.tau"), (2, {"init": "prior", "prior": [[0.0, 1.0]] * 3}, "N x K = 4 x 2"),
    (2, {"recipe": "magic"}, "dmtg.recipe"), (2, {"bogus": 1}, "unknown dmtg option"),
    (2, {"warmup": "noisy"}, r"dmtg.warmup must be one of probe \| softmax \| gumbel, got 'noisy'"),
])
def test_bad_options(K, options, msg):
    with pytest.raises(ValueError, match=msg):
        dmtg(_ctx(_data(), K, options))


def test_fused_head_losses_equal_per_task_losses():
    data = planted(n_tasks=5, group_sizes=[3, 2], task_type="classification", n_train=64, n_val=8, n_test=8)
    model = _model(data, K=3)
    model.live[1, 2] = False
    x, y = data.train[list(range(32))]
    loss, _ = model.head_losses(x, y, data.tasks)
    preds, _ = model.forward_heads(x, [(k, t) for k in range(3) for t in data.task_names])
    for k in range(3):
        for i, t in enumerate(data.task_names):
            expected = 0.0 if (k, i) == (1, 2) else data.task(t).loss(preds[(k, t)], y[t]).item()
            assert loss[i, k].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_assignment_heatmap_is_written(tmp_path):
    import dataclasses

    ctx = dataclasses.replace(_ctx(_data(), 2, {}), figures_dir=tmp_path)
    res = dmtg(ctx)
    png = tmp_path / "dmtg_assignment.png"
    assert res.extra["assignment_figure"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res.extra["dmtg_history"]) == 3 and len(res.extra["dmtg_history"][0]["assignment_probs"]) == 4


def test_mates_are_running_cosines_of_each_branchs_task_gradients():
    """``measure_mates``: per branch, the cosine between two tasks' loss gradients w.r.t. that branch's
    parameters (computed here by hand, one task at a time), averaged over measurements."""
    data = _data()
    model = _model(data, s=torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]))
    obj = DMTGObjective(data.tasks, resolve_options({"mates_weight": 1.0, "mates_decay": 0.5}))
    batches = [data.train[list(range(0, 16))], data.train[list(range(16, 32))]]
    expected = torch.zeros(2, 4, 4)
    for x, y in batches:
        _, feats = model.head_losses(x, y, data.tasks)
        obj.measure_mates(model, feats, y)
        for k in range(2):
            params = list(model.net.branches[k].parameters())
            preds, _ = model.forward_heads(x, [(k, t) for t in data.task_names])
            grads = [torch.cat([g.flatten() for g in torch.autograd.grad(data.task(t).loss(preds[(k, t)], y[t]), params,
                                                                          retain_graph=True)])
                     for t in data.task_names]
            G = F.normalize(torch.stack(grads), dim=1)
            expected[k] += (G @ G.T) / 2  # decay 0.5 over two measurements: a plain mean of the two
    assert torch.allclose(obj.mates, expected, atol=1e-5)
    state = obj.state_dict()
    again = DMTGObjective(data.tasks, resolve_options({"mates_weight": 1.0}))
    again.load_state_dict(state)
    assert torch.equal(again.mates, obj.mates) and again.measured == 2


def test_mates_pull_moves_a_task_towards_the_branch_whose_tasks_agree_with_it():
    """The gradient of the mates term on S_i is -weight * p_ik (A_ik - sum_k' p_ik' A_ik'): it raises S_i on
    the branch whose current tasks' gradients agree with task i's, and nothing else (no self term)."""
    data = _data()
    model = _model(data, s=torch.tensor([[0.0, 3.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]))  # task 0 sits on branch 1
    obj = DMTGObjective(data.tasks, resolve_options({"mates_weight": 2.0}))
    mates = torch.zeros(2, 4, 4)
    mates[0, 0, 1] = mates[0, 1, 0] = 0.5  # on branch 0, task 0 agrees with task 1 (which sits there)
    mates[:, 0, 0] = 1.0  # self-similarity must not count
    obj.mates = mates
    obj.mates_loss(model).backward()
    p = model.probabilities().detach()
    pull = torch.zeros(4, 2)
    pull[0, 0] = 0.5 * p[1, 0]
    pull[1, 0] = 0.5 * p[0, 0]
    expected = -2.0 * p * (pull - (p * pull).sum(dim=1, keepdim=True))
    assert torch.allclose(model.S.grad, expected, atol=1e-7)
    assert model.S.grad[0, 0] < 0 < model.S.grad[0, 1]  # descent raises S_00: task 0 moves towards task 1


@pytest.mark.parametrize("key, value", [("mates_weight", -1.0), ("mates_every", 0), ("mates_every", 2.5),
                                        ("mates_decay", 1.0)])
def test_bad_mates_options_are_clear_errors(key, value):
    with pytest.raises(ValueError, match=f"dmtg.{key}"):
        resolve_options({key: value})
