"""Data-parallel training under torchrun: two ranks (gloo, CPU) give the numbers one process gives
on the same global batches - every balancer at every level, the issue's digits experiments (naive MTL
and DMTG with PCGrad, UW and feature-level PCGrad; DMTG's attribution pull measured on rows gathered
from both ranks; the other methods that may run distributed, with EW), DMTG's Gumbel draws, resumed trainings - and
rank 0 alone writes. Plus the pieces: the sharded sampler against torch's one-process order, label
counts against the tasks' own losses, merged meters against one pass, the refusals, the GPU-path
options on CPU.

The two ranks are two processes started here with torchrun's variables (``distributed_worker.py``),
running while this process computes the same scenarios alone.
"""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler
from typer.testing import CliRunner

import distributed_worker as worker
from taskgrouping.cli import app
from taskgrouping.data.base import ShardedBatchSampler, TensorTaskDataset, make_loader
from taskgrouping.engine.distributed import Ranks, _merge_orders, check_batches, check_config
from taskgrouping.tasks import valid_counts
from taskgrouping.engine.evaluation import merge_meters
from taskgrouping.tasks import Task

HERE = Path(__file__).resolve().parent
#: results.json numbers: one process vs two ranks (the issue's bound)
EXPERIMENT_RTOL = 1e-4


# -- the two-rank run ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """(rank 0's report, rank 1's report, one process's report, their folders, rank 1's temp folder)."""
    out = tmp_path_factory.mktemp("ranks")
    scratch = tmp_path_factory.mktemp("rank_tmp")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1", TMPDIR=str(scratch), PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get(
                   "PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), str(out)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    alone = tmp_path_factory.mktemp("alone")
    try:
        ref = {"balancers": worker.run_balancers(None), "resume": worker.run_resume(None, alone / "ckpt")}
        draws = {}
        for name, overrides in worker.EXPERIMENTS.items():
            recorded, restore = worker.record_draws()
            try:
                from taskgrouping.experiment import run_experiment

                run_experiment(worker.experiment_config(overrides), alone / name, echo=lambda s: None)
            finally:
                restore()
            draws[name] = recorded
        ref["draws"] = draws
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return reports[0], reports[1], ref, out, alone, scratch


def _max_rel(a, b):
    """Largest |a - b| relative to the largest |a| (weights near zero do not inflate it)."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def _numbers(record, path=()):
    """(path, value) of every number in a results record; left out: timings, and InterroGate's check that
    its compiled network reproduces the gated one (a float round-off, ~1e-7, compared with 0)."""
    if isinstance(record, dict):
        for k, v in record.items():
            if not k.endswith("_seconds") and k != "compile_max_abs_diff":
                yield from _numbers(v, path + (k,))
    elif isinstance(record, list):
        for i, v in enumerate(record):
            yield from _numbers(v, path + (i,))
    elif isinstance(record, (int, float)) and not isinstance(record, bool):
        yield path, float(record)


@pytest.mark.parametrize("tag", [t for t, _, _ in worker.balancer_variants()])
def test_every_balancer_takes_one_process_step_on_two_ranks(two_ranks, tag):
    r0, r1, ref, *_ = two_ranks
    alone, a, b = ref["balancers"][tag], r0["balancers"][tag], r1["balancers"][tag]
    assert "error" not in alone and "error" not in a, (alone.get("error"), a.get("error"))
    assert a["weights"] == b["weights"]  # the ranks agree bit for bit
    # CosReg on batch-summed features differentiates cosines of short sums: the loosest agreement
    assert _max_rel(alone["weights"], a["weights"]) < (1e-4 if tag == "cosreg/batch" else 1e-5)
    for task, loss in alone["train_loss"][0].items():  # global-batch loss means, with missing labels
        assert a["train_loss"][0][task] == pytest.approx(loss, rel=1e-5)
    for task, metrics in alone["val"][0].items():  # validation reduced over the ranks' slices
        assert a["val"][0][task]["loss"] == pytest.approx(metrics["loss"], rel=1e-5)


@pytest.mark.parametrize("name", list(worker.EXPERIMENTS))
def test_digits_experiment_on_two_ranks_matches_one_process(two_ranks, name):
    *_, out, alone, _ = two_ranks
    one = json.loads((alone / name / "results.json").read_text())["methods"]
    two = json.loads((out / name / "results.json").read_text())["methods"]
    assert set(one) == set(two) and len(one) >= 2
    for method in one:
        pairs = dict(_numbers(two[method]))
        worst = max(abs(v - pairs[p]) / max(abs(v), 1e-12) for p, v in _numbers(one[method]))
        assert worst <= EXPERIMENT_RTOL, (method, worst)
    # rank 0 alone wrote: the same files as one process, nothing left of rank 1's own folder
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(out / name) == files(alone / name)


def test_dmtg_draws_are_the_same_on_every_rank(two_ranks):
    r0, r1, ref, *_, scratch = two_ranks
    for name, draws in ref["draws"].items():
        if name == "other_methods":
            continue
        assert len(draws) > 0 and len(r0["draws"][name]) == len(draws)
        assert r0["draws"][name] == r1["draws"][name]  # same S, same Gumbel noise, bit for bit
        for one, two in zip(draws, r0["draws"][name]):
            assert _max_rel(one["z"], two["z"]) < 1e-4 and _max_rel(one["logits"], two["logits"]) < 1e-3
    assert not list(scratch.glob("taskgrouping-rank*"))  # rank 1's temporary run folders are gone


def test_resume_on_two_ranks_continues_to_the_same_numbers(two_ranks):
    r0, r1, ref, out, *_ = two_ranks
    assert r0["resume"]["resumed"]["weights"] == r0["resume"]["straight"]["weights"]
    assert r1["resume"]["resumed"]["weights"] == r0["resume"]["resumed"]["weights"]
    assert _max_rel(ref["resume"]["straight"]["weights"], r0["resume"]["straight"]["weights"]) < 1e-5
    assert not (out / "ckpt1").exists()  # rank 1 wrote no checkpoint: it got rank 0's
    # the run resumed after losing DMTG's record: naive MTL taken from partial/ on both ranks, the same table
    first = json.loads((out / "pcgrad" / "results.json").read_text())["methods"]
    again = json.loads((out / "pcgrad_resumed" / "results.json").read_text())["methods"]
    assert dict(_numbers(first)) == pytest.approx(dict(_numbers(again)), rel=1e-12)


# -- the pieces ------------------------------------------------------------------------------------------

def test_sharded_sampler_gives_one_process_batches_split_over_the_ranks():
    n, bs = 23, 8
    torch.manual_seed(4)
    alone = [list(b) for b in BatchSampler(RandomSampler(range(n)), bs, drop_last=False)]
    torch.manual_seed(4)
    assert list(ShardedBatchSampler(n, bs, shuffle=True)) == alone  # world 1: torch's own order
    ranks = []
    for r in range(3):
        torch.manual_seed(4)
        ranks.append(list(ShardedBatchSampler(n, bs, shuffle=True, rank=r, world=3)))
    for k, batch in enumerate(alone):
        parts = [ranks[r][k] for r in range(3)]
        assert sum(parts, []) == batch  # contiguous slices, in rank order, nothing repeated
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert list(ShardedBatchSampler(7, 4, shuffle=False, rank=1, world=2)) == [[2, 3], [6]]


def test_sharded_loader_serves_a_slice_of_every_batch():
    data = TensorTaskDataset(torch.arange(10.0).unsqueeze(1), {"t": torch.arange(10)})
    loader = make_loader(data, 4, shuffle=False, shard=(1, 2))
    assert [y["t"].tolist() for _, y in loader] == [[2, 3], [6, 7], [9]]


@pytest.mark.parametrize("task", [
    Task("b", "binary"), Task("m", "multiclass", num_classes=3), Task("r", "regression", out_channels=2),
    Task("s", "segmentation", num_classes=3), Task("d", "dense_regression"),
    Task("n", "normal", out_channels=3, loss_type="cosine"), Task("l", "normal", out_channels=3)])
def test_valid_counts_are_those_of_the_task_loss(task):
    torch.manual_seed(0)
    shapes = {"binary": ((6, 2), (6,)), "multiclass": ((6, 3), (6,)), "regression": ((6, 2), (6, 2)),
              "segmentation": ((2, 3, 4, 4), (2, 4, 4)), "dense_regression": ((2, 1, 4, 4), (2, 1, 4, 4)),
              "normal": ((2, 3, 4, 4), (2, 3, 4, 4))}
    pred_shape, target_shape = shapes[task.kind]
    if task.is_classification:
        target = torch.randint(0, task.num_classes, target_shape)
        target[torch.rand(target_shape) < 0.3] = -1
    else:
        target = torch.randn(target_shape)
        target[torch.rand(target_shape) < 0.3] = float("nan")
    expected = int(task.loss_sum_count(torch.randn(pred_shape), target)[1])
    assert valid_counts([task], {task.name: target}).tolist() == [expected]


def test_task_orders_merge_keeping_each_rank_order():
    assert _merge_orders([[0, 2, 3], [1, 2], [0, 3]]) == [0, 1, 2, 3]
    assert _merge_orders([[3, 1], [3, 0]]) == [3, 0, 1]


class _TwoRanks(Ranks):
    """Two ranks simulated in one process: the other rank's meters are given."""

    def __init__(self, other):
        super().__init__(2, 0)
        self.other = other

    def all_objects(self, obj):
        return [obj, {n: {k: v for k, v in vars(m).items() if k != "task"} for n, m in self.other.items()}]


def test_merged_meters_equal_one_pass_over_the_split():
    tasks = [Task("b", "binary"), Task("m", "multiclass", num_classes=3), Task("r", "regression")]
    torch.manual_seed(1)
    preds = {"b": torch.randn(20, 2), "m": torch.randn(20, 3), "r": torch.randn(20, 1)}
    targets = {"b": torch.randint(0, 2, (20,)), "m": torch.randint(0, 3, (20,)), "r": torch.randn(20)}
    targets["r"][3] = float("nan")
    whole, first, second = ({t.name: t.meter() for t in tasks} for _ in range(3))
    for t in tasks:
        whole[t.name].update(preds[t.name], targets[t.name])
        first[t.name].update(preds[t.name][:7], targets[t.name][:7])
        second[t.name].update(preds[t.name][7:], targets[t.name][7:])
    merge_meters(first, _TwoRanks(second))
    for t in tasks:
        assert first[t.name].compute() == pytest.approx(whole[t.name].compute(), rel=1e-6)  # float32 batch sums


def test_last_batch_smaller_than_the_ranks_is_refused():
    from taskgrouping.data.builtin import planted

    data = planted(n_tasks=2, group_sizes=[2], n_train=33, n_val=32, n_test=32)
    with pytest.raises(ValueError, match=r"train split's 33 samples leave a last batch of 1 for 2 ranks"):
        check_batches(data, 32, 2)
    with pytest.raises(ValueError, match=r"train.batch_size=1 is the global batch, split over 2 ranks"):
        check_batches(data, 1, 2)
    check_batches(data, 32, 1)


@pytest.mark.parametrize("config, needle", [
    ({"methods": ["naive_mtl", "hoa"]}, "method 'hoa' cannot run distributed (it fans its candidate networks"),
    ({"methods": ["tag"]}, "method 'tag' cannot run distributed (its lookahead affinity"),
    ({"methods": ["dmtg"], "dmtg": {"mates_weight": 1.0}}, "dmtg.mates_weight=1.0 measures task gradients"),
    ({"methods": ["naive_mtl"], "diagnostics": {"every": 5}}, "diagnostics.every=5 measures gradient similarities"),
])
def test_what_cannot_run_distributed_is_refused_by_name(monkeypatch, config, needle):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as error:
        check_config(config)
    assert str(error.value).startswith("torchrun with 2 processes: " + needle)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_config(config)  # one process: nothing to refuse


def test_cli_refuses_a_method_under_torchrun_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, ["run", "--preset", "digits", "--set", "methods=[naive_mtl,esa]",
                                      "--out", str(tmp_path / "run")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: torchrun with 2 processes: method 'esa' cannot run distributed")
    assert not (tmp_path / "run").exists()


def test_cli_names_the_ray_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # not installed
    result = CliRunner().invoke(app, ["run", "--preset", "digits", "--set", "methods=[hoa]", "--set",
                                      "hoa.backend=ray", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "pip install 'taskgrouping[ray]'" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- the GPU path's options, on CPU ----------------------------------------------------------------------

def _tiny_cnn_run(**train_options):
    from taskgrouping.engine.trainer import TrainConfig, train
    from taskgrouping.models.branched import build_branched_model

    torch.manual_seed(0)
    x = torch.randn(48, 1, 12, 12)
    tasks = [Task("a", "binary"), Task("b", "regression")]
    data = TensorTaskDataset(x, {"a": (x.mean(dim=(1, 2, 3)) > 0).long(), "b": x[:, 0, :4, :4].mean(dim=(1, 2))})
    model = build_branched_model(tasks, [["a", "b"]], (1, 12, 12), backbone="small_cnn",
                                 backbone_options={"channels": [4, 8], "feature_dim": 8})
    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, select="last", **train_options)
    workers = cfg.loader_workers
    result = train(model, make_loader(data, 16, True, num_workers=workers), make_loader(data, 16, False), tasks, cfg,
                   seed=2)
    return result, torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])


def test_channels_last_and_loader_workers_train_the_same_network():
    _, plain = _tiny_cnn_run()
    result, last = _tiny_cnn_run(channels_last=True)
    conv = next(p for p in result.model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain, last, rtol=1e-4, atol=1e-6)  # another memory layout, the same network
    _, workers = _tiny_cnn_run(loader_workers=1)
    assert torch.equal(plain, workers)  # batches from a worker process, in the main process's order


def test_compile_option_trains_compiled_trunks(monkeypatch):
    """``train.compile`` compiles the trunk in place (state-dict keys unchanged). Dynamo's ``eager``
    backend stands in for inductor, whose C++ build takes minutes on CPU: what is pinned here is the
    wiring, not inductor's kernels."""
    real_compile = torch.nn.Module.compile
    compiled = []

    def eager_compile(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return real_compile(self, backend="eager")
    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    _, plain = _tiny_cnn_run()
    result, out = _tiny_cnn_run(compile=True)
    assert compiled  # the stem and the branch
    assert all(not k.startswith("_orig_mod") for k in result.model.state_dict())
    assert torch.allclose(plain, out, rtol=1e-4, atol=1e-6)


def test_compile_option_compiles_a_model_with_its_own_compile_method(monkeypatch):
    """InterroGate's gated network has a ``compile`` of its own (the pruned network); ``train.compile``
    must still compile it in place with torch (it once called the pruning and trained uncompiled)."""
    from taskgrouping.engine.trainer import compile_trunks
    from taskgrouping.methods.interrogate import build_gated_network

    real_compile = torch.nn.Module.compile
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **kw: compiled.append(type(self).__name__) or real_compile(self, backend="eager"))
    shared = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    net = build_gated_network(shared, {"a": copy.deepcopy(shared)}, {"a": torch.nn.Linear(3, 1)})
    compile_trunks(net)
    assert compiled == ["GatedNetwork"] and net._compiled_call_impl is not None


@pytest.mark.parametrize("command", ["balance-bench", "interrogate-sweep"])
def test_the_one_process_studies_refuse_torchrun(command, monkeypatch, tmp_path):
    """balance-bench and interrogate-sweep assume one process: under torchrun (WORLD_SIZE > 1) they
    refuse with one line before anything is written."""
    from taskgrouping.balancing.study import run_benchmark
    from taskgrouping.methods.interrogate.sweep import interrogate_sweep

    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"^{command} runs in one process; run it without torchrun$"):
        if command == "balance-bench":
            run_benchmark({"data": {"name": "digits"}}, ["ew"], out_dir=out)
        else:
            interrogate_sweep({"data": {"name": "digits"}}, [1.0], out_dir=out)
    assert not out.exists()
