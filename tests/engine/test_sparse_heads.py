"""Heads of tasks without a label in the batch cost nothing: ``TaskLossObjective`` runs only the heads
(and branches) of labelled tasks, and its losses and gradients equal the full NaN-masked computation."""

import torch
from torch import nn

from taskgrouping.engine.hooks import TaskLossObjective, labelled_tasks
from taskgrouping.models.branched import build_branched_model
from taskgrouping.tasks import Task

TASKS = [Task("a", "regression"), Task("b", "binary"), Task("c", "regression"), Task("d", "binary")]


def _model(groups):
    torch.manual_seed(0)
    return build_branched_model(TASKS, groups, (5,), backbone="mlp", backbone_options={"widths": [8, 6]},
                                shared_blocks=1)


def _batch():
    """8 samples: a labelled on rows 0-3 only, b on rows 2 and 5, c and d on no row."""
    torch.manual_seed(1)
    x = torch.randn(8, 5)
    a = torch.randn(8, 1)
    a[4:] = float("nan")
    b = torch.full((8,), -1, dtype=torch.long)
    b[2], b[5] = 1, 0
    return x, {"a": a, "b": b, "c": torch.full((8, 1), float("nan")), "d": torch.full((8,), -1, dtype=torch.long)}


def _count_calls(model):
    """Forward calls per head key and per branch, counted by forward hooks."""
    calls = {}

    def counter(key):
        def hook(*_):
            calls[key] = calls.get(key, 0) + 1
        return hook

    for k, t in model.all_head_keys():
        model.head(k, t).register_forward_hook(counter((k, t)))
    for k, branch in enumerate(model.branches):
        branch.register_forward_hook(counter(("branch", k)))
    return calls


def _full_losses(model, x, targets):
    """The reference: every head run, each task's NaN-masked loss summed over its heads."""
    preds, _ = model.forward_heads(x)
    out = {}
    for (_, t), p in preds.items():
        loss = TASKS[[s.name for s in TASKS].index(t)].loss(p, targets[t])
        out[t] = out[t] + loss if t in out else loss
    return out


def _grads(model, losses):
    model.zero_grad(set_to_none=True)
    torch.stack(list(losses.values())).sum().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_labelled_tasks_reads_the_missing_label_conventions():
    _, targets = _batch()
    assert labelled_tasks(TASKS, targets) == {"a", "b"}
    assert labelled_tasks(TASKS, {}) == set()


def test_unlabelled_heads_and_their_branches_are_not_run():
    model = _model([["a", "b"], ["c", "d"], ["b", "d"]])
    calls = _count_calls(model)
    x, targets = _batch()
    out = TaskLossObjective(TASKS)(model, x, targets)
    assert list(out.losses) == ["a", "b", "c", "d"]  # every task keeps its entry, in task order
    assert out.losses["c"].item() == 0.0 and not out.losses["c"].requires_grad  # constant: no head ran
    # branch 1 serves only unlabelled tasks: neither it nor its heads run; branch 2 runs for b only
    assert calls == {("branch", 0): 1, ("branch", 2): 1, (0, "a"): 1, (0, "b"): 1, (2, "b"): 1}
    assert set(out.features) == {0, 2}


def test_losses_and_gradients_equal_the_full_masked_computation():
    model = _model([["a", "b"], ["c", "d"], ["b", "d"]])
    x, targets = _batch()
    full = _full_losses(model, x, targets)
    assert full["c"].item() == 0.0 and full["d"].item() == 0.0  # masked: absent tasks add nothing
    sparse = TaskLossObjective(TASKS)(model, x, targets).losses
    for t in ("a", "b"):
        assert torch.equal(sparse[t], full[t]), t
    g_full, g_sparse = _grads(model, full), _grads(model, sparse)
    untouched = {n for n, g in g_sparse.items() if g is None}
    # exactly the heads of c and d and the branch serving only them get no gradient at all
    assert untouched == {n for n in g_full if n.startswith(("branches.1.", "heads.1.", "heads.2.1."))}
    for n, g in g_full.items():
        if n in untouched:
            assert g is None or not g.any(), n
        else:
            assert torch.allclose(g_sparse[n], g, rtol=0, atol=1e-7), n
    assert any(g_sparse[n].abs().sum() > 0 for n in g_sparse if n.startswith("stem."))


def test_every_head_runs_when_every_task_is_labelled():
    model = _model([["a", "b"], ["c", "d"]])
    calls = _count_calls(model)
    x, targets = _batch()
    targets["c"] = torch.randn(8, 1)
    targets["d"] = torch.ones(8, dtype=torch.long)
    out = TaskLossObjective(TASKS)(model, x, targets)
    assert set(out.losses) == {"a", "b", "c", "d"}
    assert all(calls[key] == 1 for key in model.all_head_keys())


def test_a_batch_without_any_label_keeps_every_task_at_zero_loss():
    model = _model([["a", "b"], ["c", "d"]])
    x, targets = _batch()
    targets["a"] = torch.full((8, 1), float("nan"))
    targets["b"] = torch.full((8,), -1, dtype=torch.long)
    out = TaskLossObjective(TASKS)(model, x, targets)
    assert set(out.losses) == {"a", "b", "c", "d"}
    assert all(v.item() == 0.0 for v in out.losses.values())


class _PlainModel(nn.Module):
    """A model without heads of its own: ``{task: prediction}`` for every task, calls counted."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        z = self.lin(x)
        return {"a": z[:, :1], "b": z, "c": z[:, 1:], "d": z}


def test_a_plain_model_gives_the_unlabelled_tasks_constant_zero_losses():
    x, targets = _batch()
    model = _PlainModel()
    out = TaskLossObjective(TASKS)(model, x, targets)
    assert list(out.losses) == ["a", "b", "c", "d"] and model.calls == 1
    assert all(out.losses[t].item() == 0.0 and not out.losses[t].requires_grad for t in ("c", "d"))
    ref = model(x)
    assert torch.equal(out.losses["a"], TASKS[0].loss(ref["a"], targets["a"]))


def test_train_loss_of_a_sparse_task_is_its_mean_over_the_batches_that_label_it():
    """Task c is labelled on one sample, so one batch of four holds it: its epoch train loss is that
    batch's loss (the model does not move: SGD at lr 1e-12), not a quarter of it."""
    from taskgrouping.data.base import TensorTaskDataset, make_loader
    from taskgrouping.engine.trainer import TrainConfig, train

    torch.manual_seed(2)
    x = torch.randn(32, 5)
    targets = {"a": torch.randn(32, 1), "b": torch.randint(0, 2, (32,)), "c": torch.full((32, 1), float("nan")),
               "d": torch.randint(0, 2, (32,))}
    targets["c"][7] = 3.0
    data = TensorTaskDataset(x, targets)
    model = _model([["a", "b"], ["c", "d"]])
    with torch.no_grad():
        expected = TASKS[2].loss(model(x[7:8])["c"], targets["c"][7:8]).item()
    result = train(model, make_loader(data, 8, True), make_loader(data, 8, False), TASKS,
                   TrainConfig(epochs=1, batch_size=8, optimizer="sgd", lr=1e-12, momentum=0.0, progress=False))
    assert abs(result.history[0]["train_loss"]["c"] - expected) < 1e-5 * max(1.0, expected)
