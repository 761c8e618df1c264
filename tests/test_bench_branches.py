"""Smoke test of benchmarks/bench_branches.py (loop vs stacked branches): one round of every
measurement, the files written and the last printed line one JSON object with the headline keys."""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
KEYS = {"interrogate_step_over_stl", "dmtg_step_over_k_naive", "stl_step_over_n_naive", "compiled_inference_over_stl"}


def test_bench_branches_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_branches

    monkeypatch.setattr(bench_branches, "OUT", tmp_path)
    monkeypatch.setattr(bench_branches, "ROUNDS", {"quick": (1, 1), "full": (1, 1)})
    monkeypatch.setattr(bench_branches, "WARMUP_STEPS", 1)
    monkeypatch.setattr(sys, "argv", ["bench_branches.py", "--quick"])
    bench_branches.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    head = json.loads(last)
    assert KEYS | {"mode", "device", "by_mode"} == set(head)
    assert set(head["by_mode"]) == {"loop", "stacked"}
    assert all(set(v) == KEYS for v in head["by_mode"].values())
    assert head == {**head["by_mode"][head["mode"]], "mode": head["mode"], "device": head["device"],
                    "by_mode": head["by_mode"]}
    result = json.loads((tmp_path / "branches_quick.json").read_text())
    assert all(c["ok"] for c in result["sanity"]), result["sanity"]
    assert all(c["parameters"] > 0 and c["grad_max_rel_diff"] < 1e-4 for c in result["sanity"])
    assert len(result["inference"]) == 5
    ops = result["ops_per_step"]
    # eight single-task networks dispatch more operators than one naive network, and stacking them dispatches
    # fewer than looping them (one vmapped call per layer instead of eight)
    assert ops["naive_mtl"] < ops["single_task@stacked"] < ops["single_task@loop"]
    assert ops["interrogate@stacked"] < ops["interrogate@loop"]
    assert "| 5 |" in (tmp_path / "branches_quick.md").read_text()
    assert not (tmp_path / "branches.json").exists()
