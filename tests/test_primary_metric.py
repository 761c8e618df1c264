"""``primary_metric`` (NormGain_M and the mean rank on one metric, signed by its direction) and
``train.select_metric`` (the validation epoch kept): hand-computed examples for both directions, the
default left as it was (each task's own metric, no NormGain_M), the trainer's choice on a crafted
validation history and in a real run, and one-line config errors."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from taskgrouping.cli import app
from taskgrouping.config import ConfigError, build_config
from taskgrouping.data.base import TensorTaskDataset, make_loader
from taskgrouping.engine import trainer as trainer_module
from taskgrouping.engine.driver import prepare_data
from taskgrouping.engine.trainer import TrainConfig, train
from taskgrouping.experiment import run_experiment, summarise
from taskgrouping.metrics import improves, mean_rank, norm_gain, selection_score
from taskgrouping.report import results_table
from taskgrouping.tasks import Task

REF = {"a": {"loss": 0.5, "error": 0.20, "auroc": 0.80, "average_precision": 0.50},
       "b": {"loss": 0.4, "error": 0.10, "auroc": 0.50, "average_precision": 0.40},
       "r": {"loss": 2.0, "mse": 2.0}}
RUN = {"a": {"loss": 0.4, "error": 0.10, "auroc": 0.90, "average_precision": 0.60},
       "b": {"loss": 0.6, "error": 0.15, "auroc": 0.55, "average_precision": 0.30},
       "r": {"loss": 1.0, "mse": 1.0}}


def test_norm_gain_by_hand_in_both_directions():
    # lower is better: (ref - M) / ref
    assert norm_gain(RUN, REF, "error", ["a", "b"]) == pytest.approx(((0.2 - 0.1) / 0.2 + (0.1 - 0.15) / 0.1) / 2)
    assert norm_gain(RUN, REF, "loss") == pytest.approx(((0.5 - 0.4) / 0.5 + (0.4 - 0.6) / 0.4 + (2 - 1) / 2) / 3)
    # higher is better: (M - ref) / ref, over the tasks that report it (not the regression task)
    assert norm_gain(RUN, REF, "auroc") == pytest.approx(((0.9 - 0.8) / 0.8 + (0.55 - 0.5) / 0.5) / 2)
    assert norm_gain(RUN, REF, "average_precision") == pytest.approx(((0.6 - 0.5) / 0.5 + (0.3 - 0.4) / 0.4) / 2)
    # better is positive in both directions; undefined values (None as results.json writes NaN) are left out
    assert norm_gain({"a": {"auroc": 0.9}}, {"a": {"auroc": 0.8}}, "auroc") > 0
    assert norm_gain({"a": {"error": 0.1}}, {"a": {"error": 0.2}}, "error") > 0
    assert norm_gain({"a": {"auroc": 0.9}, "b": {"auroc": None}}, {"a": {"auroc": 0.8}, "b": {"auroc": 0.5}},
                     "auroc") == pytest.approx(0.125)
    assert norm_gain(REF, REF, "auroc") == 0.0


def test_mean_rank_follows_the_metrics_direction():
    results = {"low": {"a": {"auroc": 0.6, "error": 0.1}, "b": {"auroc": 0.7, "error": 0.1}},
               "high": {"a": {"auroc": 0.9, "error": 0.3}, "b": {"auroc": 0.8, "error": 0.3}}}
    assert mean_rank(results, {"a": "auroc", "b": "auroc"}) == {"low": 2.0, "high": 1.0}
    assert mean_rank(results, {"a": "error", "b": "error"}) == {"low": 1.0, "high": 2.0}
    # a task some method has no value for cannot order every method: left out
    results["low"]["b"]["auroc"] = math.nan
    results["high"]["a"]["auroc"] = 0.5
    assert mean_rank(results, {"a": "auroc", "b": "auroc"}) == {"low": 1.0, "high": 2.0}


def test_selection_score_is_lower_is_better():
    val = {"a": {"loss": 0.5, "error": 0.2, "auroc": 0.8}, "b": {"loss": 0.3, "error": 0.4, "auroc": math.nan},
           "r": {"loss": 1.0}}
    assert selection_score(val, "loss") == pytest.approx(1.8)
    assert selection_score(val, "error") == pytest.approx(0.3)
    assert selection_score(val, "auroc") == pytest.approx(-0.8)  # b's undefined AUROC left out
    assert math.isnan(selection_score({"r": {"loss": 1.0}}, "auroc"))
    assert improves(-0.9, -0.8) and not improves(-0.8, -0.8) and improves(1.0, math.nan) and improves(1.0, None)
    assert not improves(math.nan, 1.0)


def _summary(primary=None):
    tasks = [Task("a", "binary"), Task("b", "binary"), Task("r", "regression")]
    data = SimpleNamespace(name="toy", tasks=tasks, task_names=["a", "b", "r"], groups=None, info={})
    config = {"seed": 0, "K": 1, "reference": "naive_mtl", "train": {}}
    if primary:
        config["primary_metric"] = primary
    rec = {"grouping": [["a", "b", "r"]], "total_test_loss": 0.0, "train_seconds": 0.0}
    results = {"naive_mtl": dict(rec, per_task=json.loads(json.dumps(REF))),
               "other": dict(rec, per_task=json.loads(json.dumps(RUN)))}
    return summarise(config, data, results)


def test_summary_and_table_on_auroc():
    s = _summary("auroc")
    other = s["methods"]["other"]
    assert s["primary_metric"] == "auroc"
    assert other["norm_gain_m"] == pytest.approx(((0.9 - 0.8) / 0.8 + (0.55 - 0.5) / 0.5) / 2)
    assert s["methods"]["naive_mtl"]["norm_gain_m"] == 0.0
    assert other["mean_rank"] == 1.0 and s["methods"]["naive_mtl"]["mean_rank"] == 2.0  # higher AUROC on a and b
    assert other["norm_gain_l"] == pytest.approx(norm_gain(RUN, REF, "loss"))  # NormGain_L / E stay
    assert "(M - M_ref)/M_ref" in s["conventions"]["norm_gain_m"]
    head, _, ref_row, other_row = results_table(s).splitlines()[:4]
    cells = [c.strip() for c in head.strip("|").split("|")]
    assert cells[4:9] == ["NormGain_L vs naive_mtl", "NormGain_E vs naive_mtl", "NormGain_M (auroc) vs naive_mtl",
                          "Δ_MTL vs STL", "mean rank (auroc)"]
    assert other_row.split("|")[7].strip() == f"{other['norm_gain_m']:+.4f}"


def test_the_default_ranks_each_task_on_its_own_metric():
    s = _summary()
    assert s["primary_metric"] == "task"
    assert all(r["norm_gain_m"] is None for r in s["methods"].values())
    # error on a (0.1 < 0.2: other) and b (0.1 < 0.15: naive_mtl), loss on r (other): other 4/3, naive_mtl 5/3
    assert s["methods"]["other"]["mean_rank"] == pytest.approx(4 / 3)
    head = results_table(s).splitlines()[0]
    assert "NormGain_M" not in head and "| mean rank |" in head
    assert s["conventions"]["epoch_selection"] == "weights of the epoch with the lowest total validation loss"


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 5)

    def forward(self, x):
        y = self.lin(x)
        return {"a": y[:, :2], "b": y[:, 2:4], "r": y[:, 4:]}


#: a crafted validation history: per epoch (loss a, loss b, loss r, error a, error b, AUROC a, AUROC b)
HISTORY = [(0.5, 0.5, 0.5, 0.30, 0.3, 0.97, math.nan),
           (0.6, 0.6, 0.6, 0.10, 0.3, 0.60, 0.90),
           (0.2, 0.2, 0.2, 0.35, 0.3, 0.70, 0.80),
           (0.4, 0.4, 0.4, 0.20, 0.3, 0.80, 0.85)]


@pytest.mark.parametrize("metric, epoch", [("loss", 2), ("error", 1), ("auroc", 0)])
def test_trainer_keeps_the_epoch_best_on_select_metric(monkeypatch, metric, epoch):
    # AUROC: mean over the tasks with a defined value: epoch 0 = 0.97 (b undefined), then 0.75, 0.75, 0.825
    tasks = [Task("a", "binary"), Task("b", "binary"), Task("r", "regression")]
    calls = iter(HISTORY)

    def crafted(*args, **kwargs):
        la, lb, lr, ea, eb, aa, ab = next(calls)
        return {"a": {"loss": la, "error": ea, "auroc": aa}, "b": {"loss": lb, "error": eb, "auroc": ab},
                "r": {"loss": lr}}

    monkeypatch.setattr(trainer_module, "evaluate", crafted)
    g = torch.Generator().manual_seed(0)
    ds = TensorTaskDataset(torch.randn(16, 3, generator=g), {"a": torch.randint(0, 2, (16,), generator=g),
                                                             "b": torch.randint(0, 2, (16,), generator=g),
                                                             "r": torch.randn(16, generator=g)})
    torch.manual_seed(0)
    model = _Tiny()
    weights = []
    result = train(model, make_loader(ds, 8, True), make_loader(ds, 8, False), tasks,
                   TrainConfig(epochs=4, lr=0.1, progress=False, select_metric=metric),
                   log=lambda record: weights.append({k: v.clone() for k, v in model.state_dict().items()}))
    assert result.best_epoch == epoch
    assert all(torch.equal(v, weights[epoch][k]) for k, v in result.model.state_dict().items())
    assert not torch.equal(weights[epoch]["lin.weight"], weights[-1]["lin.weight"])  # not simply the last


def test_a_run_keeps_the_epoch_with_the_best_mean_validation_auroc(tmp_path):
    # settings under which the lowest validation loss and the highest mean AUROC fall on different epochs
    cfg = build_config(preset="digits", overrides=["train.epochs=6", "train.progress=false", "methods=[naive_mtl]",
                                                   "train.select_metric=auroc", "train.lr=0.1", "train.batch_size=256",
                                                   "primary_metric=average_precision"])
    summary = run_experiment(cfg, tmp_path / "run", echo=lambda s: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("network") == "naive_mtl" and "val" in r]
    epochs = {r["epoch"]: r["val"] for r in records}
    mean_auroc = {e: sum(m["auroc"] for m in val.values()) / len(val) for e, val in epochs.items()}
    best = max(mean_auroc, key=mean_auroc.get)
    lowest_loss = min(records, key=lambda r: r["val_total_loss"])["epoch"]
    rec = summary["methods"]["naive_mtl"]
    assert len(epochs) == 6 and lowest_loss != best
    assert rec["best_epoch"] == best
    assert rec["val_per_task"] == epochs[best]
    assert summary["primary_metric"] == "average_precision" and rec["norm_gain_m"] == 0.0
    assert summary["conventions"]["epoch_selection"] == ("weights of the epoch with the highest mean validation "
                                                         "auroc over the tasks reporting it")


def test_config_errors():
    with pytest.raises(ConfigError, match=r"^primary_metric must be one of \['task', 'error', 'loss', 'auroc', "
                                          r"'average_precision'\].*got 'f1'$"):
        build_config(preset="digits", overrides=["primary_metric=f1"])
    with pytest.raises(ConfigError, match=r"^train\.select_metric.*'bogus'"):
        build_config(preset="digits", overrides=["train.select_metric=bogus"])
    for key in ("primary_metric", "train.select_metric"):
        cfg = build_config(preset="planted", overrides=[f"{key}=auroc", "data.n_train=40", "data.n_val=20",
                                                        "data.n_test=20"])
        with pytest.raises(ConfigError, match=rf"^{key}=auroc: dataset 'planted' has no task that reports auroc "
                                              r"\(auroc is defined for binary tasks only; its tasks are regression\)"):
            prepare_data(cfg)


def test_cli_refuses_auroc_without_binary_tasks_before_writing(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--preset", "planted", "--set", "primary_metric=auroc", "--set",
                                      "data.n_train=40", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: primary_metric=auroc: dataset 'planted'"), result.stderr
