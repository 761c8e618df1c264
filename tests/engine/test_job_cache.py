"""The job cache: a finished job is stored whole and reused instead of trained again; what the key
covers changes it; a cached result equals the trained one."""

import pytest

from taskgrouping.data.builtin import planted
from taskgrouping.engine.fit import RunContext
from taskgrouping.engine.job_cache import JobCache, job_key
from taskgrouping.engine.jobs import TrainingJob, run_jobs
from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.grouping.grouping import Grouping


@pytest.fixture(scope="module")
def run() -> RunContext:
    data = planted(n_tasks=4, group_sizes=[2, 2], n_train=64, n_val=32, n_test=32, input_dim=8, feature_dim=2, seed=1)
    return RunContext(data, seed=2, train=TrainConfig(epochs=2, batch_size=32, progress=False),
                      model={"backbone": "mlp", "options": {"widths": [8]}}, data_key="planted-test")


def _jobs(run):
    names = run.data.task_names
    return [TrainingJob(f"net_{i}", Grouping.partition([[t]])) for i, t in enumerate(names[:2])] + [
        TrainingJob("pair", Grouping.partition([names[:2]]))]


def test_finished_jobs_are_reused_not_retrained(run, tmp_path, monkeypatch):
    cache = JobCache(tmp_path / "jobs")
    seen = []
    first = run_jobs(run, _jobs(run), cache=cache, on_result=lambda r, cached: seen.append((r.tag, cached)))
    assert seen == [("net_0", False), ("net_1", False), ("pair", False)]
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == sorted(job_key(run, j) for j in _jobs(run))

    import taskgrouping.engine.jobs as jobs_module

    def no_training(*a, **k):
        raise AssertionError("a cached job was trained again")

    monkeypatch.setattr(jobs_module, "train_job", no_training)
    seen.clear()
    again = run_jobs(run, _jobs(run), cache=cache, on_result=lambda r, cached: seen.append((r.tag, cached)))
    assert seen == [("net_0", True), ("net_1", True), ("pair", True)]
    for a, b in zip(first, again):
        assert (a.tag, a.val, a.test, a.best_epoch, a.weights) == (b.tag, b.val, b.test, b.best_epoch, b.weights)


def test_a_larger_run_trains_only_the_new_jobs(run, tmp_path):
    cache = JobCache(tmp_path / "jobs")
    run_jobs(run, _jobs(run)[:2], cache=cache)
    seen = []
    run_jobs(run, _jobs(run), cache=cache, on_result=lambda r, cached: seen.append((r.tag, cached)))
    assert seen == [("net_0", True), ("net_1", True), ("pair", False)]


def test_the_key_covers_what_changes_the_outcome(run):
    from dataclasses import replace

    job = _jobs(run)[2]
    base = job_key(run, job)
    assert job_key(run, replace(job, tag="other", checkpoint_dir="/x")) == base
    changed = [replace(run, seed=3), replace(run, data_key="other"), replace(run, train=replace(run.train, lr=0.01)),
               replace(run, model={"backbone": "mlp", "options": {"widths": [9]}})]
    assert len({job_key(r, job) for r in changed} | {base}) == 5
    assert job_key(run, replace(job, epochs=5)) != base
    assert job_key(run, replace(job, model_options={"widths": [4]})) != base
    # a progress bar, TensorBoard or loader workers change nothing a job computes
    quiet = replace(run.train, progress=not run.train.progress, tensorboard=True, loader_workers=2)
    assert job_key(replace(run, train=quiet), job) == base


def test_no_data_key_means_no_caching(run, tmp_path):
    from dataclasses import replace

    run_jobs(replace(run, data_key=""), _jobs(run)[:1], cache=JobCache(tmp_path / "jobs"))
    assert not (tmp_path / "jobs").exists()


def test_an_unfinished_entry_is_ignored_and_a_broken_one_named(run, tmp_path):
    cache = JobCache(tmp_path / "jobs")
    job = _jobs(run)[0]
    key = job_key(run, job)
    (tmp_path / "jobs" / f".{key}.123.tmp").mkdir(parents=True)  # a killed writer's leftovers
    assert cache.get(key, job.tag) is None
    (tmp_path / "jobs" / key).mkdir()
    with pytest.raises(ValueError, match=key):
        cache.get(key, job.tag)


def test_a_second_run_sharing_the_cache_trains_no_candidate_again(tmp_path):
    import json

    from taskgrouping.config import build_config
    from taskgrouping.experiment import run_experiment

    config = build_config(None, "digits", ["methods=[hoa]", "train.epochs=1", "train.progress=false",
                                           f"jobs_dir={tmp_path / 'jobs'}"])
    first = run_experiment(config, tmp_path / "a", echo=lambda s: None)
    second = run_experiment(config, tmp_path / "b", echo=lambda s: None)
    assert first["methods"]["hoa"]["per_task"] == second["methods"]["hoa"]["per_task"]
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r.get("cached") for r in records)  # every candidate came from the cache
    assert len(list((tmp_path / "jobs").iterdir())) == len(records)
