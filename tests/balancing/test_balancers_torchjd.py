"""Our TorchJD-backed (and TorchJD-shadowing) balancers against TorchJD's aggregators called directly.

TorchJD is the peer implementation: the same random Jacobian (and, for randomised methods, the
same RNG state) must give the same update vector. PCGrad, GradVac and MGDA are hand-written on the
Gramian (TorchJD's per-pair scalar loops are too slow for the feature-level surrogate); their
weights must equal TorchJD's weightings on the same float64 Gramians to rounding, GradVac's over a
whole trajectory of its EMA state. The end-to-end tests also check that the parameter-level and
feature-level machinery hands TorchJD the right Jacobian and writes its answer back into ``.grad``
correctly. CAGrad's and Nash-MTL's SciPy solvers are pinned against the problems they solve
(CAGrad's primal, an independent SLSQP solve of its dual and the KKT conditions; Nash-MTL's
bargaining equation).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn
from torchjd import aggregation as jda

from taskgrouping.balancing.base import get_balancer
from taskgrouping.balancing.gramian_weightings import GradVacWeights, mgda_weights, pcgrad_weights
from taskgrouping.balancing.solvers import cagrad_dual, nash_mtl_weights
from taskgrouping.balancing.torchjd_adapter import cvxpy_available

torch.set_num_threads(1)

# our name -> (options, TorchJD aggregator factory taking the number of tasks)
PEERS = {
    "pcgrad": ({}, lambda t: jda.PCGrad()),
    "mgda": ({}, lambda t: jda.MGDA()),
    "imtl": ({"loss_scaling": False}, lambda t: jda.IMTLG()),
    "aligned_mtl": ({}, lambda t: jda.AlignedMTL()),
    "graddrop": ({}, lambda t: jda.GradDrop()),
}


def _jacobians():
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(t, d, generator=gen) for t, d in ((2, 5), (3, 7), (5, 40), (8, 300))]
    scales = torch.tensor([1.0, 30.0, 0.05])[:, None]  # very different gradient norms
    out.append(torch.randn(3, 11, generator=gen) * scales)
    return out


@pytest.mark.parametrize("name", sorted(PEERS))
def test_direction_equals_torchjd(name):
    options, peer = PEERS[name]
    for jac in _jacobians():
        ours = get_balancer(name, **options)
        torch.manual_seed(7)
        got = ours.aggregate(jac)
        torch.manual_seed(7)
        want = peer(jac.shape[0])(jac)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rgw_is_torchjd_random_scaled_to_task_count():
    for jac in _jacobians():
        torch.manual_seed(3)
        got = get_balancer("rgw").aggregate(jac)
        torch.manual_seed(3)
        want = jda.Random()(jac) * jac.shape[0]
        torch.testing.assert_close(got, want)


def test_gradvac_matches_torchjd_over_a_sequence():
    """GradVac is stateful (EMA of target cosines): the whole trajectory must agree."""
    gen = torch.Generator().manual_seed(1)
    ours, peer = get_balancer("gradvac", beta=0.3), jda.GradVac(beta=0.3)
    for _ in range(4):
        jac = torch.randn(4, 9, generator=gen)
        torch.manual_seed(11)
        got = ours.aggregate(jac)
        torch.manual_seed(11)
        want = peer(jac)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _gramians(n: int = 12, seed: int = 10) -> list[np.ndarray]:
    """Gramians of random Jacobians with 2..8 tasks, some with conflicting and very unequal rows."""
    gen = np.random.default_rng(seed)
    out = []
    for k in range(n):
        t = 2 + k % 7
        jac = gen.normal(size=(t, 3 * t + 5)) * gen.uniform(0.05, 20.0, size=(t, 1))
        if k % 2:
            jac[1] = -0.7 * jac[0] + 0.2 * jac[1]  # a strong conflict
        out.append(jac @ jac.T)
    return out


def test_pcgrad_and_mgda_weights_equal_torchjd_weightings_on_float64_gramians():
    for k, gram in enumerate(_gramians()):
        g64 = torch.tensor(gram)
        torch.manual_seed(k)
        ours = pcgrad_weights(gram)
        torch.manual_seed(k)
        np.testing.assert_allclose(ours, jda.PCGradWeighting()(g64).numpy(), rtol=1e-12, atol=1e-12)
        for eps, iters in ((1e-3, 100), (1e-6, 300)):
            np.testing.assert_allclose(mgda_weights(gram, eps, iters),
                                       jda.MGDAWeighting(epsilon=eps, max_iters=iters)(g64).numpy(),
                                       rtol=1e-9, atol=1e-12)


def test_gradvac_ema_trajectory_equals_torchjd_through_a_state_round_trip():
    """Ten steps with the same seeds; after five, our state goes through JSON into a new object."""
    gen = np.random.default_rng(3)
    ours, peer = GradVacWeights(beta=0.3), jda.GradVacWeighting(beta=0.3)
    jac0 = gen.normal(size=(5, 12))
    for step in range(10):
        jac = jac0 + 0.8 * gen.normal(size=jac0.shape)  # correlated steps: the targets matter
        gram = jac @ jac.T
        torch.manual_seed(100 + step)
        got = ours(gram)
        torch.manual_seed(100 + step)
        want = peer(torch.tensor(gram)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ours.phi, peer._phi_t.numpy(), rtol=1e-10, atol=1e-12)
        if step == 4:
            restored = GradVacWeights(beta=0.3)
            restored.load_state(json.loads(json.dumps(ours.state())))
            ours = restored
    assert np.abs(ours.phi).max() > 0.05  # the EMA targets moved away from zero, so they were exercised


# -- end to end: the Jacobian handed to TorchJD and the gradients written back --------------------
X = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
Y = torch.randn(32, 3, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0, 4.0, 0.3])


def _model():
    torch.manual_seed(5)
    trunk = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    return trunk, heads


def _losses(trunk, heads):
    z = trunk(X)
    return {f"t{i}": ((h(z).squeeze(1) - Y[:, i]) ** 2).mean() for i, h in enumerate(heads)}, z


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "imtl", "aligned_mtl"])
def test_parameter_level_gradients_equal_torchjd_on_the_model_jacobian(name):
    options, peer = PEERS[name]
    trunk, heads = _model()
    losses, _ = _losses(trunk, heads)
    shared = list(trunk.parameters())
    jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, shared, retain_graph=True)])
                       for l in losses.values()])
    torch.manual_seed(9)
    want = peer(3)(jac)
    head_want = [torch.autograd.grad(l, list(h.parameters()), retain_graph=True)
                 for l, h in zip(losses.values(), heads)]
    torch.manual_seed(9)
    get_balancer(name, **options).backward(losses, shared, None)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for h, gw in zip(heads, head_want):  # heads: their own loss's plain gradient
        for p, g in zip(h.parameters(), gw):
            torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("name", ["mgda_ub", "aligned_mtl_ub"])
def test_feature_level_trunk_gradient_is_torchjd_on_the_feature_jacobian(name):
    peer = {"mgda_ub": jda.MGDA(), "aligned_mtl_ub": jda.AlignedMTL()}[name]
    trunk, heads = _model()
    losses, z = _losses(trunk, heads)
    shared = list(trunk.parameters())
    jac = torch.stack([torch.autograd.grad(l, z, retain_graph=True)[0].reshape(-1) for l in losses.values()])
    direction = peer(jac).reshape(z.shape)
    want = torch.autograd.grad(z, shared, grad_outputs=direction, retain_graph=True)
    get_balancer(name).backward(losses, shared, [z])
    for p, g in zip(shared, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


# -- methods whose TorchJD version needs cvxpy ----------------------------------------------------
def _primal_cagrad(jac: np.ndarray, c: float) -> np.ndarray:
    """CAGrad's primal (Liu et al. 2021, Eq. 3): max_d min_i g_i.d  s.t. ||d - g0|| <= c ||g0||."""
    g0 = jac.mean(axis=0)
    radius = c * np.linalg.norm(g0)
    # variables (d, s): maximise s subject to g_i.d >= s and the ball constraint
    x0 = np.concatenate([g0, [min(jac @ g0)]])
    cons = [{"type": "ineq", "fun": lambda x, i=i: jac[i] @ x[:-1] - x[-1]} for i in range(len(jac))]
    cons.append({"type": "ineq", "fun": lambda x: radius ** 2 - np.sum((x[:-1] - g0) ** 2)})
    res = minimize(lambda x: -x[-1], x0, constraints=cons, method="SLSQP", options={"ftol": 1e-13, "maxiter": 500})
    return res.x[:-1]


def test_cagrad_scipy_solves_the_primal_problem():
    gen = np.random.default_rng(4)
    for t, d, c in ((2, 4, 0.5), (3, 6, 0.4), (4, 8, 0.8)):
        jac = gen.normal(size=(t, d))
        jac[1] *= 3.0
        ours = get_balancer("cagrad", c=c, rescale=0).aggregate(torch.tensor(jac, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(ours, _primal_cagrad(jac, c), rtol=2e-3, atol=2e-3)
    # c = 0 is the mean gradient; rescale=1 divides by 1 + c^2 (the authors' default)
    jac = torch.tensor(gen.normal(size=(3, 5)))
    torch.testing.assert_close(get_balancer("cagrad", c=0.0).aggregate(jac), jac.mean(0))
    torch.testing.assert_close(get_balancer("cagrad", c=0.5, rescale=1).aggregate(jac),
                               get_balancer("cagrad", c=0.5, rescale=0).aggregate(jac) / 1.25)


def _cagrad_dual_reference(gram: np.ndarray, c: float):
    """CAGrad's dual (Liu et al. 2021) written out here, solved by SLSQP at a tight tolerance."""
    g = gram / np.trace(gram)
    t = len(g)
    b = g @ np.full(t, 1.0 / t)
    k = c * np.sqrt(b.mean())

    def f(w):
        return w @ b + k * np.sqrt(w @ g @ w)

    res = minimize(f, np.full(t, 1.0 / t), jac=lambda w: b + k * g @ w / np.sqrt(w @ g @ w), method="SLSQP",
                   bounds=[(0, 1)] * t, constraints=({"type": "eq", "fun": lambda w: w.sum() - 1},),
                   options={"ftol": 1e-15, "maxiter": 1000})
    return res.x, f, (lambda w: b + k * g @ w / np.sqrt(w @ g @ w))


def test_cagrad_exact_dual_solve_is_the_optimum_slsqp_finds():
    gen = np.random.default_rng(11)
    with_zeros = 0
    for case in range(60):
        t = 2 + case % 8
        jac = gen.normal(size=(t, 2 * t + 3)) * gen.uniform(0.1, 5.0, size=(t, 1))
        if case % 3 == 0:
            jac[1] = -0.8 * jac[0] + 0.1 * jac[1]
        c = (0.1, 0.4, 0.8, 2.0)[case % 4]
        gram = jac @ jac.T
        w = cagrad_dual(gram, c)
        ref, f, grad = _cagrad_dual_reference(gram, c)
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-12)
        assert f(w) <= f(ref) + 1e-12  # at least as good as SLSQP's optimum
        np.testing.assert_allclose(w, ref, atol=2e-5)  # SLSQP's own accuracy on the weights
        gw, on = grad(w), w > 0  # KKT: equal gradient on the support, no smaller one off it
        lam = gw[on].mean()
        np.testing.assert_allclose(gw[on], lam, rtol=0, atol=1e-8)
        assert (gw[~on] >= lam - 1e-8).all()
        with_zeros += int((~on).any())
        # warm starts (the last step's solution, or another problem's) give the same answer
        np.testing.assert_allclose(cagrad_dual(gram, c, init=w), w, atol=1e-12)
        np.testing.assert_allclose(cagrad_dual(gram, c, init=np.roll(w, 1)), w, atol=1e-9)
    assert with_zeros >= 15  # the active set was exercised


def test_cagrad_slsqp_fallback_agrees_with_the_exact_solve(monkeypatch):
    from taskgrouping.balancing import solvers

    gen = np.random.default_rng(12)
    jacs = []
    for t in (3, 5, 8):
        jac = gen.normal(size=(t, 20))
        jac[1] = -0.8 * jac[0] + 0.1 * jac[1]
        jacs.append(jac)
    dup = gen.normal(size=(4, 9))
    dup[3] = dup[2]  # two identical tasks: a singular Gramian, and the weights of the pair are not unique
    jacs.append(dup)
    exact = [cagrad_dual(j @ j.T, 0.5) for j in jacs]
    monkeypatch.setattr(solvers, "_cagrad_active_set", lambda *args: None)
    for jac, w in zip(jacs, exact):  # the same combined gradient J^T w
        np.testing.assert_allclose(jac.T @ cagrad_dual(jac @ jac.T, 0.5), jac.T @ w, atol=5e-5)


def test_nash_mtl_newton_solve_reaches_rounding_and_warm_starts_agree():
    for gram in _gramians():
        alpha = nash_mtl_weights(gram)
        normed = gram / np.linalg.norm(gram)
        np.testing.assert_allclose(normed @ alpha, 1.0 / alpha, rtol=1e-9)  # Navon et al. 2022, Eq. 2
        np.testing.assert_allclose(nash_mtl_weights(gram, init=alpha * 1.5), alpha, rtol=1e-9)


def test_nash_mtl_scipy_weights_are_the_bargaining_solution():
    gen = torch.Generator().manual_seed(6)
    jac = torch.randn(4, 12, generator=gen, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [0.5], [5.0]],
                                                                                   dtype=torch.float64)
    w = get_balancer("nash_mtl", max_norm=0.0).weights(jac).numpy()
    gram = (jac @ jac.T).numpy()
    gram = gram / np.linalg.norm(gram)
    np.testing.assert_allclose(gram @ w, 1.0 / w, rtol=1e-4)  # Navon et al. 2022, Eq. 2
    # orthogonal gradients: alpha_i = 1 / ||g_i|| on the normalised Gramian (their Sec. 3)
    ortho = torch.diag(torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64))
    w = get_balancer("nash_mtl", max_norm=0.0).weights(ortho).numpy()
    norms = np.array([1.0, 3.0, 0.2]) / np.sqrt(np.linalg.norm(np.diag([1.0, 9.0, 0.04])))
    np.testing.assert_allclose(w, 1.0 / norms, rtol=1e-5)
    # max_norm clips the update
    clipped = get_balancer("nash_mtl", max_norm=0.1).aggregate(ortho)
    assert float(torch.linalg.vector_norm(clipped)) == pytest.approx(0.1, rel=1e-6)


def _cvxpy_jacobian() -> torch.Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)


@pytest.mark.skipif(not cvxpy_available(),
                    reason="cvxpy extra not installed: pip install -e '.[solvers]' to run the comparison with TorchJD")
@pytest.mark.parametrize("name", ["cagrad", "nash_mtl"])
def test_cvxpy_solver_is_torchjd(name):
    jac = _cvxpy_jacobian()
    scipy_w = get_balancer(name, solver="scipy").weights(jac)
    cvx_w = get_balancer(name, solver="cvxpy").weights(jac)
    torch.testing.assert_close(cvx_w, scipy_w, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", ["cagrad", "nash_mtl"])
def test_cvxpy_solver_without_the_extra_is_a_clear_error(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxpy", None)  # as if the extra were not installed: `import cvxpy` fails
    with pytest.raises(ImportError, match=r"pip install taskgrouping\[solvers\]"):
        get_balancer(name, solver="cvxpy").aggregate(_cvxpy_jacobian())
