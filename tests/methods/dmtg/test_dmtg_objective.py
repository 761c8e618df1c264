"""DMTG's objective: the loss is sum_k Z_ik L_ik, the warm-up weighs heads by softmax(S / tau) and trains
branches only through assigned heads, head pruning keeps the argmax head, and the mates pull measures
and uses branch-mates' gradient cosines."""

import pytest
import torch
import torch.nn.functional as F

from dmtg_fixtures import small_data, small_model
from taskgrouping.methods.dmtg import DMTGModel, DMTGObjective, DMTGOptions


def test_loss_is_gumbel_weighted_sum_of_head_losses():
    data = small_data()
    model = small_model(data, s=torch.tensor([[1.0, -1.0], [0.0, 0.5], [2.0, 0.0], [0.0, 0.0]]))
    opts = DMTGOptions(recipe="paper", tau=0.7)
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
    data = small_data()
    model = small_model(data, s=torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]))
    obj = DMTGObjective(data.tasks, DMTGOptions(warmup=mode, s_warmup_epochs=2, tau=0.5))
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
    data = small_data()
    s = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])  # task 3 assigned to branch 0
    model = small_model(data, s=s)
    model = model if fused else _unfused(model)
    obj = DMTGObjective(data.tasks, DMTGOptions(warmup="probe", s_warmup_epochs=1))
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


def test_head_pruning_keeps_the_assigned_head():
    data = small_data()
    model = small_model(data, K=3, s=torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0], [0.1, 0, 0]]))
    obj = DMTGObjective(data.tasks, DMTGOptions(prune_threshold=0.05, prune_patience=2, s_warmup_epochs=0))
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
    data = small_data()
    s = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0], [3.0, 3.0, -3.0]])  # task 3: 0.5 / 0.5 / 0.001
    model = small_model(data, K=3, s=s)
    obj = DMTGObjective(data.tasks, DMTGOptions(prune_threshold=0.05, prune_patience=2, s_warmup_epochs=0))
    for epoch in range(4):
        obj.on_epoch_end(epoch, model)
    assert model.live[:, 3].all() and int(model.live.sum()) == 3 + 3
    with torch.no_grad():  # task 3 settles on group 1: after prune_patience epochs its other heads go together
        model.S[3] = torch.tensor([-3.0, 9.0, -3.0])
    obj.on_epoch_end(4, model)
    assert model.live[:, 3].all()
    obj.on_epoch_end(5, model)
    assert model.live[:, 3].tolist() == [False, True, False]


def test_mates_are_running_cosines_of_each_branchs_task_gradients():
    """``measure_mates``: per branch, the cosine between two tasks' loss gradients w.r.t. that branch's
    parameters (computed here by hand, one task at a time), averaged over measurements."""
    data = small_data()
    model = small_model(data, s=torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]))
    obj = DMTGObjective(data.tasks, DMTGOptions(mates_weight=1.0, mates_decay=0.5))
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
    again = DMTGObjective(data.tasks, DMTGOptions(mates_weight=1.0))
    again.load_state_dict(state)
    assert torch.equal(again.mates, obj.mates) and again.measured == 2


def test_mates_pull_moves_a_task_towards_the_branch_whose_tasks_agree_with_it():
    """The gradient of the mates term on S_i is -weight * p_ik (A_ik - sum_k' p_ik' A_ik'): it raises S_i on
    the branch whose current tasks' gradients agree with task i's, and nothing else (no self term)."""
    data = small_data()
    # task 0 sits on branch 1
    model = small_model(data, s=torch.tensor([[0.0, 3.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]))
    obj = DMTGObjective(data.tasks, DMTGOptions(mates_weight=2.0))
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


def test_uniform_warmup_trains_every_head_alike_whatever_the_start():
    """``warmup=uniform``: while S is held, task i's loss is the mean of its K heads' losses, the same for
    any S (so the branches' warm-up does not depend on the start); every head's branch gets its gradient."""
    data = small_data()
    x, y = data.train[list(range(16))]
    for s in (torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]), torch.zeros(4, 2)):
        model = small_model(data, s=s)
        obj = DMTGObjective(data.tasks, DMTGOptions(warmup="uniform", s_warmup_epochs=1))
        obj.on_epoch_start(0, model)
        preds, _ = model.forward_heads(x)
        out = obj(model, x, y)
        for i, t in enumerate(data.task_names):
            expected = sum(data.task(t).loss(preds[(k, t)], y[t]) for k in range(2)) / 2
            assert out.losses[t].item() == pytest.approx(expected.item(), rel=1e-6)
        sum(out.losses.values()).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.branches.parameters())


def test_select_converged_holds_epochs_until_s_has_converged_then_rewinds_keeping_s():
    """With ``select_converged`` every epoch before S's rows have settled (one live head per task) is held back
    from selection; at convergence ``rewind`` asks for the best epoch's weights, and S, the live heads and
    the pruning counters are put back at the next epoch's start, so S keeps what it learned."""
    data = small_data()
    model = small_model(data, s=torch.tensor([[8.0, 0.0], [8.0, 0.0], [0.0, 8.0], [0.0, 8.0]]))
    opts = DMTGOptions(s_warmup_epochs=0, select_converged=True, rewind=True, prune_patience=2)
    obj = DMTGObjective(data.tasks, opts, epochs=10)
    obj.on_epoch_start(0, model)
    first = obj.on_epoch_end(0, model)
    assert first["selectable"] is False and "rewind" not in first and first["live_heads"] == 8
    obj.on_epoch_start(1, model)
    second = obj.on_epoch_end(1, model)  # two epochs below the threshold: the other heads are pruned
    assert second["selectable"] is False and second["rewind"] is True and second["live_heads"] == 4
    learned = model.S.detach().clone()
    with torch.no_grad():  # what the trainer's rewind does: the best epoch's state, S and live heads included
        model.S.zero_()
        model.live.fill_(True)
    obj.on_epoch_start(2, model)
    assert torch.equal(model.S.detach(), learned) and int(model.live.sum()) == 4
    third = obj.on_epoch_end(2, model)
    assert "selectable" not in third and "rewind" not in third and obj.converged_at == 1
    again = DMTGObjective(data.tasks, opts, epochs=10)
    again.load_state_dict(obj.state_dict())
    assert again.converged_at == 1


@pytest.mark.parametrize("early_stopping", [True, False])
def test_weights_are_shrunk_and_perturbed_at_the_rewind_after_convergence_when_the_run_stops_early(early_stopping):
    """At the epoch start that restores S after the rewind at convergence, every weight but S becomes
    shrink * theta + N(0, perturb^2) (Ash & Adams 2020) - only in a run with early stopping; S keeps what
    it learned. Checked with perturb = 0 (exactly shrink * theta) and with noise (its std)."""
    data = small_data()
    s = torch.tensor([[8.0, 0.0], [8.0, 0.0], [0.0, 8.0], [0.0, 8.0]])
    for perturb in (0.0, 0.5):
        model = small_model(data, s=s)
        opts = DMTGOptions(s_warmup_epochs=0, select_converged=True, rewind=True, prune_patience=2, shrink=0.6,
                           perturb=perturb)
        obj = DMTGObjective(data.tasks, opts, epochs=10, early_stopping=early_stopping)
        for epoch in range(2):
            obj.on_epoch_start(epoch, model)
            facts = obj.on_epoch_end(epoch, model)
        assert facts["rewind"] is True
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        obj.on_epoch_start(2, model)
        after = dict(model.named_parameters())
        assert torch.equal(after["S"].detach(), before["S"])
        for name in before:
            if name == "S":
                continue
            change = after[name].detach() - (0.6 if early_stopping else 1.0) * before[name]
            if perturb == 0 or not early_stopping:
                assert torch.equal(change, torch.zeros_like(change)), name
        if perturb and early_stopping:
            noise = torch.cat([(after[n].detach() - 0.6 * before[n]).flatten() for n in before if n != "S"])
            assert noise.numel() > 200 and 0.4 < float(noise.std()) < 0.6
    assert DMTGOptions().shrink == 0.6 and DMTGOptions(recipe="robust").shrink == 1.0
    with pytest.raises(ValueError, match="^shrink must be"):
        DMTGOptions(shrink=0.0)


@pytest.mark.parametrize("rewind, epochs, converged_selectable", [(False, 10, True), (True, 2, True), (True, 10, False)])
def test_the_epoch_s_converges_is_selected_unless_training_rewinds_after_it(rewind, epochs, converged_selectable):
    """Without ``rewind`` (or when it converges in the run's last epoch, with nothing left to train) the epoch S
    converged is the first one selected; with ``rewind`` and epochs left it stays held and training continues."""
    data = small_data()
    model = small_model(data, s=torch.tensor([[8.0, 0.0], [8.0, 0.0], [0.0, 8.0], [0.0, 8.0]]))
    opts = DMTGOptions(s_warmup_epochs=0, select_converged=True, rewind=rewind, prune_patience=2)
    obj = DMTGObjective(data.tasks, opts, epochs=epochs)
    obj.on_epoch_start(0, model)
    assert obj.on_epoch_end(0, model)["selectable"] is False
    facts = obj.on_epoch_end(1, model)
    assert obj.converged_at == 1 and ("selectable" not in facts) is converged_selectable
    assert facts.get("rewind", False) is (not converged_selectable)


def test_rewind_without_select_converged_comes_at_the_end_of_the_hold():
    data = small_data()
    model = small_model(data)
    obj = DMTGObjective(data.tasks, DMTGOptions(recipe="robust", s_warmup_epochs=2, rewind=True), epochs=10)
    facts = []
    for epoch in range(3):
        obj.on_epoch_start(epoch, model)
        facts.append(obj.on_epoch_end(epoch, model))
    assert [f.get("selectable", True) for f in facts] == [False, False, True]
    assert [f.get("rewind", False) for f in facts] == [False, True, False]
