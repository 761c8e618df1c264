"""InterroGate's gates and gated network: the primitives against hand-computed values, invariants of
the gated network at the extreme gate patterns, and networks or gates it must reject."""

from __future__ import annotations

import math

import pytest
import torch
from interrogate_helpers import TASKS, VIT, make_gated, max_diff
from torch import nn

from taskgrouping.data.builtin import multimnist
from taskgrouping.methods.interrogate import build_gated_network, gate_select, mix_streams, straight_through_gate
from taskgrouping.tasks import Task


@pytest.fixture(scope="module")
def mnist():
    return multimnist(n_train=16, n_val=8, n_test=16, seed=0)


# --------------------------------------------------------------------------------------------
# Gate primitives (hand-computed)
# --------------------------------------------------------------------------------------------

def test_straight_through_gate_forward_is_hard_and_gradient_is_sigmoid_derivative():
    alpha = torch.tensor([[2.0, 0.0], [-1.0, 0.5]], requires_grad=True)
    own = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]]])  # (T=2, B=1, C=2)
    shared = torch.tensor([[0.5, 4.0]])
    weights = torch.tensor([[1.0, -2.0]])  # loss = sum(weights * φ'_t) over tasks
    gates = straight_through_gate(alpha)
    # σ(0) = 0.5 is not > 0.5, so α = 0 selects the shared channel.
    assert gates.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    out = [gate_select(gates[t], own[t], shared, dim=1) for t in range(2)]
    assert out[0].tolist() == [[1.0, 4.0]] and out[1].tolist() == [[0.5, -1.0]]
    sum((weights * o).sum() for o in out).backward()

    def dsig(a: float) -> float:
        s = 1 / (1 + math.exp(-a))
        return s * (1 - s)

    # dL/dα_tc = σ'(α_tc) · (φ_tc − ψ_c) · w_c
    expected = [[dsig(2.0) * (1.0 - 0.5) * 1.0, dsig(0.0) * (2.0 - 4.0) * -2.0],
                [dsig(-1.0) * (3.0 - 0.5) * 1.0, dsig(0.5) * (-1.0 - 4.0) * -2.0]]
    assert alpha.grad.flatten().tolist() == pytest.approx([v for row in expected for v in row], rel=1e-6)


@pytest.mark.parametrize("dim,shape", [(1, (3, 4, 5, 5)), (-1, (3, 7, 4))])
def test_gate_select_has_the_gradients_of_its_formula_for_any_gate_value(dim, shape):
    """Against ``G ⊙ own + (1 − G) ⊙ shared`` written out, with soft gates in [0, 1] (values and every
    gradient: own, shared and the gate), channels on ``dim``."""
    torch.manual_seed(0)
    own, shared = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    gate = torch.rand(shape[dim], requires_grad=True)
    upstream = torch.randn(shape)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    results = []
    for f in (lambda: gate_select(gate, own, shared, dim),
              lambda: gate.view(view) * own + (1 - gate.view(view)) * shared):
        out = f()
        grads = torch.autograd.grad(out, (own, shared, gate), upstream)
        results.append((out, *grads))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_beta_mixing_is_a_per_channel_softmax_over_tasks():
    beta = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])  # C=2, T=2
    streams = [torch.tensor([[1.0, 10.0]]), torch.tensor([[5.0, 20.0]])]
    mixed = mix_streams(streams, torch.softmax(beta, dim=1), dim=1)
    # channel 0: weights (1/4, 3/4); channel 1: weights (4/5, 1/5)
    assert mixed[0].tolist() == pytest.approx([0.25 * 1 + 0.75 * 5, 0.8 * 10 + 0.2 * 20])


# --------------------------------------------------------------------------------------------
# Invariants of the gated network
# --------------------------------------------------------------------------------------------

def test_all_task_specific_gates_reproduce_the_single_task_networks_and_cut_the_shared_branch(mnist):
    net, shared, branches, heads = make_gated("small_cnn", mnist.input_shape, {}, mnist.tasks[:3])
    net.set_gates({k: torch.ones_like(g.alpha, dtype=torch.bool) for k, g in net.gate_points().items()})
    x = mnist.test.x[:8]
    out = net(x)
    for t in mnist.tasks[:3]:
        assert torch.equal(out[t.name], heads[t.name](branches[t.name](x)))
    sum(o.square().sum() for o in out.values()).backward()
    shared_grads = [p.grad for item in net.items if hasattr(item, "shared") for p in item.shared.parameters()]
    assert shared_grads and all(g is None or not g.any() for g in shared_grads)


@pytest.mark.parametrize("backbone,shape,options", [("small_cnn", (1, 28, 28), {}), VIT])
def test_all_shared_gates_reproduce_the_shared_network(backbone, shape, options):
    tasks = [Task(f"t{i}", "binary") for i in range(3)]
    net, shared, _, heads = make_gated(backbone, shape, options, tasks)
    net.set_gates({k: torch.zeros_like(g.alpha, dtype=torch.bool) for k, g in net.gate_points().items()})
    x = torch.randn(4, *shape)
    out = net(x)
    z = shared(x)
    # the β mixture of identical streams only re-rounds (Σ_t w_t = 1)
    assert max_diff(out, {t.name: heads[t.name](z) for t in tasks}) < 1e-5


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_backbone_without_gateable_layers_is_rejected():
    heads = {t.name: nn.Linear(4, 2) for t in TASKS}
    plain = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(ValueError, match="no layer to gate"):
        build_gated_network(plain, {t.name: plain for t in TASKS}, heads)
    odd = nn.Sequential(nn.Conv1d(1, 4, 3))
    with pytest.raises(ValueError, match=r"cannot gate layer '0' \(Conv1d\)"):
        build_gated_network(odd, {t.name: odd for t in TASKS}, heads)
    with pytest.raises(ValueError, match="does not have the shared branch's architecture"):
        build_gated_network(nn.Sequential(nn.Linear(4, 4)),
                            {"left": nn.Sequential(nn.Linear(4, 4)), "right": nn.Sequential(nn.Linear(4, 5))}, heads)


def test_forcing_unknown_or_misshaped_gates_is_rejected():
    net, *_ = make_gated("mlp", (8,), {"widths": (4,)}, TASKS)
    with pytest.raises(ValueError, match="unknown gated layer 'nope'"):
        net.set_gates({"nope": torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"must have shape \(2, 4\)"):
        net.set_gates({"0.1": torch.ones(3, 4, dtype=torch.bool)})

