"""Checkpoint commit: a save interrupted between any two file operations resumes to the numbers of an
uninterrupted run; corrupt, incomplete, foreign and old-layout checkpoints are refused in one line."""

import json
import os
import shutil

import pytest
import torch

from taskgrouping.data.base import make_loader
from taskgrouping.data.builtin import planted
from taskgrouping.engine.checkpoint import Checkpoint, CheckpointError
from taskgrouping.engine.trainer import TrainConfig, train
from taskgrouping.models.branched import build_branched_model

EPOCHS = 3
# every file-system mutation the checkpoint code makes goes through one of these
OPS = ("mkdir", "replace", "fsync", "unlink", "rmdir", "rename")


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def data():
    return planted(n_tasks=3, group_sizes=[2, 1], input_dim=6, feature_dim=2, n_train=48, n_val=16, n_test=16)


def _fit(data, ckpt=None, resume=False, epochs=EPOCHS, seed=5):
    torch.manual_seed(0)
    model = build_branched_model(data.tasks, [data.task_names], data.input_shape, backbone="mlp",
                                 backbone_options={"widths": [8]})
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, progress=False, schedule="step", step_size=1)
    return train(model, make_loader(data.train, 16, True), make_loader(data.val, 16, False), data.tasks, cfg,
                 seed=seed, checkpoint_dir=ckpt, resume=resume)


def _numbers(result):
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in result.history]
    return {k: v.clone() for k, v in result.model.state_dict().items()}, history, result.best_epoch


def _same(a, b):
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


def _instrument(monkeypatch, crash_at=None):
    """Count file operations; raise Crash instead of the ``crash_at``-th one (an fsync that is cut
    short also loses the second half of the file, as after a power cut)."""
    calls = []
    for name in OPS:
        real = getattr(os, name)

        def op(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            if len(calls) == crash_at:
                if _name == "fsync" and os.path.isfile(f"/proc/self/fd/{args[0]}"):
                    os.ftruncate(args[0], os.fstat(args[0]).st_size // 2)
                raise Crash(f"crash before {_name} #{crash_at}")
            return _real(*args, **kw)

        monkeypatch.setattr(os, name, op)
    return calls


def test_crash_between_any_two_file_operations_resumes_to_the_same_numbers(data, tmp_path, monkeypatch):
    reference = _numbers(_fit(data))
    with monkeypatch.context() as m:
        calls = _instrument(m)
        assert _same(_numbers(_fit(data, tmp_path / "count")), reference)
    n_ops = len(calls)
    assert n_ops >= EPOCHS * 8, calls  # folder, 3 files, folder sync, state.json, dir sync, clean-up
    for n in range(1, n_ops + 1):
        ckpt = tmp_path / f"crash{n}"
        with monkeypatch.context() as m:
            _instrument(m, crash_at=n)
            with pytest.raises(Crash):
                _fit(data, ckpt)
        committed = json.loads((ckpt / "state.json").read_text())["epoch"] if (ckpt / "state.json").exists() else -1
        resumed = _numbers(_fit(data, ckpt, resume=True))
        assert _same(resumed, reference), f"crash at operation {n} of {n_ops} (committed epoch {committed})"
        assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_2", "state.json"], n


def test_previous_epoch_kept_until_the_next_is_committed(data, tmp_path, monkeypatch):
    _fit(data, tmp_path, epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0", "state.json"]
    real_replace = os.replace

    def refuse_state(src, dst, *a, **kw):
        if str(dst).endswith("state.json"):
            raise Crash("before the commit")
        return real_replace(src, dst, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", refuse_state)
        with pytest.raises(Crash):
            _fit(data, tmp_path, resume=True, epochs=2)
    assert {"epoch_0", "epoch_1", "state.json"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 0
    _fit(data, tmp_path, resume=True, epochs=2)  # the leftover epoch_1 is rewritten, epoch_0 then dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1", "state.json"]


def _one_error(ckpt_dir, data, match):
    with pytest.raises(CheckpointError, match=match) as info:
        _fit(data, ckpt_dir, resume=True, epochs=EPOCHS)
    msg = str(info.value)
    assert "\n" not in msg and str(ckpt_dir) in msg and "delete" in msg
    return msg


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "empty"])
def test_damaged_weight_file_is_refused(data, tmp_path, damage):
    _fit(data, tmp_path, epochs=1)
    f = tmp_path / "epoch_0" / "optimizer.safetensors"
    raw = f.read_bytes()
    if damage == "flip":  # same size, one bit differs
        f.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    elif damage == "truncate":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "delete":
        f.unlink()
    else:
        f.write_bytes(b"")
    msg = _one_error(tmp_path, data, "corrupt" if damage != "delete" else "incomplete")
    assert str(f) in msg


def test_missing_epoch_folder_is_refused(data, tmp_path):
    _fit(data, tmp_path, epochs=1)
    shutil.rmtree(tmp_path / "epoch_0")
    assert str(tmp_path / "epoch_0") in _one_error(tmp_path, data, "incomplete")


@pytest.mark.parametrize("text", ["{ not json", "[1, 2]", "\xff", "[" * 100000])
def test_unreadable_state_file_is_refused(data, tmp_path, text):
    _fit(data, tmp_path, epochs=1)
    (tmp_path / "state.json").write_text(text, errors="surrogateescape")
    _one_error(tmp_path, data, "unreadable")


@pytest.mark.parametrize("folder", ["../elsewhere", "/etc", "epoch_0/../../x", 3])
def test_manifest_naming_another_place_is_refused(data, tmp_path, folder):
    _fit(data, tmp_path, epochs=1)
    state = json.loads((tmp_path / "state.json").read_text())
    state["checkpoint"]["folder"] = folder
    (tmp_path / "state.json").write_text(json.dumps(state))
    _one_error(tmp_path, data, "no valid manifest")


def test_tampered_trainer_state_is_refused(data, tmp_path):
    _fit(data, tmp_path, epochs=1)
    state = json.loads((tmp_path / "state.json").read_text())
    del state["history"]
    (tmp_path / "state.json").write_text(json.dumps(state))
    _one_error(tmp_path, data, "does not fit")


def test_checkpoint_of_another_seed_is_refused(data, tmp_path):
    _fit(data, tmp_path, epochs=1, seed=6)
    assert "seed 6 (now 5)" in _one_error(tmp_path, data, "written with")


def test_old_layout_is_refused(data, tmp_path):
    _fit(data, tmp_path, epochs=1)
    state = json.loads((tmp_path / "state.json").read_text())
    del state["checkpoint"]
    for f in (tmp_path / "epoch_0").iterdir():
        f.rename(tmp_path / f.name)
    (tmp_path / "epoch_0").rmdir()
    (tmp_path / "state.json").write_text(json.dumps(state))
    _one_error(tmp_path, data, "older version")


def test_leftovers_are_ignored_and_cleaned(data, tmp_path):
    reference = _numbers(_fit(data))
    _fit(data, tmp_path, epochs=1)
    (tmp_path / "epoch_1").mkdir()
    (tmp_path / "epoch_1" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "epoch_7").mkdir()
    (tmp_path / "state.json.tmp").write_text("{")
    (tmp_path / "model.safetensors").write_bytes(b"old layout")
    assert _same(_numbers(_fit(data, tmp_path, resume=True)), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_2", "state.json"]


def test_copy_to_continues_like_one_run(data, tmp_path, monkeypatch):
    reference = _numbers(_fit(data))
    _fit(data, tmp_path / "early", epochs=1)
    source = Checkpoint(tmp_path / "early")
    with monkeypatch.context() as m:  # an interrupted copy is not a checkpoint; the next copy starts over
        calls = _instrument(m, crash_at=3)
        with pytest.raises(Crash):
            source.copy_to(tmp_path / "full")
    assert len(calls) == 3 and not Checkpoint(tmp_path / "full").exists
    source.copy_to(tmp_path / "full")
    with pytest.raises(CheckpointError, match="holds one already"):
        source.copy_to(tmp_path / "full")
    assert _same(_numbers(_fit(data, tmp_path / "full", resume=True)), reference)
    # copying the whole directory (what ESA's init_from does) works as well
    shutil.copytree(tmp_path / "early", tmp_path / "tree")
    assert _same(_numbers(_fit(data, tmp_path / "tree", resume=True)), reference)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc")
def test_full_disk_during_a_save_is_one_error_and_resumable(data, tmp_path, monkeypatch):
    reference = _numbers(_fit(data))
    real_fsync, calls = os.fsync, []

    def full_in_epoch_1(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("state.json.tmp"):
            calls.append(fd)
            if len(calls) == 2:  # the commit of epoch 1
                raise OSError(28, "No space left on device")
        return real_fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_in_epoch_1)
        with pytest.raises(CheckpointError) as info:
            _fit(data, tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg and "No space left" in msg and "--resume" in msg
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 0
    assert _same(_numbers(_fit(data, tmp_path, resume=True)), reference)
