"""Our TorchJD-backed (and TorchJD-shadowing) balancers against TorchJD's aggregators called directly.

TorchJD is the peer implementation: the same random Jacobian (and, for randomised methods, the
same RNG state) must give the same update vector. The end-to-end tests also check that the
parameter-level and feature-level machinery hands TorchJD the right Jacobian and writes its
answer back into ``.grad`` correctly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn
from torchjd import aggregation as jda

from taskgrouping.balancing.base import get_balancer
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


@pytest.mark.parametrize("name", ["cagrad", "nash_mtl"])
def test_cvxpy_solver_is_torchjd_or_a_clear_error(name):
    jac = torch.randn(3, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    if not cvxpy_available():
        with pytest.raises(ImportError, match=r"pip install taskgrouping\[solvers\]"):
            get_balancer(name, solver="cvxpy").aggregate(jac)
        return
    scipy_w = get_balancer(name, solver="scipy").weights(jac)
    cvx_w = get_balancer(name, solver="cvxpy").weights(jac)
    torch.testing.assert_close(cvx_w, scipy_w, rtol=1e-2, atol=1e-3)
