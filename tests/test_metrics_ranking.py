"""Ranking metrics of binary tasks (AUROC, average precision) and macro-F1 of multi-class tasks: pinned by
hand and against scikit-learn; missing labels skipped, a one-class split undefined (null in results.json);
per-method means in results.json and the table; ``taskgrouping methods`` prints whole first paragraphs."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from taskgrouping.io import strict_json
from taskgrouping.report import results_table
from taskgrouping.tasks import HIGHER_IS_BETTER, Task

BINARY = Task("b", "binary")


def logits_for(probs) -> torch.Tensor:
    """Two logits whose softmax gives ``probs`` as the positive-class probability."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p) - torch.log1p(-p)], dim=1).float()


def metrics_of(task, batches):
    meter = task.meter()
    for pred, target in batches:
        meter.update(pred, torch.as_tensor(target))
    return meter.compute()


def test_hand_computed_example():
    # sorted by score: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): 3 of the 4 (+, -) pairs ordered -> AUROC 0.75;
    # precision 1 at recall 1/2, 2/3 at recall 1 -> AP = 0.5 * 1 + 0.5 * 2/3
    m = metrics_of(BINARY, [(logits_for([0.1, 0.4]), [0, 0]), (logits_for([0.35, 0.8]), [1, 1])])
    assert m["auroc"] == pytest.approx(0.75, abs=1e-12)
    assert m["average_precision"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert HIGHER_IS_BETTER["auroc"] and HIGHER_IS_BETTER["average_precision"] and HIGHER_IS_BETTER["macro_f1"]


def test_matches_scikit_learn_on_random_scores():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(500, 2, generator=g) * 2
    target = torch.randint(0, 2, (500,), generator=g)
    target[torch.rand(500, generator=g) < 0.2] = -1  # missing labels
    m = metrics_of(BINARY, [(pred[i:i + 64], target[i:i + 64]) for i in range(0, 500, 64)])
    valid = target >= 0
    prob = torch.softmax(pred, dim=1)[:, 1][valid].numpy()
    y = target[valid].numpy()
    assert m["auroc"] == pytest.approx(roc_auc_score(y, prob), abs=1e-9)
    assert m["average_precision"] == pytest.approx(average_precision_score(y, prob), abs=1e-9)
    # the existing metrics are unchanged
    hit = int((pred.argmax(1) == target)[valid].sum()) / int(valid.sum())
    assert m["accuracy"] == pytest.approx(hit, abs=1e-12) and m["error"] == pytest.approx(1 - hit, abs=1e-12)
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(pred[valid], target[valid]).item(), rel=1e-5)


def test_perfect_ranking_gives_one():
    probs = np.linspace(0.01, 0.99, 20)
    m = metrics_of(BINARY, [(logits_for(probs), (probs > 0.7).astype(np.int64))])
    assert m["auroc"] == 1.0 and m["average_precision"] == 1.0


@pytest.mark.parametrize("labels", [[1, 1, 1, -1], [0, 0, -1, 0], [-1, -1, -1, -1]])
def test_one_class_split_is_undefined_and_null_in_json(labels):
    m = metrics_of(BINARY, [(logits_for([0.2, 0.6, 0.9, 0.4]), labels)])
    assert math.isnan(m["auroc"]) and math.isnan(m["average_precision"])
    out = json.loads(strict_json(m))
    assert out["auroc"] is None and out["average_precision"] is None


def test_no_batch_seen_is_undefined():
    m = BINARY.meter().compute()
    assert math.isnan(m["auroc"]) and math.isnan(m["average_precision"])


def test_missing_labels_are_skipped():
    probs, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    clean = metrics_of(BINARY, [(logits_for(probs), labels)])
    # extra rows without a label, scored to ruin the ranking if they were counted
    with_missing = metrics_of(BINARY, [(logits_for(probs + [0.99, 0.01]), labels + [-1, -1])])
    assert with_missing["auroc"] == clean["auroc"] and with_missing["average_precision"] == clean["average_precision"]
    as_float = metrics_of(BINARY, [(logits_for(probs + [0.99]), torch.tensor(labels + [math.nan]))])
    assert as_float["auroc"] == clean["auroc"] and as_float["average_precision"] == clean["average_precision"]


def test_meter_keeps_compact_tensors():
    meter = BINARY.meter()
    meter.update(torch.randn(8, 2), torch.tensor([0, 1, -1, 1, 0, 0, 1, -1]))
    assert meter.scores[0].dtype == torch.float32 and meter.labels[0].dtype == torch.int8
    assert meter.scores[0].numel() == 6


def test_multiclass_accuracy_and_macro_f1_match_scikit_learn():
    task = Task("m", "multiclass", num_classes=5)
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(300, 5, generator=g)
    target = torch.randint(0, 4, (300,), generator=g)  # class 4 never a label
    target[:30] = -1
    m = metrics_of(task, [(pred[i:i + 50], target[i:i + 50]) for i in range(0, 300, 50)])
    valid = target >= 0
    y, yhat = target[valid].numpy(), pred.argmax(1)[valid].numpy()
    assert m["accuracy"] == pytest.approx(float((y == yhat).mean()), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(y, yhat, average="macro"), abs=1e-12)
    assert "auroc" not in m


def test_regression_has_no_new_keys():
    m = metrics_of(Task("r", "regression"), [(torch.randn(4, 1), torch.randn(4))])
    assert not {"auroc", "average_precision", "macro_f1"} & set(m)


def _summary(per_task):
    rec = {"per_task": per_task, "grouping": [["a"]], "total_test_loss": 1.0, "train_seconds": 0.0,
           "mean_auroc": 0.75, "mean_average_precision": None}
    return {"reference": "naive_mtl", "methods": {"naive_mtl": rec}, "seed": 0, "K": 1,
            "dataset": {"name": "x", "tasks": ["a"]}, "conventions": {"epoch_selection": "val"}}


def test_table_shows_ranking_columns_only_with_binary_tasks():
    with_binary = results_table(_summary({"a": {"loss": 1.0, "auroc": 0.75, "average_precision": None}}))
    head = with_binary.splitlines()[0]
    assert "mean AUROC" in head and "mean AP" in head
    assert "| 0.7500 | – |" in with_binary.splitlines()[2]
    without = results_table(_summary({"a": {"loss": 1.0, "mse": 1.0}}))
    assert "AUROC" not in without and "mean AP" not in without


def test_ranking_means_skip_undefined_tasks():
    from types import SimpleNamespace

    from taskgrouping.experiment import ranking_means

    data = SimpleNamespace(tasks=[Task("a", "binary"), Task("b", "binary"), Task("c", "regression")])
    per_task = {"a": {"auroc": 0.5, "average_precision": math.nan}, "b": {"auroc": 1.0, "average_precision": None},
                "c": {"loss": 1.0}}
    assert ranking_means(per_task, data) == {"mean_auroc": 0.75, "mean_average_precision": None}
    none = SimpleNamespace(tasks=[Task("c", "regression")])
    assert ranking_means({"c": {"loss": 1.0}}, none) == {"mean_auroc": None, "mean_average_precision": None}


def test_methods_command_prints_whole_first_paragraphs():
    from typer.testing import CliRunner

    from taskgrouping.cli import app

    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert any(line.startswith("dmtg: ") for line in lines)
    for line in lines:
        doc = line.split("  [options:")[0]
        assert doc.endswith("."), line  # whole sentences, not a cut first line


def test_run_digits_writes_ranking_metrics(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "taskgrouping.cli", "run", "--preset", "digits", "--out", str(out),
                           "--set", "methods=[naive_mtl,random]", "--set", "train.epochs=2",
                           "--set", "train.progress=false"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    for name, rec in res["methods"].items():
        for task, m in rec["per_task"].items():
            for key in ("auroc", "average_precision"):
                assert m[key] is None or 0.0 <= m[key] <= 1.0, (name, task, key)
        vals = [m["auroc"] for m in rec["per_task"].values() if m["auroc"] is not None]
        assert rec["mean_auroc"] == pytest.approx(sum(vals) / len(vals))
        assert "mean_average_precision" in rec
    table = (out / "table.md").read_text()
    assert "mean AUROC" in table.splitlines()[0] and "mean AP" in table.splitlines()[0]
    assert "mean AUROC" in proc.stdout
