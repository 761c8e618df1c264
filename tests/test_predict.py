"""``taskgrouping predict``: a finished run's saved model, rebuilt for every kind of model a method
saves (a branched model, DMTG's pruned one, a two-shot assembly with half-size networks, Cross-stitch,
MTAN, InterroGate's compiled network), predicts the run's own test split with exactly the metrics
results.json recorded; the columns are P(class 1) = sigmoid(l1 - l0) of the loaded model's logits for
binary tasks, argmax class ids for multi-class tasks, values for regression; dense tasks go to .npz
only; every bad input is one line."""

import json
import math
import shutil

from conftest import npz_arrays
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from taskgrouping.cli import app
from taskgrouping.config import build_config
from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.experiment import run_experiment
from taskgrouping.models.branched import build_branched_model
from taskgrouping.predict import check_output_tasks, load_data, load_model, open_run, predict, predict_run
from taskgrouping.tasks import Task

METHODS = ("naive_mtl", "dmtg", "hoa", "cross_stitch", "mtan", "interrogate")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    cfg = build_config(preset="digits", overrides=["train.epochs=1", "train.progress=false",
                                                   f"methods=[{','.join(METHODS)}]"])
    run_experiment(cfg, out, echo=lambda s: None)
    return out


def invoke(*args):
    """(exit code, stdout, stderr) of the CLI run in this process."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_same_metrics(got, recorded):
    assert set(got) == set(recorded)
    for task, metrics in recorded.items():
        assert set(got[task]) == set(metrics)
        for name, value in metrics.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                assert math.isnan(got[task][name])
            else:
                assert got[task][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (task, name)


@pytest.mark.parametrize("method", METHODS)
def test_metrics_of_the_predictions_are_the_runs(run_dir, method):
    results = json.loads((run_dir / "results.json").read_text())
    _, preds = predict_run(run_dir, method)
    assert preds.n == 360  # digits: 20 % of 1,797 samples
    assert_same_metrics(preds.metrics, results["methods"][method]["per_task"])


def test_validation_split_gives_the_recorded_validation_metrics(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    _, preds = predict_run(run_dir, "dmtg", split="val")
    assert_same_metrics(preds.metrics, results["methods"]["dmtg"]["val_per_task"])


def test_cli_writes_probabilities_of_the_loaded_models_logits(run_dir, tmp_path):
    out = tmp_path / "preds.csv"
    code, stdout, stderr = invoke("predict", run_dir, "--method", "hoa", "--out", out, "--metrics")
    assert code == 0, stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert_same_metrics(json.loads(stdout.strip().splitlines()[-1]), results["methods"]["hoa"]["per_task"])
    table = pd.read_csv(out)
    run = open_run(run_dir)
    assert list(table.columns) == run.task_names == ["even", "gt4", "loop", "prime"]
    data = load_data(run)
    with torch.no_grad():
        logits = load_model(run, "hoa", data)(data.test.x)
    for task in table.columns:
        p = table[task].to_numpy()
        assert ((p >= 0) & (p <= 1)).all()
        expected = torch.sigmoid(logits[task][:, 1] - logits[task][:, 0]).numpy()
        np.testing.assert_allclose(p, expected, rtol=0, atol=1e-6)


def _mixed_data(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = [Task("kind", "multiclass", num_classes=4), Task("size", "regression"), Task("odd", "binary")]

    def split():
        return TensorTaskDataset(torch.randn(n, 5, generator=g),
                                 {"kind": torch.randint(0, 4, (n,), generator=g), "size": torch.randn(n, generator=g),
                                  "odd": torch.randint(0, 2, (n,), generator=g)})
    return TaskData("mixed", tasks, split(), split(), split(), input_shape=(5,))


def test_columns_are_class_ids_values_and_probabilities(tmp_path):
    data = _mixed_data()
    torch.manual_seed(0)
    model = build_branched_model(data.tasks, [["kind", "size"], ["odd"]], (5,), backbone="mlp",
                                 backbone_options={"widths": [8]}).eval()
    preds = predict(model, data, "test", batch_size=7)
    with torch.no_grad():
        raw = model(data.test.x)
    arrays = preds.arrays()
    assert arrays["kind"].dtype == np.int64 and set(arrays["kind"]) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(arrays["kind"], raw["kind"].argmax(dim=1).numpy())
    np.testing.assert_allclose(arrays["size"], raw["size"][:, 0].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["odd"], torch.sigmoid(raw["odd"][:, 1] - raw["odd"][:, 0]).numpy(),
                               rtol=0, atol=1e-6)
    # the metrics come from those outputs: accuracy of the class ids against the labels
    labels = data.test.targets["kind"].numpy()
    assert preds.metrics["kind"]["accuracy"] == pytest.approx(float((arrays["kind"] == labels).mean()))
    from taskgrouping.predict import write_predictions

    write_predictions(preds, tmp_path / "p.csv")
    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table.columns) == ["kind", "size", "odd"] and len(table) == 30
    np.testing.assert_array_equal(table["kind"].to_numpy(), arrays["kind"])
    write_predictions(preds, tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz") as z:
        assert sorted(z.files) == ["kind", "odd", "size"]
        np.testing.assert_array_equal(z["odd"], arrays["odd"])


class _DenseStub(torch.nn.Module):
    """A per-pixel model: 3-class segmentation logits and a 1-channel map."""

    def forward(self, x):
        b = x.shape[0]
        depth = x.reshape(b, 1, 4, 4)
        return {"seg": depth * torch.tensor([1.0, -1.0, 0.5]).reshape(1, 3, 1, 1), "depth": depth}


def test_dense_tasks_go_to_npz_only(tmp_path):
    tasks = [Task("seg", "segmentation", num_classes=3), Task("depth", "dense_regression")]
    split = TensorTaskDataset(torch.randn(6, 16), {"seg": torch.randint(0, 3, (6, 4, 4)),
                                                    "depth": torch.randn(6, 1, 4, 4)})
    data = TaskData("dense", tasks, split, split, split, input_shape=(16,))
    preds = predict(_DenseStub(), data, "test", batch_size=4)
    with pytest.raises(ValueError, match=r"task 'seg' is a segmentation task .*write --out .*p\.npz"):
        check_output_tasks(tasks, tmp_path / "p.csv")
    from taskgrouping.predict import write_predictions

    with pytest.raises(ValueError, match="one value per task and sample"):
        write_predictions(preds, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()
    write_predictions(preds, tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz") as z:
        assert z["seg"].shape == (6, 4, 4) and z["depth"].shape == (6, 1, 4, 4)
        np.testing.assert_array_equal(z["seg"], _DenseStub()(split.x)["seg"].argmax(dim=1).numpy())


def _digits_like_npz(path, types=("binary",) * 4, names=("even", "gt4", "loop", "prime")):
    arrays = npz_arrays(sizes=(20, 10, 12), dim=64, types=types, task_names=np.array(names))
    np.savez(path, **arrays)
    return arrays


def test_other_data_with_the_same_tasks(run_dir, tmp_path):
    arrays = _digits_like_npz(tmp_path / "new.npz")
    spec = tmp_path / "data.yaml"
    spec.write_text(f"data: {{name: npz, path: {tmp_path / 'new.npz'}}}\n")
    out = tmp_path / "p.csv"
    code, _, stderr = invoke("predict", run_dir, "--method", "naive_mtl", "--data", spec, "--out", out)
    assert code == 0, stderr
    table = pd.read_csv(out)
    run = open_run(run_dir)
    data = load_data(run)
    with torch.no_grad():
        logits = load_model(run, "naive_mtl", data)(torch.as_tensor(arrays["x_test"], dtype=torch.float32))
    assert len(table) == 12
    np.testing.assert_allclose(table["gt4"].to_numpy(), torch.softmax(logits["gt4"], 1)[:, 1].numpy(), atol=1e-6)
    # the same through --set alone
    code, _, stderr = invoke("predict", run_dir, "--method", "naive_mtl", "--set", "data.name=npz",
                             "--set", f"data.path={tmp_path / 'new.npz'}", "--out", tmp_path / "q.csv")
    assert code == 0, stderr
    assert pd.read_csv(tmp_path / "q.csv").equals(table)


def one_error_line(stderr, *needles):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, stderr)


def test_bad_inputs_are_one_line(run_dir, tmp_path):
    out = tmp_path / "p.csv"
    cases = [
        (("predict", tmp_path / "nope", "--method", "naive_mtl", "--out", out), ["nope", "does not exist"]),
        (("predict", run_dir, "--method", "single_task", "--out", out), ["'single_task' is not in run", "naive_mtl"]),
        (("predict", run_dir, "--method", "naive_mtl", "--split", "dev", "--out", out),
         ["--split 'dev'", "train, val, test"]),
        (("predict", run_dir, "--method", "naive_mtl", "--out", tmp_path / "p.txt"), ["p.txt", ".csv", ".npz"]),
        (("predict", run_dir, "--method", "naive_mtl", "--set", "seed=3", "--out", out), ["seed=3", "data.*"]),
        (("predict", run_dir, "--method", "naive_mtl", "--set", "data.name=planted", "--out", out),
         ["do not match the model's", "missing ['even'", "g0_t0"]),
    ]
    for args, needles in cases:
        code, _, stderr = invoke(*args)
        assert code == 2
        one_error_line(stderr, *needles)
    _digits_like_npz(tmp_path / "kinds.npz", types=("binary", "regression", "binary", "binary"))
    code, _, stderr = invoke("predict", run_dir, "--method", "naive_mtl", "--set", "data.name=npz",
                             "--set", f"data.path={tmp_path / 'kinds.npz'}", "--out", out)
    assert code == 2
    one_error_line(stderr, "task 'gt4'", "regression task", "same kind")
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "models" / "mtan.safetensors").unlink()
    code, _, stderr = invoke("predict", broken, "--method", "mtan", "--out", out)
    assert code == 2
    one_error_line(stderr, "'mtan'", "no saved model", "mtan.safetensors")
    (broken / "results.json").unlink()
    code, _, stderr = invoke("predict", broken, "--method", "naive_mtl", "--out", out)
    assert code == 2
    one_error_line(stderr, "results.json", "did not finish")
    assert not out.exists()


def test_the_runs_own_data_must_be_unchanged(tmp_path):
    from conftest import write_npz

    data = write_npz(tmp_path / "own.npz", types=("binary", "regression"))
    cfg = build_config(overrides=["data.name=npz", f"data.path={data}", "K=1", "methods=[naive_mtl]",
                                  "train.epochs=1", "train.progress=false"])
    summary = run_experiment(cfg, tmp_path / "run", echo=lambda s: None)
    _, preds = predict_run(tmp_path / "run", "naive_mtl")
    assert_same_metrics(preds.metrics, summary["methods"]["naive_mtl"]["per_task"])
    write_npz(data, types=("binary", "regression"), seed=1)  # the file the run read is replaced
    with pytest.raises(ValueError, match=r"changed since it ran \(data\.path: the file .*own\.npz' changed"):
        predict_run(tmp_path / "run", "naive_mtl")
    _, other = predict_run(tmp_path / "run", "naive_mtl", overrides=[f"data.path={data}"])  # on purpose
    assert other.n == 10 and other.metrics != preds.metrics
