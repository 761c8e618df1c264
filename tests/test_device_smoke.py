"""benchmarks/device_smoke.py (every method end to end on one device, for CUDA machines): on the CPU with a
few methods, the table it writes, and a failing run recorded with its error line and exit code 1."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _main(monkeypatch, tmp_path, *args):
    monkeypatch.syspath_prepend(str(BENCH))
    import device_smoke

    monkeypatch.setattr(device_smoke, "OUT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["device_smoke.py", "--device", "cpu", *args])
    with pytest.raises(SystemExit) as done:
        device_smoke.main()
    return device_smoke, done.value.code, json.loads((tmp_path / "device_smoke_cpu.json").read_text())


def test_methods_run_end_to_end_and_are_tabled(monkeypatch, tmp_path):
    _, code, result = _main(monkeypatch, tmp_path, "--cases", "mlp", "--methods", "naive_mtl,dmtg,hoa", "--epochs", "1")
    assert code == 0 and result["failed"] == 0
    assert [(r["case"], r["method"]) for r in result["runs"]] == [("mlp", "naive_mtl"), ("mlp", "dmtg"), ("mlp", "hoa")]
    assert all(r["ok"] and r["total_test_loss"] > 0 for r in result["runs"])
    assert "| mlp | hoa | ok |" in (tmp_path / "device_smoke_cpu.md").read_text()


def test_a_failing_run_is_recorded_with_its_error(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import device_smoke

    def broken(cfg, out, echo):
        raise RuntimeError("Expected all tensors to be on the same device\nsecond line")

    monkeypatch.setattr(device_smoke, "run_experiment", broken)
    _, code, result = _main(monkeypatch, tmp_path, "--cases", "mlp", "--methods", "naive_mtl", "--epochs", "1")
    assert code == 1 and result["failed"] == 1
    assert result["runs"][0]["error"].startswith("RuntimeError: Expected all tensors to be on the same device (")
    # the two-shot methods that train a network per task subset run on the 4-task case only
    assert device_smoke.runs(["mlp", "cnn"], ["hoa", "dmtg"]) == [("mlp", "hoa"), ("mlp", "dmtg"), ("cnn", "dmtg")]
