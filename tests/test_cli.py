"""The CLI end to end: a run writes its results directory; every bad input is one clear line and leaves
no results file; a run killed with SIGKILL resumes to the same numbers."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import write_npz

SMALL = ["--set", "train.epochs=2", "--set", "train.progress=false"]


def cli(*args, cwd=None, check=False):
    proc = subprocess.run([sys.executable, "-m", "taskgrouping.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def test_run_writes_results_directory(tmp_path):
    out = tmp_path / "run"
    proc = cli("run", "--preset", "digits", "--out", str(out), "--set", "methods=[naive_mtl,single_task,random]",
               "--set", "seed=3", *SMALL, check=True)
    assert "| naive_mtl |" in proc.stdout and "| random |" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == 3 and res["git_revision"] and res["versions"]["torch"]
    for name, m in res["methods"].items():
        for key in ("per_task", "total_test_loss", "total_test_error", "norm_gain_l", "norm_gain_e", "grouping",
                    "train_seconds"):
            assert key in m, (name, key)
        assert set(m["per_task"]) == {"even", "gt4", "loop", "prime"}
    assert res["methods"]["naive_mtl"]["norm_gain_l"] == 0.0
    assert len(res["methods"]["random"]["grouping"]) == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3 and json.loads(lines[0])["method"] == "naive_mtl"
    assert (out / "table.md").read_text().startswith("| method |")


def test_datasets_lists_builtin_sets():
    out = cli("datasets", check=True).stdout
    assert "planted" in out and "multimnist" in out and "left_even" in out and "presets:" in out


def _npz(path, **overrides):
    return write_npz(path, **overrides)


def test_npz_own_data_runs(tmp_path):
    f = _npz(tmp_path / "d.npz", y_train=np.where(np.arange(80).reshape(40, 2) % 7 == 0, np.nan,
                                                    np.random.default_rng(1).integers(0, 2, (40, 2))).astype(float))
    out = tmp_path / "run"
    cli("run", "--set", "data.name=npz", "--set", f"data.path={f}", "--set", "K=2", "--set",
        "methods=[naive_mtl,single_task]", "--out", str(out), *SMALL, check=True)
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"]["tasks"] == ["a", "b"]


BAD = {
    "unknown config key": (["--set", "trian.epochs=3"], "unknown config key 'trian'"),
    "unknown nested key": (["--set", "train.epoch=3"], "train.epoch"),
    "unknown dataset": (["--set", "data.name=imagenet"], "unknown dataset 'imagenet'"),
    "unknown method": (["--set", "methods=[naive_mtl,magic]"], "unknown method 'magic'"),
    "unknown task": (["--set", "methods=[fixed]", "--set", "fixed.groups=[[even,gt4],[loop,zzz]]"],
                     "unknown task 'zzz'"),
    "K < 1": (["--set", "K=0"], "K must be an integer >= 1"),
    "K > N": (["--set", "K=9"], "K=9 is larger than the number of tasks (4)"),
    "missing data file": (["--set", "data.name=npz", "--set", "data.path=/nonexistent/x.npz"], "/nonexistent/x.npz"),
    "unknown preset": (["--preset", "nope"], "unknown preset 'nope'"),
    "bad value": (["--set", "train.lr=-1"], "train.lr"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line_and_no_results(tmp_path, case):
    args, msg = BAD[case]
    out = tmp_path / "run"
    preset = [] if "--preset" in args else ["--preset", "digits"]
    proc = cli("run", *preset, "--out", str(out), *SMALL, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and msg in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (out / "results.json").exists() and not (out / "table.md").exists()


NPZ_BAD = {
    "label with wrong shape": (dict(y_val=np.zeros((10, 3))), "y_val has shape (10, 3); expected (samples, tasks) = (10, 2)"),
    "empty split": (dict(x_test=np.zeros((0, 5)), y_test=np.zeros((0, 2))), "the test split is empty"),
    "binary label not 0/1": (dict(y_train=np.full((40, 2), 2.0)), "task 'a' (binary) has label 2.0"),
    "NaN loss during training": (dict(y_train=np.concatenate([np.zeros((40, 1)), np.full((40, 1), 1e38)], 1)),
                                 "loss of task 'b' became inf"),
}


@pytest.mark.parametrize("case", sorted(NPZ_BAD))
def test_bad_npz_input(tmp_path, case):
    overrides, msg = NPZ_BAD[case]
    f = _npz(tmp_path / "d.npz", **overrides)
    out = tmp_path / "run"
    proc = cli("run", "--set", "data.name=npz", "--set", f"data.path={f}", "--set", "K=2", "--set",
               "methods=[naive_mtl]", "--out", str(out), *SMALL)
    assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "results.json").exists()


def test_corrupt_npz_file(tmp_path):
    f = tmp_path / "d.npz"
    f.write_bytes(b"PK\x03\x04 garbage")
    proc = cli("run", "--set", "data.name=npz", "--set", f"data.path={f}", "--out", str(tmp_path / "r"), *SMALL)
    assert proc.returncode == 2 and str(f) in proc.stderr


def test_unreadable_checkpoint_on_resume(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--preset", "digits", "--out", str(out), "--set", "methods=[naive_mtl]", *SMALL]
    cli(*args, check=True)
    (out / "partial" / "naive_mtl.json").unlink()
    (out / "results.json").unlink()
    (out / "checkpoints" / "naive_mtl" / "naive_mtl" / "state.json").write_text("{ not json")
    proc = cli(*args, "--resume")
    assert proc.returncode == 2 and "checkpoint" in proc.stderr and "unreadable" in proc.stderr
    assert not (out / "results.json").exists()


def test_output_directory_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--preset", "digits", "--out", str(out), "--set", "methods=[naive_mtl]", *SMALL]
    cli(*args, check=True)
    before = (out / "results.json").read_text()
    proc = cli(*args)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (out / "results.json").read_text() == before


def _metrics(res):
    return {m: {"per_task": r["per_task"], "total_test_loss": r["total_test_loss"], "grouping": r["grouping"]}
            for m, r in res["methods"].items()}


def test_sigkill_then_resume_gives_the_same_results(tmp_path):
    common = ["--preset", "planted", "--set", "methods=[naive_mtl,oracle]", "--set", "train.epochs=12",
              "--set", "train.early_stopping=0", "--set", "train.progress=false", "--set", "data.n_train=2000"]
    ref = tmp_path / "ref"
    cli("run", *common, "--out", str(ref), check=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "taskgrouping.cli", "run", *common, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "checkpoints" / "oracle" / "oracle" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and not state.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    cli("run", *common, "--out", str(out), "--resume", check=True)
    assert _metrics(json.loads((out / "results.json").read_text())) == _metrics(json.loads((ref / "results.json").read_text()))
