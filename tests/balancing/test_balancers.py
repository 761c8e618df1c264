"""Balancers: hand-computed cases, analytic properties, training smoke runs, levels and state.

Pins: PCGrad's projection on a hand example (Yu et al. 2020, Alg. 1); MGDA's weights against a
SciPy QP for the min-norm point of the convex hull; GradNorm's equalised gradient norms
(Chen et al. 2018) and, at feature level, its update against autograd of ``sum_t w_t L_t``; the
orthogonal-gradient penalty (Suteu & Guo 2019) on a hand example and its update against autograd
of the regularised loss (written out here, pair by pair) at both levels; DWA's weights on a
hand-computed history (Liu et al. 2019, Eq. 7); UW's loss (Kendall et al. 2018); RLW's weights;
FAMO's weights (Liu et al. 2023); Auto-Lambda's meta-gradient sign; EW at feature level equal to
plain backpropagation; identical steps after a JSON state round trip (the trainer stores balancer
state as JSON).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from taskgrouping.balancing.base import BALANCERS, get_balancer
from taskgrouping.balancing.catalogue import GRADIENT_METHODS
from taskgrouping.balancing.task_gradients import task_feature_grads

torch.set_num_threads(1)

TASKS = ["t0", "t1", "t2"]
NEEDS_TASKS = {"uw", "gradnorm", "imtl"}
FIXED_FEATURE_LEVEL = {"mgda_ub", "aligned_mtl_ub"}


def make_balancer(name: str, feature_level: bool = False, **options):
    if name in NEEDS_TASKS:
        options.setdefault("tasks", TASKS)
    if name in GRADIENT_METHODS and name not in FIXED_FEATURE_LEVEL:
        options["feature_level"] = feature_level
    return get_balancer(name, **options)


X = torch.randn(48, 6, generator=torch.Generator().manual_seed(0))
Y = torch.tanh(X @ torch.randn(6, 3, generator=torch.Generator().manual_seed(1))) * torch.tensor([1.0, 5.0, 0.2])


class Tiny(nn.Module):
    """A shared MLP trunk with three regression heads of very different loss scales."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(10, 1) for _ in TASKS)

    def losses(self) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        z = self.trunk(X)
        return {t: ((h(z).squeeze(1) - Y[:, i]) ** 2).mean() for i, (t, h) in enumerate(zip(TASKS, self.heads))}, [z]

    def total(self) -> float:
        with torch.no_grad():
            return float(sum(self.losses()[0].values()))


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def one_step(model: Tiny, balancer) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    for p in balancer.extra_parameters():
        p.grad = None
    losses, feats = model.losses()
    return balancer.backward(losses, list(model.trunk.parameters()), feats)


# -- hand-computed cases and analytic properties --------------------------------------------------
def test_pcgrad_hand_example():
    # conflicting: g1.g2 = -1 < 0 -> g1' = g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1)
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(get_balancer("pcgrad").aggregate(jac), torch.tensor([0.5, 1.5]))
    # non-conflicting gradients are left as they are: the sum
    jac = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 3.0], [2.0, 1.0, 1.0]])
    torch.testing.assert_close(get_balancer("pcgrad").aggregate(jac), jac.sum(0))


def test_mgda_weights_give_the_min_norm_point_of_the_convex_hull():
    jac = torch.tensor([[1.0, 0.2, -0.5, 0.0], [-0.3, 1.0, 0.4, 0.2], [0.1, -0.4, 0.3, 1.2]], dtype=torch.float64)
    w = get_balancer("mgda", epsilon=1e-9, max_iters=5000).weights(jac).numpy()
    gram = (jac @ jac.T).numpy()
    res = minimize(lambda a: a @ gram @ a, np.full(3, 1 / 3), jac=lambda a: 2 * gram @ a, method="SLSQP",
                   bounds=[(0, 1)] * 3, constraints=({"type": "eq", "fun": lambda a: a.sum() - 1},),
                   options={"ftol": 1e-15})
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w @ gram @ w == pytest.approx(res.fun, rel=1e-3, abs=1e-8)
    np.testing.assert_allclose(w, res.x, atol=2e-2)


def test_graddrop_keeps_agreeing_signs_whole():
    """Where every task's gradient has the same sign the purity is 0 or 1: nothing is dropped."""
    jac = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 0.25]])
    for _ in range(5):
        torch.testing.assert_close(get_balancer("graddrop").aggregate(jac), jac.sum(0))


def test_dwa_weights_on_a_hand_computed_history():
    dwa = get_balancer("dwa", temperature=2.0)
    assert dwa.task_weights(["a", "b"]).tolist() == [1.0, 1.0]  # first two epochs
    dwa.on_epoch_end(0, {"a": 1.0, "b": 2.0})
    dwa.on_epoch_end(1, {"a": 0.5, "b": 2.0})
    # r = (0.5, 1.0); w = 2 exp(r/2) / sum exp(r/2)
    ea, eb = math.exp(0.25), math.exp(0.5)
    expected = [2 * ea / (ea + eb), 2 * eb / (ea + eb)]
    np.testing.assert_allclose(dwa.task_weights(["a", "b"]).numpy(), expected, rtol=1e-6)
    la, lb = torch.tensor(3.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)
    logs = dwa.backward({"a": la, "b": lb}, [], None)
    assert la.grad.item() == pytest.approx(expected[0], rel=1e-6) and logs["weight/b"] == pytest.approx(expected[1])


def test_uncertainty_weighting_loss_hand_value():
    uw = get_balancer("uw", tasks=["a"])
    with torch.no_grad():
        uw.extra_parameters()[0].fill_(math.log(4.0))  # sigma^2 = 4
    value = uw.combined_loss({"a": torch.tensor(2.0)})
    assert value.item() == pytest.approx(2.0 / (2 * 4.0) + math.log(2.0), rel=1e-6)  # L/(2 sigma^2) + log sigma


def test_rlw_weights_positive_and_sum_to_task_count():
    rlw = get_balancer("rlw")
    losses = {f"t{i}": torch.tensor(1.0 + i, requires_grad=True) for i in range(5)}
    for _ in range(10):
        logs = rlw.backward(losses, [], None)
        w = np.array([logs[f"weight/t{i}"] for i in range(5)])
        assert (w > 0).all() and w.sum() == pytest.approx(5.0, rel=1e-5)


def test_famo_first_weights_are_inverse_losses_and_logits_favour_slow_tasks():
    famo = get_balancer("famo", lr=0.1)
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(2.0), "c": torch.tensor(4.0)}
    famo.combined_loss(losses)
    # z uniform -> w_t = (1/L_t) / sum_i (1/L_i)
    np.testing.assert_allclose(famo.last_weights.numpy(), np.array([1.0, 0.5, 0.25]) / 1.75, rtol=1e-5)
    famo.combined_loss({"a": torch.tensor(0.5), "b": torch.tensor(2.0), "c": torch.tensor(4.0)})
    logits = famo.state_dict()["logits"]
    # a's log-loss fell, the others stalled: FAMO evens out the rates, so a's logit falls
    # (Adam's first step moves each logit by lr against the sign of its gradient)
    assert logits[0] == pytest.approx(-0.1, rel=1e-4) and logits[1] == pytest.approx(0.1, rel=1e-4)
    assert logits[1] == pytest.approx(logits[2])


def test_auto_lambda_raises_aligned_and_lowers_conflicting_weights():
    lam = get_balancer("auto_lambda", init=0.5, lr=0.01)
    jac = torch.tensor([[1.0, 0.0], [0.8, 0.3], [-3.0, 0.0]])  # t2 conflicts with the sum of the others
    first = lam.weights(jac)
    assert first.tolist() == [0.5, 0.5, 0.5]
    after = lam.state_dict()["lambdas"]
    col = (torch.ones(3) @ (jac @ jac.T)).tolist()  # g_pri . g_t
    assert col[0] < 0 and col[2] > 0 or col[0] > 0 and col[2] < 0
    for a, c in zip(after, col):
        assert (a > 0.5) == (c > 0)


def test_imtl_loss_scales_get_the_imtl_l_gradient():
    model = Tiny()
    imtl = get_balancer("imtl", tasks=TASKS)
    losses, _ = model.losses()
    imtl.backward(losses, list(model.trunk.parameters()), None)
    s = imtl.extra_parameters()[0]
    expected = torch.stack([l.detach() for l in losses.values()]) - 1.0  # exp(0) L - 1
    torch.testing.assert_close(s.grad, expected)


def test_gradnorm_equalises_weighted_gradient_norms():
    """Two tasks, losses 100x apart, on one shared linear layer: only GradNorm's weights train."""
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    shared = nn.Linear(5, 4)
    heads = [nn.Linear(4, 1), nn.Linear(4, 1)]
    y = [torch.randn(64), 100 * torch.randn(64)]
    gn = get_balancer("gradnorm", tasks=["small", "big"], alpha=1.5)
    opt = torch.optim.Adam(gn.extra_parameters(), lr=0.02)

    def log_ratio() -> float:
        z = shared(x)
        losses = {n: ((h(z).squeeze(1) - t) ** 2).mean() for n, h, t in zip(["small", "big"], heads, y)}
        opt.zero_grad()
        logs = gn.backward(losses, list(shared.parameters()), None)
        opt.step()
        return abs(math.log(logs["gradnorm/big"] / logs["gradnorm/small"]))

    ratios = [log_ratio() for _ in range(200)]
    assert math.exp(ratios[0]) > 20  # unweighted, the norms differ ~37x
    tail = ratios[-20:]  # the L1 target makes the weights chatter around the balance point
    assert math.exp(max(tail)) < 1.2 and math.exp(sum(tail) / len(tail)) < 1.1
    assert sum(gn.extra_parameters()[0].tolist()) == pytest.approx(2.0, rel=0.05)


def test_gradnorm_at_feature_level_is_the_gradient_of_the_weighted_losses():
    model = Tiny()
    gn = make_balancer("gradnorm", feature_level=True)
    opt = torch.optim.SGD(gn.extra_parameters(), lr=0.5)
    for _ in range(3):  # move the weights away from 1
        one_step(model, gn)
        opt.step()
    twin = copy.deepcopy(model)
    logs = one_step(model, gn)
    w = [logs[f"weight/{t}"] for t in TASKS]
    assert max(abs(v - 1.0) for v in w) > 0.05
    losses, feats = twin.losses()
    want = torch.autograd.grad(sum(wt * loss for wt, loss in zip(w, losses.values())), list(twin.parameters()),
                               retain_graph=True)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    for wt, t, loss in zip(w, TASKS, losses.values()):  # G_t = w_t ||dL_t/dZ||
        norm = torch.linalg.vector_norm(torch.autograd.grad(loss, feats[0], retain_graph=True)[0])
        assert logs[f"gradnorm/{t}"] == pytest.approx(wt * float(norm), rel=1e-5)


def test_cosreg_penalty_hand_example():
    """L_a = (theta.a)^2 / 2, L_b = (theta.b)^2 / 2: g_a = (theta.a) a, g_b = (theta.b) b, so
    cos^2(g_a, g_b) = cos^2(a, b) = 1/2 for a = (1, 0), b = (1, 1) - constant in theta, so the
    penalty adds nothing to the update, which is g_a + g_b."""
    theta = nn.Parameter(torch.tensor([2.0, -3.0]))
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    losses = {"a": 0.5 * (theta @ a) ** 2, "b": 0.5 * (theta @ b) ** 2}
    logs = get_balancer("cosreg", lam=0.7).backward(losses, [theta], None)
    assert logs["cosreg/penalty"] == pytest.approx(0.5, rel=1e-6)
    torch.testing.assert_close(theta.grad, (theta @ a).detach() * a + (theta @ b).detach() * b)


def test_cosreg_closed_form_penalty_gradient_equals_autograd():
    rows = torch.randn(5, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rows[2] = 0.0  # a task without gradient: no cosine with it, and no gradient for it
    r = rows.clone().requires_grad_()
    unit = r / torch.linalg.vector_norm(r, dim=1, keepdim=True).clamp_min(1e-12)
    ref = sum((unit[i] @ unit[j]) ** 2 for i in range(5) for j in range(i + 1, 5))
    ref.backward()
    value, grad = get_balancer("cosreg").penalty_and_row_grads(list(rows))
    assert value == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(grad, r.grad, rtol=1e-10, atol=1e-12)
    assert grad[2].abs().max() == 0


def _cosreg_reference(model: Tiny, lam: float, feature_level: bool, reduction: str) -> tuple[list, float]:
    """Autograd of sum_t L_t + lam sum_{i<j} cos^2(g_i, g_j), the pairs written out one by one."""
    losses, feats = model.losses()
    xs = feats if feature_level else list(model.trunk.parameters())
    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, xs, create_graph=True)
        if reduction == "batch":
            grads = [g.sum(dim=0) for g in grads]
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    pen = sum(F.cosine_similarity(rows[i], rows[j], dim=0) ** 2
              for i in range(len(rows)) for j in range(i + 1, len(rows)))
    total = sum(losses.values()) + lam * pen
    return list(torch.autograd.grad(total, list(model.parameters()))), float(pen.detach())


@pytest.mark.parametrize("feature_level,reduction", [(False, "sample"), (True, "sample"), (True, "batch")])
def test_cosreg_update_is_the_gradient_of_the_regularised_loss(feature_level, reduction):
    model, twin = Tiny(), Tiny()
    logs = one_step(model, get_balancer("cosreg", lam=2.0, feature_level=feature_level,
                                        feature_reduction=reduction))
    want, pen = _cosreg_reference(twin, 2.0, feature_level, reduction)
    assert logs["cosreg/penalty"] == pytest.approx(pen, rel=1e-5)
    plain = torch.autograd.grad(sum(twin.losses()[0].values()), list(twin.parameters()))
    assert max(float((g - p).abs().max()) for g, p in zip(want, plain)) > 1e-3  # the penalty matters here
    for p, g in zip(model.parameters(), want):  # float32 second-order terms, summed in another order
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


# -- levels -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared_layer", [False, True])
def test_task_feature_grads_equal_one_backward_per_task(shared_layer, monkeypatch):
    """Own heads: ONE backward through them gives every task's dL_t/dZ (read at the edges into Z).
    A layer shared by the heads mixes the tasks' gradients, so then it takes one backward per task."""
    model = Tiny()
    z = model.trunk(X)
    mid = nn.Linear(10, 10)
    heads_in = torch.tanh(mid(z)) if shared_layer else z
    losses = [((h(heads_in).squeeze(1) - Y[:, i]) ** 2).mean() for i, h in enumerate(model.heads)]
    params = list(model.heads.parameters()) + (list(mid.parameters()) if shared_layer else [])
    want = [torch.autograd.grad(loss, [z] + params, retain_graph=True, allow_unused=True) for loss in losses]
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    feature_grads, heads, head_grads = task_feature_grads(losses, [z])
    monkeypatch.undo()
    assert len(calls) == (3 if shared_layer else 1)
    assert sorted(id(p) for p in heads) == sorted(id(p) for p in params)
    for t in range(len(losses)):
        torch.testing.assert_close(feature_grads[t][0], want[t][0], rtol=0, atol=0)
        by_id = {id(p): g for p, g in zip(params, want[t][1:])}
        for p, got in zip(heads, head_grads[t]):
            assert (got is None) == (by_id[id(p)] is None)
            if got is not None:
                torch.testing.assert_close(got, by_id[id(p)], rtol=0, atol=0)


def test_task_feature_grads_with_a_feature_computed_from_another():
    """Z2 = tanh(Z1): dL/dZ1 includes the path through Z2, which a one-pass read at the edges into the
    features would miss; feature_taps declines and the per-task passes give the true gradients."""
    model = Tiny()
    z1 = model.trunk(X)
    z2 = torch.tanh(z1)
    losses = [((h(z1 if i == 0 else z2).squeeze(1) - Y[:, i]) ** 2).mean() for i, h in enumerate(model.heads)]
    want = [torch.autograd.grad(loss, [z1, z2], retain_graph=True, allow_unused=True) for loss in losses]
    feature_grads, _, _ = task_feature_grads(losses, [z1, z2])
    for t in range(len(losses)):
        for k in range(2):
            if want[t][k] is None:
                assert feature_grads[t][k] is None
            else:
                torch.testing.assert_close(feature_grads[t][k], want[t][k], rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"feature_reduction": "batch"}, {"head_grads": "weighted"}])
def test_feature_level_ew_equals_plain_backprop(options):
    a, b = Tiny(), Tiny()
    one_step(a, get_balancer("ew"))
    logs = one_step(b, get_balancer("ew", feature_level=True, **options))
    assert logs["weight/t1"] == 1.0
    for ga, gb in zip(grads_of(a), grads_of(b)):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_weighted_heads_get_the_method_weights():
    a, b = Tiny(), Tiny()
    one_step(a, get_balancer("mgda"))
    logs = one_step(b, get_balancer("mgda", head_grads="weighted"))
    for i, t in enumerate(TASKS):
        for pa, pb in zip(a.heads[i].parameters(), b.heads[i].parameters()):
            torch.testing.assert_close(pb.grad, pa.grad * logs[f"weight/{t}"])
    for pa, pb in zip(a.trunk.parameters(), b.trunk.parameters()):  # the trunk does not depend on it
        torch.testing.assert_close(pa.grad, pb.grad)


@pytest.mark.parametrize("feature_level", [False, True])
def test_gradients_accumulate_like_backward(feature_level):
    a, b = Tiny(), Tiny()
    one_step(a, get_balancer("mgda", feature_level=feature_level))
    bal = get_balancer("mgda", feature_level=feature_level)
    one_step(b, bal)
    losses, feats = b.losses()
    bal.backward(losses, list(b.trunk.parameters()), feats)  # no zero_grad in between
    for ga, gb in zip(grads_of(a), grads_of(b)):
        torch.testing.assert_close(2 * ga, gb, rtol=1e-5, atol=1e-7)


# -- every balancer trains ----------------------------------------------------------------------------
CASES = [(n, False) for n in sorted(BALANCERS)] + [(n, True) for n in sorted(GRADIENT_METHODS)
                                                     if n not in FIXED_FEATURE_LEVEL]


@pytest.mark.parametrize("name,feature_level", CASES)
def test_twenty_steps_reduce_the_total_loss_without_nans(name, feature_level):
    model = Tiny()
    balancer = make_balancer(name, feature_level)
    opt = torch.optim.SGD(list(model.parameters()) + balancer.extra_parameters(), lr=0.05)
    before = model.total()
    for step in range(20):
        logs = one_step(model, balancer)
        assert all(math.isfinite(v) for v in logs.values()), logs
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        balancer.on_epoch_end(step, {})
    after = model.total()
    assert math.isfinite(after) and after < before


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_state_dict_round_trip_gives_identical_next_steps(name):
    feature_level = name in FIXED_FEATURE_LEVEL
    model = Tiny()
    first = make_balancer(name, feature_level)
    opt = torch.optim.SGD(list(model.parameters()) + first.extra_parameters(), lr=0.05)
    for step in range(4):
        one_step(model, first)
        opt.step()
        first.on_epoch_end(step, {})
    state = json.loads(json.dumps(first.state_dict()))  # what the trainer's checkpoint keeps
    second = make_balancer(name, feature_level)
    second.load_state_dict(state)
    twin = copy.deepcopy(model)
    for _ in range(2):
        torch.manual_seed(123)
        logs_a = one_step(model, first)
        torch.manual_seed(123)
        logs_b = one_step(twin, second)
        assert logs_a == pytest.approx(logs_b, rel=1e-6, abs=1e-9)
        for ga, gb in zip(grads_of(model), grads_of(twin)):
            torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)
        for pa, pb in zip(first.extra_parameters(), second.extra_parameters()):
            torch.testing.assert_close(pa.grad, pb.grad)
        assert json.dumps(first.state_dict()) == json.dumps(second.state_dict())


# -- errors ---------------------------------------------------------------------------------------------
def test_missing_inputs_give_errors_naming_the_balancer():
    model = Tiny()
    losses, _ = model.losses()
    with pytest.raises(ValueError, match="'pcgrad'.*features"):
        get_balancer("pcgrad", feature_level=True).backward(losses, list(model.trunk.parameters()), None)
    with pytest.raises(ValueError, match="'mgda'.*shared_params is empty"):
        get_balancer("mgda").backward(losses, [], None)
    with pytest.raises(ValueError, match="'mgda_ub'.*detached"):
        get_balancer("mgda_ub").backward(losses, [], [torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="'uw'.*tasks="):
        get_balancer("uw").extra_parameters()
    with pytest.raises(ValueError, match="'uw' was built for tasks"):
        get_balancer("uw", tasks=["x", "y"]).backward(losses, [], None)
    with pytest.raises(ValueError, match="feature_reduction"):
        get_balancer("cagrad", feature_reduction="mean")
    with pytest.raises(ValueError, match="'t1'.*scalar"):
        get_balancer("pcgrad").backward({"t1": torch.ones(3)}, list(model.trunk.parameters()), None)
    with pytest.raises(ValueError, match="unknown balancer 'nope'"):
        get_balancer("nope")
