"""Copies of a backbone run as one vmapped call give the loop's outputs, gradients and batch-norm
statistics, on every registered backbone, inside the branched model, DMTG and InterroGate, and in a
whole run with ``train.branches`` on and off.

The backbone and InterroGate-stream tests run on the CPU; on a GPU machine
``TASKGROUPING_TEST_DEVICE=cuda pytest tests/models/test_stacked.py`` runs them on CUDA (TF32 off)."""

import copy
import json
import os

import pytest
import torch

from taskgrouping.config import build_config
from taskgrouping.engine.trainer import TrainConfig, set_branch_mode
from taskgrouping.experiment import run_experiment
from taskgrouping.methods.dmtg import DMTGModel
from taskgrouping.methods.interrogate import build_gated_network
from taskgrouping.models.backbones import BACKBONES, _load_builtin_backbones, build_backbone, output_shape
from taskgrouping.models.branched import build_branched_model
from taskgrouping.models.heads import make_head
from taskgrouping.models.stacked import resolve_branch_mode, run_branches, run_stacked, same_architecture
from taskgrouping.tasks import Task

_load_builtin_backbones()
SHAPES = {"mlp": (12,), "small_cnn": (1, 28, 28)}
IMAGE = (3, 32, 32)
# backbones whose fp32 loop is within 1e-6 of fp64 at these sizes, so a fixed 1e-6 bound between the two fp32
# forms means something; elsewhere the loop itself is further from fp64 (gradients: resnet18 6-8e-6 and xception
# 3e-6 to 4e-4 depending on the CPU, batch norm over 1x1 / 2x2 maps; vit 1.2e-5, attention) and the bound is
# "as accurate as the loop, or as the problem's sensitivity to rounding allows"
WELL_CONDITIONED = ("mlp", "small_cnn", "resnet20", "tag_resnet")
DEVICE = torch.device(os.environ.get("TASKGROUPING_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """Float32 on CUDA means float32: TF32 convolutions and matrix products round to ~1e-3."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _nets(name: str, k: int = 3, dtype=torch.float32):
    torch.manual_seed(0)
    nets = [build_backbone(name, SHAPES.get(name, IMAGE)).to(DEVICE, dtype) for _ in range(k)]
    return nets, torch.randn(8, *SHAPES.get(name, IMAGE), dtype=dtype).to(DEVICE)


def _grads(nets) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double().cpu()
                      for n in nets for p in n.parameters()])


def _state(nets) -> torch.Tensor:
    return torch.cat([b.flatten().double().cpu() for n in nets for b in n.buffers()] + [torch.zeros(0)])


def _run(nets, x, stacked: bool):
    out = run_stacked(nets, x) if stacked else [n(x) for n in nets]
    sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum()
        for o in out).backward()
    return torch.cat([o.flatten().double().cpu() for o in out]), _grads(nets), _state(nets)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


# eval mode differs from training mode only where a backbone has batch norm (running statistics)
MODES = [(name, True) for name in sorted(BACKBONES)] + [(name, False) for name in ("resnet20", "xception")]


@pytest.mark.parametrize("name,training", MODES)
def test_stacked_equals_the_loop_in_float64_on_every_backbone(name, training):
    nets, x = _nets(name, k=2, dtype=torch.float64)
    twins = copy.deepcopy(nets)
    for n in nets + twins:
        n.train(training)
    assert same_architecture(nets)
    ref, stacked = _run(nets, x, False), _run(twins, x, True)
    for a, b in zip(stacked, ref):
        assert _rel(a, b) <= 1e-12 or (a.numel() == 0 and b.numel() == 0)
    if training and any(True for _ in nets[0].buffers()):  # running statistics moved, the same way
        assert not torch.equal(_state(nets), _state([build_backbone(name, IMAGE) for _ in nets]))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_stacked_float32_is_as_accurate_as_the_loop(name):
    """Against float64: the stacked form's error is at most 3 x the larger of the loop's error and the
    problem's own sensitivity (how far float64 moves when the input moves by float32 rounding): where
    batch norm over 1x1 maps amplifies rounding ~1e4-fold (xception's gradients), which of two fp32
    summation orders lands nearer float64 is luck of the CPU's kernels, and neither can be closer than that."""
    nets, x = _nets(name)
    twins, exact, exact_too = (copy.deepcopy(nets), [copy.deepcopy(n).double() for n in nets],
                               [copy.deepcopy(n).double() for n in nets])
    loop, stacked, ref = _run(nets, x, False), _run(twins, x, True), _run(exact, x.double(), False)
    noise = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    moved = _run(exact_too, x.double() * (1 + torch.finfo(torch.float32).eps * noise), False)
    for what in (0, 1):  # outputs, gradients
        if name in WELL_CONDITIONED and DEVICE.type == "cpu":  # on an H200, cuDNN's kernels put resnet20's and
            # tag_resnet's stacked outputs 1.4e-6 / 1.7e-6 from the loop: there the bound below is the check
            assert _rel(stacked[what], loop[what]) <= 1e-6
        floor = max(_rel(loop[what], ref[what]), _rel(moved[what], ref[what]))
        assert _rel(stacked[what], ref[what]) <= 3 * floor + 1e-7


def test_one_input_per_module_and_a_custom_call():
    nets, x = _nets("mlp")
    xs = [x, 2 * x, -x]
    fn = lambda m, pair: m(pair[0]) - m(pair[1])  # noqa: E731
    loop = run_branches(nets, list(zip(xs, xs[::-1])), "loop", fn)
    stacked = run_branches(nets, list(zip(xs, xs[::-1])), "stacked", fn)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(loop, stacked))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(run_stacked(nets, xs), [n(v) for n, v in
                                                                                             zip(nets, xs)]))


def test_branch_mode_resolution_and_config_errors():
    assert resolve_branch_mode("auto", torch.device("cpu")) == "loop"
    assert resolve_branch_mode("auto", torch.device("cuda")) == "stacked"
    assert resolve_branch_mode("stacked", torch.device("cpu")) == "stacked"
    with pytest.raises(ValueError, match=r"train\.branches must be one of"):
        TrainConfig(branches="grouped")
    with pytest.raises(ValueError, match="cannot be combined with train.compile"):
        TrainConfig(branches="stacked", compile=True)


TASKS = [Task("a", "binary"), Task("b", "regression"), Task("c", "multiclass", num_classes=3)]


def test_branched_model_switch_keeps_weights_and_outputs():
    torch.manual_seed(0)
    model = build_branched_model(TASKS, [["a"], ["b"], ["c"]], (1, 28, 28), backbone="small_cnn")
    twin = copy.deepcopy(model)
    set_branch_mode(twin, "stacked")
    assert twin.branch_mode == "stacked" and model.branch_mode == "loop"
    x = torch.randn(5, 1, 28, 28)
    ref, out = model(x), twin(x)
    assert all(_rel(out[t], ref[t]) <= 1e-6 for t in ref)
    # one state dict for both modes: a checkpoint written in one loads in the other
    assert list(twin.state_dict()) == list(model.state_dict())
    model.load_state_dict(twin.state_dict())


def test_batch_norm_under_cuda_autocast_runs_as_the_loop(monkeypatch):
    """vmap's batch-norm rule rejects a bfloat16 input beside float32 running statistics on CUDA (seen on an
    H200, torch 2.11): under CUDA autocast, modules with batch norm run as the loop; others still stack."""
    import taskgrouping.models.stacked as stacked

    calls = []
    monkeypatch.setattr(stacked, "run_stacked", lambda modules, x, fn=None: calls.append(len(modules)) or [])
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    with_bn, x = _nets("resnet20", k=2)
    assert len(run_branches(with_bn, x, "stacked")) == 2 and calls == []
    without_bn, x = _nets("mlp", k=2)
    run_branches(without_bn, x, "stacked")
    assert calls == [2]


def test_branches_of_different_shapes_fall_back_to_the_loop():
    widths = iter([(8, 4), (8, 4), (16, 4)])  # the stem (empty here), then one backbone per branch
    model = build_branched_model(TASKS[:2], [["a"], ["b"]], (6,),
                                 backbone=lambda: build_backbone("mlp", (6,), widths=next(widths)))
    set_branch_mode(model, "stacked")
    out = model(torch.randn(4, 6))
    assert set(out) == {"a", "b"} and model._uniform is False


def test_dmtg_head_losses_are_the_same_stacked():
    torch.manual_seed(0)
    net = build_branched_model(TASKS, [["a", "b", "c"]] * 3, (1, 28, 28), backbone="small_cnn")
    model = DMTGModel(net, ["a", "b", "c"], torch.randn(3, 3))
    twin = copy.deepcopy(model)
    set_branch_mode(twin, "stacked")
    x = torch.randn(6, 1, 28, 28)
    y = {"a": torch.randint(0, 2, (6,)).float(), "b": torch.randn(6), "c": torch.randint(0, 3, (6,))}
    ref, _ = model.head_losses(x, y, TASKS)
    out, _ = twin.head_losses(x, y, TASKS)
    ref.sum().backward()
    out.sum().backward()
    assert _rel(out, ref) <= 1e-6
    assert _rel(_grads([twin.net.branches]), _grads([model.net.branches])) <= 1e-6


@pytest.mark.parametrize("pruned", [False, True])
def test_dmtg_heads_of_stacked_branches_run_batched_with_the_loops_losses(pruned, monkeypatch):
    """Scalar tasks on stacked branches: every branch's bank as one batched product and one loss call per
    kind (DMTGModel._batched_losses), equal to the loop's per-branch losses and gradients; with a head of
    one branch pruned the branches run different heads and the per-branch path is taken."""
    tasks = [Task("a", "binary"), Task("b", "regression"), Task("c", "binary"), Task("d", "regression")]
    names = [t.name for t in tasks]
    torch.manual_seed(0)
    net = build_branched_model(tasks, [names] * 3, (1, 28, 28), backbone="small_cnn")
    model = DMTGModel(net, names, torch.randn(4, 3))
    if pruned:
        model.live[1, 2] = False
    twin = copy.deepcopy(model)
    set_branch_mode(twin, "stacked")
    batched = []
    original = DMTGModel._batched_losses
    monkeypatch.setattr(DMTGModel, "_batched_losses", lambda self, *a: batched.append(1) or original(self, *a))
    x = torch.randn(6, 1, 28, 28)
    y = {"a": torch.tensor([0, 1, -1, 1, 0, 0]), "b": torch.randn(6), "c": torch.randint(0, 2, (6,)),
         "d": torch.tensor([0.5, float("nan"), 1.0, -2.0, 0.0, 3.0])}
    ref, ref_feats = model.head_losses(x, y, tasks)
    out, out_feats = twin.head_losses(x, y, tasks)
    assert batched == ([] if pruned else [1])
    assert sorted(out_feats) == sorted(ref_feats) == [0, 1, 2]
    ref.sum().backward()
    out.sum().backward()
    assert _rel(out, ref) <= 1e-6 and (out[2, 1] == 0) == pruned
    assert _rel(_grads([twin]), _grads([model])) <= 1e-6


@pytest.mark.parametrize("backbone,shape", [("small_cnn", (1, 16, 16)), ("resnet20", (3, 16, 16)),
                                            ("vit", (3, 16, 16))])
def test_interrogate_streams_stacked_equal_the_loop(backbone, shape):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        tasks = TASKS
        shared = build_backbone(backbone, shape)
        heads = {t.name: make_head(t, output_shape(shared, shape), shape) for t in tasks}
        gated = build_gated_network(shared, {t.name: build_backbone(backbone, shape) for t in tasks}, heads).to(DEVICE)
        with torch.no_grad():  # a mixed gate pattern and uneven mixtures
            for g in gated.gate_points().values():
                g.alpha.copy_(torch.randn_like(g.alpha))
                g.beta.copy_(torch.randn_like(g.beta))
        twin = copy.deepcopy(gated)
        set_branch_mode(twin, "stacked")
        x = torch.randn(6, *shape).to(DEVICE)
        ref, out = gated(x), twin(x)
        sum(v.square().sum() for v in ref.values()).backward()
        sum(v.square().sum() for v in out.values()).backward()
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(_rel(out[t].cpu(), ref[t].cpu()) <= 1e-12 for t in ref)
    assert _rel(_grads([twin]), _grads([gated])) <= 1e-12
    assert _rel(_state([twin]), _state([gated])) <= 1e-12 or not list(gated.buffers())


def _metrics(summary: dict) -> dict[str, float]:
    return {f"{m}/{split}/{t}/{k}": v for m, rec in summary["methods"].items()
            for split in ("per_task", "val_per_task") for t, d in rec[split].items() for k, v in d.items()
            if isinstance(v, float)}


def test_a_run_gives_the_same_metrics_with_branches_stacked(tmp_path):
    results = {}
    for mode in ("loop", "stacked"):
        cfg = build_config(preset="multimnist", overrides=[
            "methods=[single_task,dmtg,interrogate]", "data.n_train=256", "data.n_val=128", "data.n_test=128",
            "train.epochs=2", "train.progress=false", f"train.branches={mode}"])
        run_experiment(cfg, tmp_path / mode, echo=lambda _: None)
        results[mode] = json.loads((tmp_path / mode / "results.json").read_text())
    loop, stacked = _metrics(results["loop"]), _metrics(results["stacked"])
    assert loop.keys() == stacked.keys() and len(loop) > 20
    for key, value in loop.items():
        assert stacked[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert {m: r["grouping"] for m, r in results["loop"]["methods"].items()} == \
        {m: r["grouping"] for m, r in results["stacked"]["methods"].items()}
