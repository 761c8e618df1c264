"""InterroGate's gates and gated network: the primitives against hand-computed values, invariants of
the gated network at the extreme gate patterns, and networks or gates it must reject."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
from interrogate_helpers import TASKS, VIT, make_gated, max_diff
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from taskgrouping.data.builtin import multimnist
from taskgrouping.engine.trainer import set_branch_mode
from taskgrouping.methods.interrogate import build_gated_network, gate_select, mix_streams, straight_through_gate
from taskgrouping.methods.interrogate.gates import select_and_mix
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


def _formula(gates, weights, shared, own, dim, need_mix):
    out = [gate_select(gates[t], o, shared, dim) for t, o in enumerate(own)]
    return (mix_streams(out, weights, dim) if need_mix else None), out


def _gate_logits(pattern: str, t: int, c: int) -> torch.Tensor:
    alpha = torch.randn(t, c)
    if pattern == "own":
        return alpha.abs() + 0.1
    if pattern == "shared":
        return -alpha.abs() - 0.1
    alpha[0], alpha[1] = 1.0, -1.0  # one task all own, one all shared, the rest mixed
    return alpha


@pytest.mark.parametrize("pattern", ["own", "shared", "mixed"])
@pytest.mark.parametrize("dim,shape", [(1, (5, 6, 3, 3)), (-1, (5, 7, 6))])
@pytest.mark.parametrize("need_mix,unused", [(True, False), (True, True), (False, False)])
def test_select_and_mix_has_the_values_and_gradients_of_the_formula(pattern, dim, shape, need_mix, unused):
    """The fused node against :func:`gate_select` + :func:`mix_streams` through autograd: the same bits
    forward, the same gradients for α, β and every stream (also with one task's output unused)."""
    torch.manual_seed(0)
    n_tasks = 4
    alpha = _gate_logits(pattern, n_tasks, shape[dim]).requires_grad_(True)
    beta = torch.randn(shape[dim], n_tasks, requires_grad=True)
    shared = torch.randn(shape, requires_grad=True)
    own = [torch.randn(shape, requires_grad=True) for _ in range(n_tasks)]
    upstream = [torch.randn(shape) for _ in range(n_tasks + 1)]
    leaves = [alpha, beta, shared, *own]
    results = []
    for f in (select_and_mix, _formula):
        mixed, out = f(straight_through_gate(alpha), torch.softmax(beta, 1), shared, own, dim, need_mix)
        pairs = [(o, u) for t, (o, u) in enumerate(zip(out, upstream)) if not (unused and t == 2)]
        pairs += [(mixed, upstream[-1])] if need_mix else []
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [u for _, u in pairs], allow_unused=True)
        results.append((out + ([mixed] if need_mix else []), [torch.zeros_like(v) if g is None else g
                                                             for g, v in zip(grads, leaves)]))
    (values, grads), (want_values, want_grads) = results
    assert all(torch.equal(a, b) for a, b in zip(values, want_values))
    for g, want in zip(grads, want_grads):  # (β's gradient is 0 up to rounding where every task reads ψ)
        assert float((g - want).norm()) <= 1e-6 * float(want.norm()) + 1e-6


def test_select_and_mix_second_derivatives_are_the_formulas():
    """Under ``create_graph`` (a gradient penalty) the fused node is differentiable as the formula is."""
    torch.manual_seed(0)
    alpha = _gate_logits("mixed", 4, 5).double().requires_grad_(True)
    beta = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    own = [torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    second = []
    for f in (select_and_mix, _formula):
        mixed, out = f(straight_through_gate(alpha), torch.softmax(beta, 1), shared, own, 1, True)
        loss = mixed.square().sum() + sum(o.pow(3).sum() for o in out)
        grads = torch.autograd.grad(loss, [shared, *own], create_graph=True)
        second.append(torch.autograd.grad(sum(g.square().sum() for g in grads), [alpha, beta, shared]))
    for a, b in zip(*second):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_select_and_mix_leaves_no_reference_cycle():
    """The node keeps what its backward pass needs through ``save_for_backward`` (an output kept as an
    attribute of ``ctx`` would hold a cycle, and every step's activations until the garbage collector ran)."""
    alpha = _gate_logits("mixed", 3, 4).requires_grad_(True)
    beta = torch.randn(4, 3, requires_grad=True)

    def step() -> None:
        shared, own = torch.randn(2, 4, 5, requires_grad=True), [torch.randn(2, 4, 5, requires_grad=True)
                                                                 for _ in range(3)]
        mixed, out = select_and_mix(straight_through_gate(alpha), torch.softmax(beta, 1), shared, own, 1, True)
        (mixed.sum() + sum(o.sum() for o in out)).backward()
    step()
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            step()
        assert gc.collect() == 0
    finally:
        gc.enable()


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched, by name (``convolution_backward``, ...)."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_a_shared_stream_no_task_reads_gets_zero_gradients_without_running_its_backward():
    """At the start (every gate 1) no task reads the shared stream: its parameters get the zero gradient
    the formula gives them (so Adam steps them as before) while its layers back-propagate nothing; the
    stacked streams, autograd through the formula, give the same gradients and the same Adam step."""
    net, *_ = make_gated("small_cnn", (1, 12, 12), {"channels": [4, 6], "feature_dim": 8}, TASKS)
    x = torch.randn(5, 1, 12, 12)
    stepped = {}
    for mode in ("loop", "stacked"):
        model = copy.deepcopy(net)
        set_branch_mode(model, mode)
        opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
        counts: dict[str, int] = {}
        with OpCounter(counts):
            sum(v.square().sum() for v in model(x).values()).backward()
        shared = [p for p in model.parameters() if id(p) in {id(q) for q in model.shared_parameters()}]
        assert shared and all(p.grad is not None and not p.grad.any() for p in shared)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        stepped[mode] = (counts.get("convolution_backward", 0), grads, [p.detach().clone() for p in model.parameters()])
    (loop_convs, loop_grads, loop_params), (_, stacked_grads, stacked_params) = stepped["loop"], stepped["stacked"]
    assert loop_grads.keys() == stacked_grads.keys()
    assert all(torch.allclose(loop_grads[n], stacked_grads[n], atol=1e-6) for n in loop_grads)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(loop_params, stacked_params))
    # the two task streams' convolutions back-propagate in the loop; the shared stream's do not (4 = 2 tasks x 2)
    assert loop_convs == 4


def test_in_place_layers_between_gates_run_out_of_place():
    """A task's φ'_t may be the very tensor another stream reads; an in-place layer after a gate would
    overwrite it. The gated network runs such layers out of place, with the same outputs."""
    def backbone(inplace: bool) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()),
                             nn.Sequential(nn.Flatten(), nn.ReLU(inplace=inplace), nn.Linear(400, 8), nn.ReLU()))

    nets = []
    for inplace in (True, False):
        torch.manual_seed(1)
        heads = {t.name: nn.Linear(8, 1) for t in TASKS}
        nets.append(build_gated_network(backbone(inplace), {t.name: backbone(inplace) for t in TASKS}, heads))
    x = torch.randn(3, 1, 12, 12)
    outs = [net(x) for net in nets]
    for net, out in zip(nets, outs):
        sum(v.sum() for v in out.values()).backward()
    assert max_diff(outs[0], outs[1]) == 0
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(nets[0].parameters(), nets[1].parameters())
               if a.grad is not None)


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

