"""The run directory: checks before anything is written, the lock, the data's fingerprint, the
clean-up after a failure before training, strict JSON."""

import json
import math
import subprocess
import sys

import numpy as np
from conftest import write_npz
import pytest

from taskgrouping.config import ConfigError, build_config
from taskgrouping.engine.driver import (FINGERPRINT_NAME, LOCK_NAME, Driver, data_fingerprint, discard_on_error,
                                        fingerprint_change)
from taskgrouping.engine.trainer import TrainingDiverged
from taskgrouping.engine.lock import DirectoryLock, LockHeld
from taskgrouping.io import atomic_write_bytes, atomic_write_json, strict_json, tree_digest


def _strict_load(text):
    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def _listing(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def _npz_config(path, **extra):
    return build_config(None, None, ["data.name=npz", f"data.path={path}", "K=1", "methods=[naive_mtl]",
                                     *[f"{k}={v}" for k, v in extra.items()]])


def _write_npz(path, seed=0):
    return write_npz(path, sizes=(8, 4, 4), dim=3, types=("binary",), seed=seed)


# -- the lock ---------------------------------------------------------------------------------------

def test_second_driver_on_a_locked_directory_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    cfg = build_config(None, "digits", [])
    first = Driver(cfg, out)
    first.check_out_dir(can_resume=True)
    first.open()
    before = _listing(out)
    for resume in (False, True):
        second = Driver(cfg, out, resume=resume)
        with pytest.raises(ConfigError, match="another run holds its lock") as err:
            second.check_out_dir(can_resume=True)
        assert str(out) in str(err.value)
        assert _listing(out) == before
    first.close()
    again = Driver(cfg, out, resume=True)
    again.check_out_dir(can_resume=True)  # released: the same config resumes
    again.close()


def test_lock_is_released_by_the_context_manager(tmp_path):
    lock = tmp_path / LOCK_NAME
    with DirectoryLock(lock):
        assert DirectoryLock.held_here(lock)
        with pytest.raises(LockHeld):
            DirectoryLock(lock).acquire()
    assert not DirectoryLock.held_here(lock)
    DirectoryLock(lock).acquire()


def test_lock_held_by_another_process_is_seen(tmp_path):
    lock = tmp_path / LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"fh = open({str(lock)!r}, 'ab'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld):
            DirectoryLock(lock).acquire()
    finally:
        holder.kill()
        holder.wait()
    DirectoryLock(lock).acquire()


# -- checks before anything is written --------------------------------------------------------------

def test_out_that_is_a_file_or_below_a_file_is_refused(tmp_path):
    cfg = build_config(None, "digits", [])
    f = tmp_path / "f"
    f.write_text("keep")
    with pytest.raises(ConfigError, match="is a file; expected a directory"):
        Driver(cfg, f).check_out_dir()
    with pytest.raises(ConfigError, match="is a file"):
        Driver(cfg, f / "sub" / "run").check_out_dir()
    assert f.read_text() == "keep"


def test_out_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    import taskgrouping.engine.driver as driver

    cfg = build_config(None, "digits", [])
    monkeypatch.setattr(driver.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="is not writable"):
        Driver(cfg, tmp_path / "new").check_out_dir()
    with pytest.raises(ConfigError, match="is not writable"):
        Driver(cfg, tmp_path).check_out_dir()
    assert not (tmp_path / "new").exists()


def test_directory_with_only_a_stale_lock_counts_as_empty(tmp_path):
    (tmp_path / LOCK_NAME).touch()
    Driver(build_config(None, "digits", []), tmp_path).check_out_dir()


# -- the data's fingerprint -------------------------------------------------------------------------

def test_fingerprint_of_a_file_names_what_changed(tmp_path):
    f = _write_npz(tmp_path / "d.npz")
    before = data_fingerprint(_npz_config(f))
    assert before["files"]["data.path"]["sha256"] and before["seed"] is None
    assert fingerprint_change(before, data_fingerprint(_npz_config(f))) is None
    _write_npz(f, seed=1)
    change = fingerprint_change(before, data_fingerprint(_npz_config(f)))
    assert "data.path" in change and str(f) in change and "SHA-256" in change
    f.unlink()
    assert "no longer exists" in fingerprint_change(before, data_fingerprint(_npz_config(f)))


def test_fingerprint_of_builtin_data_is_its_parameters_and_seed():
    a = data_fingerprint(build_config(None, "digits", ["seed=1"]))
    b = data_fingerprint(build_config(None, "digits", ["seed=2"]))
    assert a["files"] == {} and a["data"]["name"] == "digits"
    assert "seed" in fingerprint_change(a, b)
    assert "data.n_train" in fingerprint_change(a, dict(a, data=dict(a["data"], n_train=5)))


def test_directory_digest_sees_names_sizes_and_times_not_hidden_caches(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "0.npy").write_bytes(b"123")
    before = tree_digest(tmp_path)
    (tmp_path / ".taskgrouping_cache").mkdir()
    (tmp_path / ".taskgrouping_cache" / "x.npy").write_bytes(b"cache")
    assert tree_digest(tmp_path) == before
    (tmp_path / "train" / "0.npy").write_bytes(b"1234")
    assert tree_digest(tmp_path) != before
    old = {"data": {"name": "nyuv2", "root": str(tmp_path)},
           "files": {"data.root": {"path": str(tmp_path), "directory": before}}}
    new = dict(old, files={"data.root": {"path": str(tmp_path), "directory": tree_digest(tmp_path)}})
    assert "data.root" in fingerprint_change(old, new) and "files under" in fingerprint_change(old, new)


def test_resume_on_changed_data_is_refused_naming_the_file(tmp_path):
    f = _write_npz(tmp_path / "d.npz")
    cfg = _npz_config(f)
    out = tmp_path / "run"
    with Driver(cfg, out) as d:
        d.check_out_dir(can_resume=True)
        d.open()
    assert _strict_load((out / FINGERPRINT_NAME).read_text())["files"]["data.path"]["path"] == str(f)
    with Driver(cfg, out, resume=True) as d:
        d.check_out_dir(can_resume=True)  # same data: fine
    _write_npz(f, seed=3)
    before = _listing(out)
    with Driver(cfg, out, resume=True) as d, pytest.raises(ConfigError) as err:
        d.check_out_dir(can_resume=True)
    msg = str(err.value)
    assert "the data differs" in msg and "data.path" in msg and str(f) in msg and "\n" not in msg
    assert _listing(out) == before


# -- clean-up after a failure before training -------------------------------------------------------

def test_failure_before_training_removes_the_directory_and_the_parents_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(ValueError), discard_on_error(out), Driver(build_config(None, "digits", []), out) as d:
        d.check_out_dir()
        d.open()
        (out / "partial").mkdir()
        raise ValueError("bad option found late")
    assert not (tmp_path / "a").exists()


def test_failure_in_an_empty_existing_directory_keeps_it_empty(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(OSError), discard_on_error(out), Driver(build_config(None, "digits", []), out) as d:
        d.check_out_dir()
        d.open()
        raise OSError(28, "No space left on device", str(out / "config.yaml"))
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("case", ["trained", "diverged", "not ours"])
def test_directory_is_kept_when_training_happened_or_it_is_not_ours(tmp_path, case):
    out = tmp_path / "run"
    existed = case == "not ours"
    if existed:
        out.mkdir()
        (out / "results.json").write_text("{}")
    with pytest.raises((ValueError, TrainingDiverged)), discard_on_error(out), \
            Driver(build_config(None, "digits", []), out, resume=existed) as d:
        if not existed:
            d.check_out_dir()
            d.open()
        if case == "trained":
            Driver.logger(out / "metrics.jsonl")({"epoch": 0})
            raise ValueError("late")
        raise TrainingDiverged("loss became nan") if case == "diverged" else ValueError("late")
    assert (out / ("results.json" if existed else "config.yaml")).is_file()


def test_directory_locked_by_another_run_is_never_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"os.makedirs({str(out)!r}, exist_ok=True)\n"
                               f"fh = open({str(out / LOCK_NAME)!r}, 'ab'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        with pytest.raises(ValueError), discard_on_error(out):  # the directory was empty when we looked
            assert holder.stdout.readline().strip() == "held"
            (out / "config.yaml").write_text("theirs")
            raise ValueError("ours failed")
        assert (out / "config.yaml").read_text() == "theirs"
    finally:
        holder.kill()
        holder.wait()


# -- strict JSON and writes that fail ---------------------------------------------------------------

def test_json_the_run_writes_is_strict(tmp_path):
    rec = {"loss": math.nan, "x": [1.0, math.inf, -math.inf], "t": np.float32("nan"), "ok": 0.5}
    assert _strict_load(strict_json(rec)) == {"loss": None, "x": [1.0, None, None], "t": None, "ok": 0.5}
    atomic_write_json(tmp_path / "r.json", rec, strict=True)
    assert _strict_load((tmp_path / "r.json").read_text())["loss"] is None
    log = Driver.logger(tmp_path / "m.jsonl", method="m")
    log({"epoch": 0, "val": {"a": {"loss": math.nan}}})
    assert _strict_load((tmp_path / "m.jsonl").read_text()) == {"epoch": 0, "val": {"a": {"loss": None}},
                                                                "method": "m"}
    atomic_write_json(tmp_path / "state.json", {"best": math.inf})  # state read back keeps inf
    assert json.loads((tmp_path / "state.json").read_text())["best"] == math.inf


def test_a_failed_atomic_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import taskgrouping.io as io

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    target = tmp_path / "results.json"
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"{}")
    assert err.value.filename == str(target) and err.value.errno == 28
    assert list(tmp_path.iterdir()) == []


def test_prepare_data_checks_the_data(monkeypatch):
    from taskgrouping.engine import driver

    seen = []
    monkeypatch.setattr(driver, "validate_data", seen.append)
    data = driver.prepare_data(build_config(None, "digits", []))
    assert seen == [data]


def test_a_resumed_log_does_not_repeat_an_epoch(tmp_path):
    path = tmp_path / "metrics.jsonl"
    Driver.logger(path, method="m")({"network": "n", "epoch": 0, "loss": 1.0})
    path.write_text(path.read_text() + '{"network": "n", "epo')  # a line cut short by a kill
    log = Driver.logger(path, resume=True, method="m")
    log({"network": "n", "epoch": 0, "loss": 1.0})  # the epoch trained again after the resume
    log({"network": "n", "epoch": 1, "loss": 0.5})
    Driver.logger(path, resume=True, method="other")({"network": "n", "epoch": 0, "loss": 2.0})
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.endswith("}")]
    assert [(r["method"], r["epoch"]) for r in records] == [("m", 0), ("m", 1), ("other", 0)]
