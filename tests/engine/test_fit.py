"""The one fit path: every network of every method trains through ``engine.fit.fit``, so run-wide
settings (here Mao et al.'s diagnostics) reach in-process networks and fanned-out candidates alike."""

import json

import pytest

from taskgrouping.config import build_config
from taskgrouping.data.builtin import planted
from taskgrouping.engine.fit import RunContext, build_model, fit
from taskgrouping.engine.jobs import TrainingJob, train_job
from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.experiment import run_experiment
from taskgrouping.grouping.grouping import Grouping


@pytest.fixture(scope="module")
def run() -> RunContext:
    data = planted(n_tasks=4, group_sizes=[2, 2], n_train=96, n_val=64, n_test=64, input_dim=8, feature_dim=2, seed=1)
    return RunContext(data, seed=2, train=TrainConfig(epochs=2, batch_size=32, progress=False),
                      model={"backbone": "mlp", "options": {"widths": [8]}}, diagnostics={"every": 1})


def test_fit_logs_diagnostics_and_scores_the_selected_epoch(run):
    records = []
    model = build_model(run, Grouping.partition([run.data.task_names]))
    fitted = fit(run, model, tag="net", log=records.append)
    assert [r["network"] for r in records] == ["net", "net"]
    assert all(r["diagnostics"]["n_measured"] == 3 for r in records)  # 96 / 32 steps, every step
    assert fitted.val == records[fitted.result.best_epoch]["val"]
    assert set(fitted.test) == set(run.data.task_names)


def test_a_job_equals_the_same_network_fitted_in_process(run):
    grouping = Grouping.partition([run.data.task_names[:2]])
    job = train_job(run, TrainingJob("sub", grouping))
    fitted = fit(run, build_model(run, grouping), tag="sub", tasks=[run.data.task(t) for t in grouping.tasks])
    assert job.val == fitted.val and job.test == fitted.test
    assert all("diagnostics" in h for h in job.history)


def test_hoa_candidates_log_diagnostics(tmp_path):
    config = build_config(None, "digits", ["methods=[hoa]", "diagnostics.every=10", "train.epochs=1"])
    run_experiment(config, tmp_path / "run", echo=lambda s: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    pairs = {r["network"] for r in records if "diagnostics" in r}
    singles = {r["network"] for r in records if "diagnostics" not in r}
    assert pairs and singles  # HOA trains pair and single-task candidates; one task has no diagnostics
    assert all(r["diagnostics"]["n_measured"] >= 1 for r in records if "diagnostics" in r)
