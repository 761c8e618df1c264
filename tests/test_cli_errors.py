"""The CLI's error boundary and its run directory: one line ``error: ...`` (exit 2) for OS, data,
file and resource errors, ``--debug`` for the traceback, Ctrl-C with how to continue (exit 130),
nothing left in ``--out`` for an error before training, a lock on the run directory, ``--resume``
refused on other data, strict JSON."""

import json
import math
import os
import signal
import subprocess
import sys
import time

from conftest import write_npz
import pytest
from typer.testing import CliRunner

from taskgrouping.cli import app, describe_error

SMALL = ["--set", "train.epochs=1", "--set", "train.progress=false"]
DIGITS = ["--preset", "digits", "--set", "methods=[naive_mtl,single_task]", *SMALL]


def invoke(*args):
    """(exit code, stderr) of the CLI run in this process."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


def one_error_line(stderr, *needles):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, stderr)
    return lines[0]


def strict(text):
    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def _npz(path, seed=0):
    return write_npz(path, types=("binary", "binary"), seed=seed)


def _listing(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


# -- the output directory ---------------------------------------------------------------------------

def test_out_that_is_a_file(tmp_path):
    f = tmp_path / "results"
    f.write_text("mine")
    code, err = invoke("run", *DIGITS, "--out", f)
    assert code == 2
    one_error_line(err, str(f), "is a file")
    assert f.read_text() == "mine"
    code, err = invoke("run", *DIGITS, "--out", f / "sub")
    assert code == 2
    one_error_line(err, "is a file")


def test_out_that_cannot_be_created(tmp_path, monkeypatch):
    from pathlib import Path

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    out = tmp_path / "run"
    code, err = invoke("run", *DIGITS, "--out", out)
    assert code == 2
    one_error_line(err, str(out), "permission denied")
    assert not out.exists()


def test_disk_full_before_training_leaves_nothing(tmp_path, monkeypatch):
    import taskgrouping.io as io

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    out = tmp_path / "deep" / "run"
    code, err = invoke("run", *DIGITS, "--out", out)
    assert code == 2
    one_error_line(err, str(out / "config.yaml"), "no space left on device")
    assert not (tmp_path / "deep").exists()


def test_disk_full_after_training_keeps_a_resumable_run(tmp_path, monkeypatch):
    import taskgrouping.experiment as experiment

    real = experiment.atomic_write_json

    def full(path, obj, **kw):
        if path.name == "results.json":
            raise OSError(28, "No space left on device", str(path))
        real(path, obj, **kw)

    monkeypatch.setattr(experiment, "atomic_write_json", full)
    out = tmp_path / "run"
    code, err = invoke("run", *DIGITS, "--out", out)
    assert code == 2
    one_error_line(err, str(out / "results.json"), "no space left on device")
    assert not (out / "results.json").exists() and (out / "partial" / "single_task.json").is_file()
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(experiment, "atomic_write_json", real)
    code, err = invoke("run", *DIGITS, "--out", out, "--resume")
    assert code == 0, err
    assert strict((out / "results.json").read_text())["methods"]["single_task"]


@pytest.mark.parametrize("case", ["unknown method", "K too large", "missing data file", "data error late",
                                  "option error in a method", "out of memory"])
def test_error_before_training_leaves_nothing_in_out(tmp_path, monkeypatch, case):
    import taskgrouping.engine.driver as driver
    import taskgrouping.engine.fit as fit

    args = {"unknown method": ["--set", "methods=[magic]"], "K too large": ["--set", "K=9"],
            "missing data file": ["--set", "data.name=npz", "--set", f"data.path={tmp_path / 'no.npz'}"]}.get(case, [])
    if case == "data error late":  # found after the directory was created (e.g. by a method)
        monkeypatch.setattr(fit, "train", lambda *a, **k: (_ for _ in ()).throw(ValueError("data.x: bad value")))
    if case == "option error in a method":
        monkeypatch.setattr(fit, "train", lambda *a, **k: (_ for _ in ()).throw(KeyError("naive_mtl.zzz: unknown")))
    if case == "out of memory":
        monkeypatch.setattr(driver, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    out = tmp_path / "run"
    code, err = invoke("run", *DIGITS, *args, "--out", out)
    assert code == 2
    one_error_line(err)
    assert not out.exists()


def test_interrogate_sweep_data_error_leaves_nothing(tmp_path):
    out = tmp_path / "sweep"
    code, err = invoke("interrogate-sweep", "--preset", "digits", "--set", "data.name=npz", "--set",
                       f"data.path={tmp_path / 'none.npz'}", "--out", out, "--lambdas", "0.1", *SMALL)
    assert code == 2
    one_error_line(err, "none.npz")
    assert not out.exists()


def test_bad_seeds_name_the_option(tmp_path):
    code, err = invoke("balance-bench", "--preset", "digits", "--seeds", "0,x", "--out", tmp_path / "b", *SMALL)
    assert code == 2
    one_error_line(err, "--seeds", "'x'")
    assert not (tmp_path / "b").exists()


# -- resume -----------------------------------------------------------------------------------------

def test_resume_on_changed_data_is_refused(tmp_path):
    f = _npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    args = ["run", "--set", "data.name=npz", "--set", f"data.path={f}", "--set", "K=2", "--set",
            "methods=[naive_mtl,single_task]", *SMALL, "--out", out]
    assert invoke(*args)[0] == 0
    assert strict((out / "data_fingerprint.json").read_text())["files"]["data.path"]["path"] == str(f)
    (out / "partial" / "single_task.json").unlink()
    (out / "results.json").unlink()
    metrics = (out / "metrics.jsonl").read_bytes()
    _npz(f, seed=1)
    code, err = invoke(*args, "--resume")
    assert code == 2
    one_error_line(err, "data.path", str(f), "changed", "--resume")
    assert (out / "metrics.jsonl").read_bytes() == metrics and not (out / "results.json").exists()
    _npz(f, seed=0)  # the data it started with: resumes
    assert invoke(*args, "--resume")[0] == 0


def test_truncated_model_needed_on_resume(tmp_path):
    out = tmp_path / "run"
    assert invoke("run", *DIGITS, "--out", out)[0] == 0
    (out / "partial" / "single_task.json").unlink()
    (out / "results.json").unlink()
    weights = out / "models" / "naive_mtl.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    metrics = (out / "metrics.jsonl").read_bytes()
    code, err = invoke("run", *DIGITS, "--out", out, "--resume")
    assert code == 2
    one_error_line(err, str(weights), "expected")
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_damaged_partial_record_on_resume(tmp_path):
    out = tmp_path / "run"
    assert invoke("run", *DIGITS, "--out", out)[0] == 0
    (out / "partial" / "naive_mtl.json").write_text('{"per_task": ')
    code, err = invoke("run", *DIGITS, "--out", out, "--resume")
    assert code == 2
    one_error_line(err, "naive_mtl.json", "not valid JSON")


# -- the lock ---------------------------------------------------------------------------------------

def test_locked_directory_is_refused_and_untouched(tmp_path):
    from taskgrouping.engine.lock import DirectoryLock

    out = tmp_path / "run"
    assert invoke("run", *DIGITS, "--out", out)[0] == 0
    before = _listing(out)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, time\n"
                               f"fh = open({str(out / '.lock')!r}, 'ab'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"]):
            code, err = invoke("run", *DIGITS, "--out", out, *extra)
            assert code == 2
            one_error_line(err, str(out), "another run holds")
        assert _listing(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert not DirectoryLock.held_here(out / ".lock")


def test_second_run_is_refused_while_the_first_finishes_normally(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--preset", "digits", "--set", "methods=[naive_mtl]", "--set", "train.epochs=4",
            "--set", "train.progress=false", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "taskgrouping.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "config.yaml").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # hold the first run still (with its lock) while the second tries
        assert first.poll() is None and not (out / "results.json").exists(), "the first run ended too soon"
        before = _listing(out)
        for extra in ([], ["--resume"]):
            code, err = invoke(*args, *extra)
            assert code == 2
            one_error_line(err, str(out), "another run holds")
        assert _listing(out) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert strict((out / "results.json").read_text())["methods"]["naive_mtl"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


# -- interrupts, divergence, --debug ----------------------------------------------------------------

@pytest.mark.parametrize("at_call", [1, 2])
def test_ctrl_c_says_how_to_continue(tmp_path, monkeypatch, at_call):
    import taskgrouping.engine.fit as fit

    real, calls = fit.train, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit, "train", interrupted)
    out = tmp_path / "run"
    code, err = invoke("run", *DIGITS, "--out", out)
    assert code == 130 and len(err.strip().splitlines()) == 1 and err.startswith("interrupted"), err
    if at_call == 1:  # nothing trained: nothing kept
        assert not out.exists() and "nothing was written" in err
        return
    assert f"--resume --out {out}" in err and (out / "partial" / "naive_mtl.json").is_file()
    monkeypatch.setattr(fit, "train", real)
    assert invoke("run", *DIGITS, "--out", out, "--resume")[0] == 0
    assert (out / "results.json").is_file()


def test_diverged_training_keeps_the_run_and_says_how_to_continue(tmp_path, monkeypatch):
    import taskgrouping.engine.fit as fit
    from taskgrouping.engine.trainer import TrainingDiverged

    real, calls = fit.train, []

    def diverges(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise TrainingDiverged("loss of task 'even' became nan at epoch 0, step 3; lower train.lr")
        return real(*args, **kwargs)

    monkeypatch.setattr(fit, "train", diverges)
    out = tmp_path / "run"
    code, err = invoke("run", *DIGITS, "--out", out)
    assert code == 2
    one_error_line(err, "became nan", f"--resume --out {out}", "new --out")
    assert (out / "config.yaml").is_file() and (out / "partial" / "naive_mtl.json").is_file()


def test_debug_shows_the_traceback(tmp_path):
    code, err = invoke("tag-select", "--affinity", tmp_path, "--groups", "2")
    assert code == 2
    one_error_line(err, "--affinity", str(tmp_path), "expected a file")
    result = CliRunner().invoke(app, ["--debug", "tag-select", "--affinity", str(tmp_path), "--groups", "2"])
    assert isinstance(result.exception, ValueError)
    proc = subprocess.run([sys.executable, "-m", "taskgrouping.cli", "--debug", "select", "--losses", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unexpected_errors_are_one_line_too(monkeypatch):
    import taskgrouping.methods.base as base

    monkeypatch.setattr(base, "available_methods", lambda: (_ for _ in ()).throw(RuntimeError("boom\nsecond line")))
    code, err = invoke("methods")
    assert code == 1
    one_error_line(err, "internal error", "RuntimeError: boom second line", "--debug")


# -- inputs of select / tag-select ------------------------------------------------------------------

def test_select_losses_directory(tmp_path):
    code, err = invoke("select", "--losses", tmp_path)
    assert code == 2
    one_error_line(err, "--losses", str(tmp_path), "not a file")
    code, err = invoke("select", "--losses", tmp_path / "none.csv")
    assert code == 2
    one_error_line(err, "none.csv", "does not exist")


@pytest.mark.parametrize("content", ["[" * 100000, "{\"a\": {\"a\": 1.0,", "\xff\xfe binary"])
def test_tag_select_bad_json_is_one_line(tmp_path, content):
    f = tmp_path / "aff.json"
    f.write_text(content, encoding="latin-1")
    code, err = invoke("tag-select", "--affinity", f, "--groups", "2")
    assert code == 2
    one_error_line(err, str(f))


def test_bad_yaml_config_is_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: [1, 2\n")
    code, err = invoke("run", f, "--out", tmp_path / "r")
    assert code == 2
    one_error_line(err, str(f))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("exc, needles", [
    (OSError(28, "No space left on device", "/x/results.json"), ["/x/results.json", "no space left"]),
    (OSError(21, "Is a directory", "/x"), ["/x", "is a directory; expected a file"]),
    (RecursionError("maximum recursion depth exceeded"), ["--affinity f", "nested too deeply"]),
    (MemoryError(), ["--affinity f", "out of memory"]),
    (json.JSONDecodeError("Expecting value", "{\n", 2), ["--affinity f", "not valid JSON"]),
])
def test_describe_error_names_the_input_and_what_was_expected(exc, needles):
    msg, code = describe_error(exc, "--affinity f")
    assert code == 2 and "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_describe_safetensors_and_yaml_errors():
    import yaml
    from safetensors import SafetensorError

    msg, code = describe_error(SafetensorError("header too large"), "models/x.safetensors")
    assert code == 2 and "models/x.safetensors" in msg and "safetensors" in msg
    try:
        yaml.safe_load("a: [1,\n b")
    except yaml.YAMLError as exc:
        msg, code = describe_error(exc, "c.yaml")
    assert code == 2 and "\n" not in msg and msg.startswith("c.yaml: not valid YAML")


# -- strict JSON ------------------------------------------------------------------------------------

def test_nan_metrics_are_written_as_null(tmp_path, monkeypatch):
    import taskgrouping.experiment as experiment

    real = experiment.method_record

    def with_nan(res, data):
        rec = real(res, data)
        rec["per_task"]["even"]["loss"] = math.nan
        rec["inf_field"] = math.inf
        return rec

    monkeypatch.setattr(experiment, "method_record", with_nan)
    out = tmp_path / "run"
    assert invoke("run", *DIGITS, "--out", out)[0] == 0
    res = strict((out / "results.json").read_text())
    assert res["methods"]["naive_mtl"]["per_task"]["even"]["loss"] is None
    assert strict((out / "partial" / "naive_mtl.json").read_text())["inf_field"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict(line)
    (out / "results.json").unlink()  # a resume reads the null back as NaN and writes null again
    assert invoke("run", *DIGITS, "--out", out, "--resume")[0] == 0
    assert strict((out / "results.json").read_text())["methods"]["naive_mtl"]["per_task"]["even"]["loss"] is None
