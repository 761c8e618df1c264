"""DMTG's model: the pruned model answers exactly like the selected heads, gradient scaling scales
gradients, and the fused head losses equal the per-task ones."""

import math

import pytest
import torch

from dmtg_fixtures import small_data, small_model
from taskgrouping.data.builtin import planted
from taskgrouping.methods.dmtg import scale_grad
from taskgrouping.models.branched import load_branched, save_branched


def test_pruned_model_equals_selected_heads_and_reloads(tmp_path):
    data = small_data()
    model = small_model(data, K=3, s=torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [0, 0, 3.0], [0, 0, 1.0]]))
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
    data = small_data()
    grads = {}
    for scaling in ("none", "intended"):
        model = small_model(data, scaling=scaling)
        x, y = data.train[list(range(8))]
        preds, _ = model.forward_heads(x)
        sum(data.task(t).loss(p, y[t]) for (k, t), p in preds.items()).backward()
        grads[scaling] = model.net.branches[0][0][1].weight.grad.clone()
    assert torch.allclose(grads["intended"], grads["none"] / math.sqrt(4), atol=1e-7)


def test_fused_head_losses_equal_per_task_losses():
    data = planted(n_tasks=5, group_sizes=[3, 2], task_type="classification", n_train=64, n_val=8, n_test=8)
    model = small_model(data, K=3)
    model.live[1, 2] = False
    x, y = data.train[list(range(32))]
    loss, _ = model.head_losses(x, y, data.tasks)
    preds, _ = model.forward_heads(x, [(k, t) for k in range(3) for t in data.task_names])
    for k in range(3):
        for i, t in enumerate(data.task_names):
            expected = 0.0 if (k, i) == (1, 2) else data.task(t).loss(preds[(k, t)], y[t]).item()
            assert loss[i, k].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_heads_of_tasks_without_a_label_in_the_batch_are_not_run():
    """A long table's batch labels a few tasks: the other heads are not computed and their losses are 0,
    as their masked losses would be; the labelled tasks' losses are unchanged."""
    data = small_data()
    model = small_model(data)
    x, y = data.train[list(range(16))]
    full, _ = model.head_losses(x, y, data.tasks)
    sparse_y = dict(y)
    absent = data.task_names[1]
    sparse_y[absent] = torch.full_like(y[absent], float("nan")) if y[absent].is_floating_point() \
        else torch.full_like(y[absent], -1)
    seen = []
    original = model._head_preds
    model._head_preds = lambda k, f, idx, probes=frozenset(): seen.append(list(idx)) or original(k, f, idx, probes)
    sparse, _ = model.head_losses(x, sparse_y, data.tasks)
    assert all(1 not in idx for idx in seen) and len(seen) == model.K
    assert torch.equal(sparse[1], torch.zeros(model.K))
    keep = [0, 2, 3]
    assert torch.allclose(sparse[keep], full[keep], atol=1e-7)


def test_index_cache_stays_bounded_and_losses_do_not_depend_on_it(monkeypatch):
    """Batches that label different subsets of tasks each add index tensors; the cache is cleared at its bound
    and rebuilt, with the same losses."""
    from taskgrouping.methods.dmtg import model as dmtg_model

    data = small_data()
    x, y = data.train[list(range(16))]
    batches = []
    for absent in data.task_names:  # every batch labels another subset of the tasks
        sparse = dict(y)
        sparse[absent] = torch.full_like(y[absent], float("nan")) if y[absent].is_floating_point() \
            else torch.full_like(y[absent], -1)
        batches.append(sparse)
    unbounded = small_model(data)
    expected = [unbounded.head_losses(x, b, data.tasks)[0] for b in batches]
    monkeypatch.setattr(dmtg_model, "_MAX_INDICES", 2)
    bounded = small_model(data)
    for b, want in zip(batches, expected):
        assert torch.equal(bounded.head_losses(x, b, data.tasks)[0], want)
        assert len(bounded._indices) <= 2
    assert len(unbounded._indices) > 2  # the bound was reached
