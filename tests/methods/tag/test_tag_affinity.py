"""TAG: the lookahead affinity pinned to hand computations and to torch's own optimisers, and its
accumulation over epochs (the group selection is in test_tag_selection.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from taskgrouping.methods.tag import AffinityAccumulator, load_affinity, lookahead_affinity, select_groups


def as_sets(groups):
    return {frozenset(g) for g in groups}


# ------------------------------------------------------------------ lookahead


class TinyLinear(nn.Module):
    """pred_t = h_t * w * x with a shared scalar w and per-task heads h_t."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.heads = nn.ParameterDict({"a": nn.Parameter(torch.ones(1, dtype=torch.float64)),
                                       "b": nn.Parameter(torch.ones(1, dtype=torch.float64))})
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))


def tiny_losses(model, batch):
    x, ys = batch
    model.calls += 1  # a buffer the call must restore
    return {t: ((model.heads[t] * model.w * x - y) ** 2).mean() for t, y in ys.items()}


BATCH = (torch.ones(1, dtype=torch.float64),
         {"a": torch.ones(1, dtype=torch.float64), "b": torch.full((1,), 3.0, dtype=torch.float64)})


def test_lookahead_sgd_by_hand_and_restores_everything():
    model = TinyLinear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    z = lookahead_affinity(model, [model.w], tiny_losses, BATCH, lr=0.1)
    # L_a = (w-1)^2 = 1, L_b = (w-3)^2 = 9 at w = 0; gradients -2 and -6.
    # step on a: w = 0.2 -> L_a = 0.64, L_b = 7.84; step on b: w = 0.6 -> L_a = 0.16, L_b = 5.76.
    expected = torch.tensor([[1 - 0.64, 1 - 7.84 / 9], [1 - 0.16, 1 - 5.76 / 9]], dtype=torch.float64)
    assert torch.allclose(z, expected, atol=1e-12)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert model.w.grad is None and model.heads["a"].grad is None
    z2 = lookahead_affinity(model, [model.w], tiny_losses, BATCH, lr=0.1, divide_by_lr=True)
    assert torch.allclose(z2, expected / 0.1, atol=1e-10)


def test_lookahead_sgd_weight_decay_by_hand():
    model = TinyLinear()
    with torch.no_grad():
        model.w.fill_(0.5)
    z = lookahead_affinity(model, [model.w], tiny_losses, BATCH, lr=0.1, weight_decay=1.0)
    # grad_a = 2(0.5-1) = -1 (+ wd*w = 0.5) -> d = -0.5, w' = 0.55
    la0, lb0 = 0.25, 6.25
    la1, lb1 = (0.55 - 1) ** 2, (0.55 - 3) ** 2
    assert z[0, 0].item() == pytest.approx(1 - la1 / la0, abs=1e-12)
    assert z[0, 1].item() == pytest.approx(1 - lb1 / lb0, abs=1e-12)


def test_lookahead_adam_first_step_by_hand():
    model = TinyLinear()
    opt = torch.optim.Adam([model.w], lr=0.1)
    z = lookahead_affinity(model, [model.w], tiny_losses, BATCH, lr=None, mode="adam_aware", optimizer=opt)
    # fresh Adam: the first step is lr * sign(g) -> w = 0.1 for either source
    row = torch.tensor([1 - 0.81, 1 - 8.41 / 9], dtype=torch.float64)
    assert torch.allclose(z, torch.stack([row, row]), atol=1e-6)
    assert len(opt.state) == 0  # optimiser state untouched


def _peer_affinity(model, opt, shared_names, losses_fn, batch):
    """Reference: deep-copy model+optimiser, set .grad to one task's gradient, let torch step."""
    names = list(losses_fn(copy.deepcopy(model), batch))
    base = {t: v.item() for t, v in losses_fn(copy.deepcopy(model), batch).items()}
    out = torch.empty(len(names), len(names), dtype=torch.float64)
    for i, src in enumerate(names):
        m2, o2 = copy.deepcopy((model, opt))
        params = dict(m2.named_parameters())
        o2.zero_grad(set_to_none=True)
        losses_fn(m2, batch)[src].backward()
        for n, p in params.items():
            if n not in shared_names:
                p.grad = None
        o2.step()
        with torch.no_grad():
            after = losses_fn(m2, batch)
        out[i] = torch.tensor([1 - after[t].item() / base[t] for t in names], dtype=torch.float64)
    return out


def _mlp_setup(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    model = nn.ModuleDict({"trunk": trunk, "h1": nn.Linear(8, 1), "h2": nn.Linear(8, 1), "h3": nn.Linear(8, 1)})
    x = torch.randn(16, 4)
    ys = {f"h{i}": torch.randn(16, 1) for i in (1, 2, 3)}

    def losses_fn(m, batch):
        xb, yb = batch
        z = m["trunk"](xb)
        return {t: ((m[t](z) - y) ** 2).mean() for t, y in yb.items()}

    return model, (x, ys), losses_fn


@pytest.mark.parametrize("make_opt, mode", [
    (lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.9)), "adam_aware"),
    (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), "adam_aware"),
    (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05, amsgrad=True), "adam_aware"),
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2), "sgd"),
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True), "sgd"),
])
def test_lookahead_matches_torch_optimizer_step(make_opt, mode):
    model, batch, losses_fn = _mlp_setup()
    opt = make_opt(model.parameters())
    for _ in range(3):  # populate moments / momentum buffers
        opt.zero_grad()
        sum(losses_fn(model, batch).values()).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    shared = [n for n, _ in model.named_parameters() if n.startswith("trunk")]
    ref = _peer_affinity(model, opt, set(shared), losses_fn, batch)
    state_before = copy.deepcopy(opt.state_dict())
    params_before = [p.detach().clone() for p in model.parameters()]
    z = lookahead_affinity(model, [p for n, p in model.named_parameters() if n in shared], losses_fn, batch,
                           lr=None, mode=mode, optimizer=opt)
    assert torch.allclose(z, ref, atol=1e-5, rtol=1e-4)
    for p, q in zip(model.parameters(), params_before):
        assert torch.equal(p, q)
    after = opt.state_dict()["state"]
    for key, st in state_before["state"].items():
        for name, val in st.items():
            assert torch.equal(torch.as_tensor(after[key][name]), torch.as_tensor(val))


def test_lookahead_argument_errors():
    model = TinyLinear()
    with pytest.raises(ValueError, match="Adam"):
        lookahead_affinity(model, [model.w], tiny_losses, BATCH, lr=0.1, mode="adam_aware")
    with pytest.raises(ValueError, match="mode"):
        lookahead_affinity(model, [model.w], tiny_losses, BATCH, lr=0.1, mode="rmsprop")
    with pytest.raises(ValueError, match="lr"):
        lookahead_affinity(model, [model.w], tiny_losses, BATCH, lr=None)
    with pytest.raises(ValueError, match="shared parameter"):
        lookahead_affinity(model, [], tiny_losses, BATCH, lr=0.1)


# ------------------------------------------------------------------ accumulation


def test_accumulator_averages_per_epoch_and_sums_epochs(tmp_path):
    acc = AffinityAccumulator(["a", "b"])
    e1 = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[3.0, 0.0], [1.0, 0.0]])]
    e2 = [torch.tensor([[0.5, -1.0], [0.0, 2.0]])]
    for z in e1:
        acc.update(z)
    mean1 = acc.end_epoch()
    assert torch.allclose(mean1, torch.tensor([[2.0, 1.0], [2.0, 2.0]], dtype=torch.float64))
    for z in e2:
        acc.update(z)
    acc.end_epoch()
    assert acc.end_epoch() is None  # empty epoch adds nothing
    expected = torch.tensor([[2.5, 0.0], [2.0, 4.0]], dtype=torch.float64)
    assert torch.allclose(acc.total, expected)
    assert acc.epochs == 2
    # file form is {recipient: {source: value}}: affinity of a onto b = total[a, b]
    assert acc.to_mapping()["b"]["a"] == 0.0 and acc.to_mapping()["a"]["b"] == 2.0
    path = tmp_path / "aff.json"
    acc.save(path)
    names, mat = load_affinity(path)
    assert names == ["a", "b"] and np.allclose(mat, expected.numpy())
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        acc.update(torch.zeros(3, 3))


def test_lookahead_accumulated_then_selected():
    """End to end on a model whose tasks form two obvious pairs (h1~h2 identical targets, h3~h4 identical)."""
    torch.manual_seed(1)
    trunk = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
    model = nn.ModuleDict({"trunk": trunk, **{f"h{i}": nn.Linear(6, 1) for i in range(1, 5)}})
    with torch.no_grad():  # heads of a pair start identical so their gradients coincide
        model["h2"].load_state_dict(model["h1"].state_dict())
        model["h4"].load_state_dict(model["h3"].state_dict())
    x = torch.randn(32, 3)
    y1, y3 = torch.randn(32, 1), torch.randn(32, 1)
    ys = {"h1": y1, "h2": y1.clone(), "h3": y3, "h4": y3.clone()}

    def losses_fn(m, batch):
        xb, yb = batch
        z = m["trunk"](xb)
        return {t: ((m[t](z) - y) ** 2).mean() for t, y in yb.items()}

    acc = AffinityAccumulator(list(ys))
    shared = list(trunk.parameters())
    for _ in range(2):
        acc.update(lookahead_affinity(model, shared, losses_fn, (x, ys), lr=0.5))
        acc.end_epoch()
    z = acc.total
    assert torch.allclose(z[0, 1], z[0, 0]) and torch.allclose(z[2, 3], z[2, 2])
    g = select_groups(z.numpy(), acc.tasks, 2)
    assert as_sets(g.groups) == {frozenset({"h1", "h2"}), frozenset({"h3", "h4"})} or \
        g.info["score"] >= select_groups(z.numpy(), acc.tasks, 2, method="milp").info["score"] - 1e-12
