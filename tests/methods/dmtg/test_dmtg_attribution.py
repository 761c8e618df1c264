"""The input-attribution affinity and the pull it gives S (methods/dmtg/attribution.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmtg_fixtures import small_data, small_model
from taskgrouping.methods.dmtg import DMTGObjective, DMTGOptions
from taskgrouping.methods.dmtg.attribution import AttributionAffinity, pull_loss
from taskgrouping.tasks import Task


class _Linear(nn.Module):
    """f_i(x) = w_i . x for three regression tasks: a plain model (no branches)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        out = x @ self.w.T
        return {f"t{i}": out[:, i:i + 1] for i in range(self.w.shape[0])}


def test_affinity_of_linear_tasks_averages_their_directions_and_their_coordinates():
    """For f_i = w_i . x with squared loss, dL_i/dx_s = 2 r_i(s) w_i / n, so a batch's M_i is proportional
    to w_i w_i^T and its diagonal to w_i ** 2 whatever the residuals: by hand, a_ij is the mean of
    (w_i . w_j)^2 / (|w_i|^2 |w_j|^2) (directions) and cos(w_i ** 2, w_j ** 2) (coordinates). Tasks 0 and 3
    read the same two inputs in orthogonal directions: only the coordinates view sees them alike."""
    torch.manual_seed(0)
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 1.0], [1.0, -1.0, 0.0, 0.0]])
    tasks = [Task(f"t{i}", "regression") for i in range(4)]
    x = torch.randn(16, 4)
    y = {f"t{i}": torch.randn(16, 1) for i in range(4)}
    model = _Linear(w)
    aff = AttributionAffinity(4, decay=0.5, samples=12)
    aff.measure(model, x, y, tasks)
    wn, w2 = F.normalize(w, dim=1), F.normalize(w.square(), dim=1)
    expected = ((wn @ wn.T).square() + w2 @ w2.T) / 2
    assert torch.allclose(aff.matrix(), expected, atol=1e-6)
    assert aff.matrix()[0, 3] == pytest.approx(0.5, abs=1e-6)  # directions 0, coordinates 1
    assert model.w.grad is None and model.training  # parameters' grads untouched, train mode restored


def test_dmtg_model_is_read_through_every_branch_without_side_effects():
    """On a DMTG model every live head of every branch is read (probes included; inner products summed over
    branches, a pruned head skipped); the measurement leaves
    S, the weights, their grads and the training mode as they were, and matches a hand computation."""
    data = small_data()
    model = small_model(data, s=torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]))
    model.live[1, 0] = False  # a pruned head: task 0 is read on branch 0 only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data.train[list(range(20))]
    aff = AttributionAffinity(4, samples=8)
    aff.measure(model, x, y, data.tasks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
    xs = x[:8]
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for k in range(2):
        grads = {}
        for i, t in enumerate(data.task_names):
            if not model.live[k, i]:
                continue
            xr = xs.clone().requires_grad_(True)
            preds, _ = model.forward_heads(xr, [(k, t)])
            (g,) = torch.autograd.grad(data.task(t).loss(preds[(k, t)], y[t][:8]), xr)
            grads[i] = g.double()
        for i, gi in grads.items():
            for j, gj in grads.items():
                expected[i, j] += (gi @ gj.T).square().sum() / 64  # summed over the branches
    assert torch.allclose(aff.inner, expected, rtol=1e-6)


def test_pull_moves_a_task_towards_the_branch_of_the_tasks_it_is_closer_to():
    """pull_loss by hand: C = the affinity minus the mean pair's (0.9 + 0.1 + 0.1) / 3 = 11 / 30, scaled to mean
    |C| = 1, averaged over each branch's other members; the gradient on S_0 raises the branch of task 1 (its
    close task) and lowers the branch of task 2."""
    a = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]])
    S = torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 2.0]], requires_grad=True)  # task 0 sits with task 2
    p = torch.softmax(S, dim=1)
    loss = pull_loss(p, a, 3.0)
    C = torch.tensor([[0.0, 16.0, -8.0], [16.0, 0.0, -8.0], [-8.0, -8.0, 0.0]]) / 30
    C = C / (C.abs().sum() / 6)
    q = p.detach()
    others = (q.sum(0, keepdim=True) - q).clamp_min(1.0)
    assert torch.allclose(loss, -3.0 * (p * (C @ q / others)).sum())
    loss.backward()
    assert S.grad[0, 0] < 0 < S.grad[0, 1]  # descent raises S_00: task 0 moves towards task 1
    assert torch.allclose(pull_loss(torch.ones(1, 2) / 2, torch.ones(1, 1), 1.0), torch.tensor(0.0))


def test_pull_compares_branches_by_their_members_mean_not_their_sum():
    """Task 0 is close to task 1 (alone on branch 0), a little closer than average to tasks 2-4 (together on
    branch 1) and far from task 5 (branch 2). The mean pair's affinity is 8.4 / 15 = 0.56, so C_01 = 0.34 and
    C_0j = 0.24 for j = 2..4: summed over members branch 1 would win (0.72 > 0.34); averaged, branch 0 does, so
    several loosely related tasks do not draw a task from its close mate (nor two such groups merge)."""
    a = torch.full((6, 6), 0.5).fill_diagonal_(1.0)
    a[0, 1] = a[1, 0] = 0.9
    a[0, 2:5] = a[2:5, 0] = 0.8
    a[0, 5] = a[5, 0] = 0.1
    p = torch.tensor([[1 / 3] * 3, [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]],
                     requires_grad=True)
    pull_loss(p, a, 1.0).backward()
    assert p.grad[0, 0] < p.grad[0, 1] < 0  # descent raises task 0's weight on branch 0 the most


def test_a_task_unlike_its_branch_mates_leaves_for_an_empty_branch():
    """Every task on branch 0, branch 1 empty (where S's own-loss gradient can draw them all when one branch
    learns fastest). Task 1 is less like every other task than the mean pair (0.3, 0.45, 0.22 against 0.48):
    its pull lowers branch 0; the others, closer to their mates than average, stay. Centred on its own row's
    mean, task 1's mean over branch 0 would be 0, an empty branch's value, and nothing would move it."""
    a = torch.tensor([[1.0, 0.30, 0.45, 0.67], [0.30, 1.0, 0.45, 0.22], [0.45, 0.45, 1.0, 0.80],
                      [0.67, 0.22, 0.80, 1.0]])
    p = torch.tensor([[1.0, 0.0]] * 4, requires_grad=True)
    pull_loss(p, a, 1.0).backward()
    assert p.grad[1, 0] > 0 == p.grad[1, 1]  # descent lowers task 1's weight on the full branch
    assert (p.grad[[2, 3], 0] < 0).all()


def test_objective_measures_and_resumes_the_affinity():
    data = small_data()
    model = small_model(data)
    opts = DMTGOptions(attribution_weight=1.0, attribution_every=2, s_warmup_epochs=0)
    obj = DMTGObjective(data.tasks, opts)
    obj.on_epoch_start(0, model)
    x, y = data.train[list(range(16))]
    for _ in range(3):
        out = obj(model, x, y)
    assert obj.attribution.measured == 2 and out.extra_loss is not None
    again = DMTGObjective(data.tasks, opts)
    again.load_state_dict(obj.state_dict())
    assert torch.equal(again.attribution.inner, obj.attribution.inner) and again.calls == obj.calls
    assert "attribution_affinity" in obj.on_epoch_end(0, model)


def test_attribution_recipe_and_bad_options():
    opts = DMTGOptions()  # the default recipe
    assert opts.recipe == "attribution"
    assert opts.init == "noisy" and opts.attribution_weight == 20.0  # no label statistics
    assert opts.warmup == "uniform" and opts.select_converged and opts.rewind
    assert DMTGOptions(recipe="robust").attribution_weight == 0.0  # the label-start recipe has no pull
    with pytest.raises(ValueError, match="expected floating-point inputs"):  # attributions need float inputs
        AttributionAffinity(1).measure(nn.Identity(), torch.zeros(2, 3, dtype=torch.long), {},
                                       [Task("t0", "regression")])
    for key, value in (("attribution_weight", -1), ("attribution_every", 0), ("attribution_samples", 0),
                       ("attribution_decay", 1.0)):
        with pytest.raises(ValueError, match=f"^{key} must be"):
            DMTGOptions(**{key: value})


def test_the_pull_averages_the_warm_up_affinity_with_the_running_one():
    """Once S starts to learn the warm-up's affinity is kept (once) and averaged with the running one."""
    torch.manual_seed(0)
    tasks = [Task(f"t{i}", "regression") for i in range(3)]
    y = {f"t{i}": torch.randn(16, 1) for i in range(3)}
    aff = AttributionAffinity(3, decay=0.5, samples=16)
    aff.measure(_Linear(torch.tensor([[1.0, 0, 0], [1.0, 1, 0], [0, 0, 1.0]])), torch.randn(16, 3), y, tasks)
    warm = aff.matrix().clone()
    aff.keep_warm()
    aff.measure(_Linear(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 1.0]])), torch.randn(16, 3), y, tasks)
    aff.keep_warm()  # a second call keeps the first
    assert torch.equal(aff.warm, warm)
    assert torch.allclose(aff.matrix(), (aff.cosines() + warm) / 2)
    again = AttributionAffinity(3)
    again.load_state_dict(aff.state_dict())
    assert torch.equal(again.matrix(), aff.matrix())


def test_no_measuring_once_s_has_converged_where_the_pull_has_no_gradient():
    """Once every task has one live head, S's probabilities are one-hot and the pull's gradient on S is 0:
    the objective stops measuring (a saving of the measurement's backward passes, nothing else changes)."""
    data = small_data()
    model = small_model(data)
    with torch.no_grad():
        model.live.copy_(torch.arange(model.K)[:, None] == torch.arange(len(data.tasks))[None, :] % model.K)
    pull_loss(model.probabilities(), torch.rand(len(data.tasks), len(data.tasks)), 1.0).backward()
    assert torch.equal(model.S.grad, torch.zeros_like(model.S))
    obj = DMTGObjective(data.tasks, DMTGOptions(attribution_every=1, s_warmup_epochs=0))
    x, y = data.train[list(range(16))]
    obj.on_epoch_start(0, model)
    obj(model, x, y)
    assert obj.attribution.measured == 1
    obj.on_epoch_end(0, model)
    assert obj.converged_at == 0
    obj.on_epoch_start(1, model)
    for _ in range(3):
        obj(model, x, y)
    assert obj.attribution.measured == 1 and obj.calls == 4
