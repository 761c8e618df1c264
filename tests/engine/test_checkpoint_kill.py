"""A training SIGKILLed at pseudo-random moments (during checkpoint commits or epochs) and resumed until
it finishes ends with the numbers of an uninterrupted run. The harness is benchmarks/bench_resume.py
(which runs 10 such trials in fresh interpreters); here the children are forks, to start fast."""

import importlib.util
import os
import random
import signal
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_resume.py"
EPOCHS = 12


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("bench_resume", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the training (POSIX)")
@pytest.mark.parametrize("moment_seed", [14, 1414])
def test_sigkill_at_random_moments_then_resume_gives_the_same_numbers(harness, tmp_path, moment_seed):
    harness.train_child(str(tmp_path / "ref_ckpt"), str(tmp_path / "ref.safetensors"), EPOCHS, lambda s: None)
    reference = harness.read_result(tmp_path / "ref.safetensors")
    out = tmp_path / "killed.safetensors"
    kills = harness.run_with_kills(harness.start_fork, tmp_path / "ckpt", out, EPOCHS, 3, random.Random(moment_seed))
    assert kills, "no kill landed before the training finished"
    assert harness.identical(harness.read_result(out), reference), kills
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"epoch_{EPOCHS - 1}", "state.json"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the training (POSIX)")
def test_killed_child_is_reported_as_killed(harness, tmp_path):
    """The harness itself: a kill that lands is counted (so the test above cannot pass vacuously)."""
    child = harness.start_fork(str(tmp_path / "ckpt"), str(tmp_path / "o.safetensors"), 50)
    assert next(iter(child.lines)).startswith("epoch 0 ")
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert not (tmp_path / "o.safetensors").exists()
