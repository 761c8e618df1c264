"""CosReg with sampled Hessian-vector products (``hvp_tasks``).

Pins: the update averaged over all C(T, m) subsets of second-order tasks equals the exact update
(unbiasedness, an invariant), which in turn equals autograd of the regularised loss of Suteu & Guo
2019 written out pair by pair (a peer computation); ``hvp_tasks=T`` is the exact update; each task
is drawn with frequency m / T; bad ``hvp_tasks`` values are a ``ValueError`` naming the value; the
same seed (or a JSON state round trip, as the trainer's checkpoint keeps it) gives the same steps.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taskgrouping.balancing.base import get_balancer
from taskgrouping.balancing.cosreg import CosReg

torch.set_num_threads(1)

T = 4
LAM = 3.0
X = torch.randn(32, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randn(32, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


class Tiny(nn.Module):
    """A tanh MLP trunk (curved, so every H_t v_t matters) with one regression head per task; float64
    so that averages over subsets can be compared tightly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh()).double()
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(T)).double()

    def losses(self) -> dict[str, torch.Tensor]:
        z = self.trunk(X)
        return {f"t{i}": ((h(z).squeeze(1) - Y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)}


def step(model: Tiny, balancer: CosReg, subset=None) -> list[torch.Tensor]:
    """One update's parameter gradients: the public path, or the update for a given subset."""
    model.zero_grad(set_to_none=True)
    shared = list(model.trunk.parameters())
    if subset is None:
        balancer.backward(model.losses(), shared)
    else:
        balancer._backward(model.losses(), shared, None, subset)
    return [p.grad.clone() for p in model.parameters()]


def reference(model: Tiny) -> list[torch.Tensor]:
    """Autograd of sum_t L_t + LAM sum_{i<j} cos^2(g_i, g_j), g_t over the trunk's parameters."""
    losses = list(model.losses().values())
    trunk = list(model.trunk.parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trunk, create_graph=True)])
            for loss in losses]
    pen = sum(F.cosine_similarity(rows[i], rows[j], dim=0) ** 2 for i in range(T) for j in range(i + 1, T))
    return list(torch.autograd.grad(sum(losses) + LAM * pen, list(model.parameters())))


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-9, atol: float = 1e-12) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_average_over_all_subsets_is_the_exact_update(m):
    model = Tiny()
    exact = step(model, get_balancer("cosreg", lam=LAM))
    assert_same(exact, reference(model))
    sampled = CosReg(lam=LAM, hvp_tasks=m)
    updates = [step(model, sampled, subset) for subset in itertools.combinations(range(T), m)]
    mean = [torch.stack(gs).mean(dim=0) for gs in zip(*updates)]
    assert_same(mean, exact)
    # Each single subset is a noisy estimate, so the equality above is not vacuous.
    assert max(float((g - e).abs().max()) for g, e in zip(updates[0], exact)) > 1e-3


def test_hvp_tasks_equal_to_the_task_count_is_the_exact_update():
    model = Tiny()
    exact = step(model, CosReg(lam=LAM))
    sampled = CosReg(lam=LAM, hvp_tasks=T, seed=5)
    for _ in range(2):
        assert_same(step(model, sampled), exact)


def test_public_path_uses_its_drawn_subset_and_draws_uniformly():
    model = Tiny()
    public, twin = CosReg(lam=LAM, hvp_tasks=2, seed=11), CosReg(lam=LAM, hvp_tasks=2, seed=11)
    for _ in range(3):
        subset = twin._draw(T)
        assert_same(step(model, public), step(model, CosReg(lam=LAM, hvp_tasks=2), subset))
    draws = CosReg(hvp_tasks=1, seed=0)
    counts = torch.zeros(T)
    for _ in range(4000):
        (t,) = draws._draw(T)
        counts[t] += 1
    # Binomial(4000, 1/4): standard deviation about 27.
    assert float((counts - 1000).abs().max()) < 5 * 27.4
    pairs = CosReg(hvp_tasks=3, seed=0)
    assert all(len(set(pairs._draw(T))) == 3 for _ in range(50))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_hvp_tasks_is_an_error_naming_the_value(bad):
    with pytest.raises(ValueError, match=f"hvp_tasks.*{bad!r}"):
        get_balancer("cosreg", hvp_tasks=bad)


def test_hvp_tasks_above_the_task_count_or_at_feature_level_is_an_error():
    with pytest.raises(ValueError, match=f"hvp_tasks={T + 1} exceeds the {T} tasks"):
        step(Tiny(), CosReg(hvp_tasks=T + 1))
    with pytest.raises(ValueError, match="hvp_tasks=2 applies at parameter level only"):
        CosReg(hvp_tasks=2, feature_level=True)
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -3"):
        CosReg(hvp_tasks=1, seed=-3)


def test_same_seed_gives_same_steps_and_state_round_trip_resumes_the_draws():
    model = Tiny()
    a, b, other = (CosReg(lam=LAM, hvp_tasks=1, seed=s) for s in (7, 7, 8))
    runs = [[step(model, bal) for _ in range(6)] for bal in (a, b, other)]
    for ga, gb in zip(runs[0], runs[1]):
        assert_same(ga, gb, rtol=0, atol=0)
    assert any(float((x - y).abs().max()) > 1e-6 for ga, gc in zip(runs[0], runs[2]) for x, y in zip(ga, gc))

    first = CosReg(lam=LAM, hvp_tasks=1, seed=7)
    for _ in range(3):
        step(model, first)
    resumed = CosReg(lam=LAM, hvp_tasks=1, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # the trainer keeps JSON
    for k in range(3, 6):
        assert_same(step(model, resumed), runs[0][k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="'draws'.*-1"):
        resumed.load_state_dict({"draws": -1})
