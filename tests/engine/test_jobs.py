"""Fan-out of independent trainings: backends agree bit for bit, continuation equals one long run,
and bad input fails clearly."""

import sys

import pytest
import torch
from safetensors.torch import load as load_tensors

from taskgrouping.data.registry import load_dataset
from taskgrouping.engine.fit import RunContext
from taskgrouping.engine.jobs import (TrainingJob, assemble_networks, run_jobs, train_job,
                                      trained_model)
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.engine.evaluation import evaluate
from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.data.base import make_loader


@pytest.fixture(scope="module")
def ctx() -> RunContext:
    data = load_dataset("digits", seed=0)
    return RunContext(data, seed=3, train=TrainConfig(epochs=2, batch_size=128, lr=3e-3, progress=False),
                      model={"backbone": "mlp", "options": {"widths": [16, 8]}, "shared_blocks": 0},
                      balancer={"name": "ew", "options": {}})


def _jobs() -> list[TrainingJob]:
    return [TrainingJob("a", Grouping.partition([["even"]])),
            TrainingJob("b", Grouping.partition([["gt4", "loop"]])),
            TrainingJob("c", Grouping.partition([["prime"]]), model_options={"widths": [8, 4]})]


def test_processes_equal_sequential_bit_for_bit(ctx):
    seq = run_jobs(ctx, _jobs(), backend="sequential")
    par = run_jobs(ctx, _jobs(), backend="processes", workers=2)
    assert [r.tag for r in par] == ["a", "b", "c"]
    for s, p in zip(seq, par):
        assert s.val == p.val and s.test == p.test  # exact float equality
        ws, wp = load_tensors(s.weights), load_tensors(p.weights)
        assert ws.keys() == wp.keys() and all(torch.equal(ws[k], wp[k]) for k in ws)
    # a job's history covers its epochs; a subset network scores only its own tasks
    assert [h["epoch"] for h in seq[1].history] == [0, 1]
    assert set(seq[1].val) == {"gt4", "loop"}


def test_continuation_equals_one_long_run(ctx, tmp_path):
    """ESA's second shot: 1 early epoch, then continued to 3, equals 3 epochs in one go."""
    g = Grouping.partition([["even", "prime"]])
    early = train_job(ctx, TrainingJob("early", g, epochs=1, checkpoint_dir=str(tmp_path / "early")))
    cont = train_job(ctx, TrainingJob("full", g, epochs=3, checkpoint_dir=str(tmp_path / "full"),
                                      init_from=str(tmp_path / "early"), continues_from=1))
    whole = train_job(ctx, TrainingJob("whole", g, epochs=3))
    assert cont.val == whole.val and cont.test == whole.test
    assert [h["epoch"] for h in cont.history] == [1, 2]  # the early epoch is not counted again
    assert early.epochs_run == 1 and cont.epochs_run == 3


def test_assembled_model_answers_like_each_network(ctx):
    jobs = _jobs()
    results = run_jobs(ctx, jobs)
    nets = [trained_model(ctx, j, r) for j, r in zip(jobs, results)]
    model = assemble_networks(nets, {"even": 0, "gt4": 1, "loop": 1, "prime": 2})
    x = ctx.data.test[list(range(64))][0]
    with torch.no_grad():
        out = model(x)
        for k, net in enumerate(nets):
            for t, pred in net(x).items():
                assert torch.equal(out[t], pred)
    metrics = evaluate(model, make_loader(ctx.data.test, ctx.train.batch_size, shuffle=False), ctx.data.tasks)
    for r in results:
        for t, m in r.test.items():
            assert metrics[t]["loss"] == m["loss"]


def test_ray_jobs_without_gpus_on_a_cuda_run_is_an_error(ctx, monkeypatch):
    """Ray gives a task only the GPUs it asks for: with gpus_per_job 0 every job would train on the CPU
    while the run's device is CUDA (here made to resolve so)."""
    import taskgrouping.engine.jobs as jobs

    monkeypatch.setattr(jobs, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(jobs.importlib.util, "find_spec", lambda name: object())  # Ray counts as installed
    monkeypatch.setitem(sys.modules, "ray", None)  # but importing it fails: nothing reaches Ray
    with pytest.raises(ValueError, match=r"gpus_per_job 0 hides the GPU .* set gpus_per_job"):
        run_jobs(ctx, _jobs(), backend="ray")
    with pytest.raises(ValueError, match=r"pip install 'taskgrouping\[ray\]'"):  # with a GPU share: on to Ray
        run_jobs(ctx, _jobs(), backend="ray", gpus_per_job=0.25)


def test_missing_ray_names_the_extra(ctx, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'taskgrouping\[ray\]'"):
        run_jobs(ctx, _jobs(), backend="ray")


@pytest.mark.parametrize("backend, workers, message", [
    ("threads", None, "unknown backend 'threads'"),
    ("processes", 0, "workers must be a positive integer"),
])
def test_bad_backend_or_workers(ctx, backend, workers, message):
    with pytest.raises(ValueError, match=message):
        run_jobs(ctx, _jobs(), backend=backend, workers=workers)


def test_duplicate_tags_and_unknown_tasks(ctx):
    with pytest.raises(ValueError, match="job tag 'a' is used twice"):
        run_jobs(ctx, [_jobs()[0], _jobs()[0]])
    with pytest.raises(ValueError, match="unknown tasks \\['odd'\\]"):
        train_job(ctx, TrainingJob("x", Grouping.partition([["odd"]])))
