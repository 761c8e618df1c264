"""The balancer benchmark engine (Mao et al. 2024's protocol).

Pinned against: the standard ``naive_mtl`` / ``single_task`` methods run by run_experiment (the
benchmark's EW baseline and STL reference must reproduce them exactly, so the diagnostics callback
changes nothing); hand-computed arrows, Δ_MTL and ranking similarities on a made-up summary; the
documented level structure of the registry (UW / DWA / RLW / FAMO have no feature-level variant,
MGDA-UB and Aligned-MTL-UB are feature-level by definition).
"""

from __future__ import annotations

import json
import math

import pytest
from torch import nn

from taskgrouping.balancing.study import (balancer_levels, benchmark_table, plan_runs, run_benchmark,
                                          summarise)
from taskgrouping.config import build_config
from taskgrouping.experiment import run_experiment

TINY = ["train.epochs=1", "model.options.widths=[16,8]"]


def test_levels_follow_the_registry():
    for name in ("uw", "dwa", "rlw", "famo"):
        assert balancer_levels(name, ["a", "b"]) == ("param",)
    for name in ("mgda_ub", "aligned_mtl_ub"):
        assert balancer_levels(name, ["a", "b"]) == ("feature",)
    for name in ("ew", "pcgrad", "mgda", "cagrad", "gradnorm", "cosreg", "imtl", "graddrop"):
        assert balancer_levels(name, ["a", "b"]) == ("param", "feature")
    runs, restricted = plan_runs(["PCGrad", "uw", "mgda_ub"], ["param", "feature"], ["a", "b"],
                                 {"pcgrad": {"head_grads": "weighted"}})
    assert [r["id"] for r in runs] == ["ew@param", "pcgrad@param", "pcgrad@feature", "uw@param", "mgda_ub@feature"]
    assert runs[2]["options"] == {"head_grads": "weighted", "feature_level": True}
    assert runs[1]["options"] == {"head_grads": "weighted"} and runs[4]["options"] == {}
    assert restricted == {"uw": ["param"], "mgda_ub": ["feature"]}
    runs, restricted = plan_runs(["pcgrad"], ["feature"], ["a", "b"])
    assert [r["id"] for r in runs] == ["ew@param", "pcgrad@feature"] and restricted == {}


def _fake(seed_runs: dict[str, tuple[list[float], float, dict[str, float]]]) -> dict:
    """One seed: run id -> (per-task error of tasks x, y; Δ_MTL; diagnostics)."""
    return {"seed": 0, "stl": {"per_task": {"x": {"error": 0.2}, "y": {"error": 0.4}}, "train_seconds": 1.0},
            "runs": {rid: {"per_task": {"x": {"error": e[0]}, "y": {"error": e[1]}}, "delta_mtl": d,
                           "mean_rank": 1.0, "diagnostics": diag, "train_seconds": 1.0, "finite_train_losses": True}
                     for rid, (e, d, diag) in seed_runs.items()}}


def test_summary_arrows_and_ranking_similarity_by_hand():
    runs = [{"id": i, "balancer": i.split("@")[0], "level": i.split("@")[1], "options": {}}
            for i in ("ew@param", "a@param", "b@feature", "c@param")]
    seed = _fake({
        "ew@param": ([0.3, 0.5], -0.375, {"gds": 0.1, "gms": 0.9, "fd": 1.0}),
        "a@param": ([0.2, 0.6], -0.25, {"gds": 0.3, "gms": 0.8, "fd": 0.7}),
        "b@feature": ([0.4, 0.4], -0.5, {"gds": 0.2, "gms": 0.7, "fd": 1.2}),
        "c@param": ([0.3, 0.45], 0.1, {"gds": 0.0, "gms": math.nan, "fd": 0.5}),
    })
    s = summarise([seed], runs, {"x": "error", "y": "error"})
    # Δ_MTL order: c > a > ew > b; GDS order: a > b > ew > c. Of the 6 pairs only {a, ew} and {a, b}
    # are ordered alike, so S = 2/6.
    assert s["ranking_similarity"]["gds"]["S"] == pytest.approx(2 / 6)
    assert s["ranking_similarity"]["gds"]["gap"] == pytest.approx(1 / 6)
    # FD: c 0.5 < a 0.7 < ew 1.0 < b 1.2 is exactly the reverse of the Δ_MTL order
    assert s["ranking_similarity"]["fd"]["S"] == 0.0 and s["ranking_similarity"]["fd"]["gap"] == 0.5
    # GMS is NaN for c: ranked over the 3 others; Δ a > ew > b, GMS ew .9 > a .8 > b .7 -> 2 of 3 agree
    assert s["ranking_similarity"]["gms"]["n_runs"] == 3 and s["ranking_similarity"]["gms"]["S"] == pytest.approx(2 / 3)
    s.update(seeds=[0], dataset={"name": "toy"}, diagnostics_every=5, diagnostics_level="param",
             restricted_levels={"b": ["feature"]})
    table = benchmark_table(s)
    rows = {line.split("|")[1].strip() + "@" + line.split("|")[2].strip(): line for line in table.splitlines()
            if line.startswith("| ")}
    # errors: lower is better; a beats EW on x (0.2 < 0.3) and loses on y (0.6 > 0.5)
    assert "0.2000 ↑" in rows["a@param"] and "0.6000 ↓" in rows["a@param"]
    assert "0.3000 =" in rows["c@param"] and "0.4500 ↑" in rows["c@param"]
    assert "-25.00" in rows["a@param"] and "+10.00" in rows["c@param"]
    assert "↑" not in rows["ew (baseline)@param"] and "↓" not in rows["ew (baseline)@param"]
    assert "Feature level only (feature-level by definition): b." in table
    assert "| FD | negative" in table and "| 0.000 | 0.500 | 4 |" in table


@pytest.fixture(scope="module")
def small_benchmark(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    cfg = build_config(None, "digits", TINY)
    lines: list[str] = []
    table = run_benchmark(cfg, ["ew", "uw"], levels=("param", "feature"), seeds=(0,), out_dir=out,
                          diagnostics_every=4, echo=lines.append)
    return cfg, out, table, lines


def test_benchmark_writes_its_files_and_tables(small_benchmark):
    _, out, table, lines = small_benchmark
    assert lines[-1] == table and (out / "table.md").read_text() == table + "\n"
    assert (out / "trajectories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "benchmark.json").read_text())
    assert list(summary["rows"]) == ["ew@param", "ew@feature", "uw@param"]
    assert "Parameter level only (no feature-level variant): uw." in table
    seed = summary["per_seed"][0]
    for rid, run in seed["runs"].items():
        assert run["finite_train_losses"] and math.isfinite(run["delta_mtl"]) and math.isfinite(run["mean_rank"])
        hist = run["diagnostics_history"]
        # 17 steps in the one epoch, measured every 4: steps 0, 4, 8, 12, 16
        assert [h["step"] for h in hist] == [0, 4, 8, 12, 16] and all(h["epoch"] == 0 for h in hist)
        for m in ("gds", "gms", "fd"):
            assert run["diagnostics"][m] == pytest.approx(sum(h[m] for h in hist) / len(hist))
    assert set(summary["ranking_similarity"]) == {"gds", "gms", "fd"}
    for e in summary["ranking_similarity"].values():
        assert e["n_runs"] == 3 and 0 <= e["S"] <= 1 and e["gap"] == pytest.approx(abs(e["S"] - 0.5))
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in epochs} == {"stl", "ew@param", "ew@feature", "uw@param"}
    assert all("diagnostics" in r for r in epochs if r["run"] != "stl")


def test_baseline_and_stl_reproduce_the_standard_methods(small_benchmark, tmp_path):
    cfg, out, _, _ = small_benchmark
    summary = json.loads((out / "benchmark.json").read_text())
    ref = run_experiment(dict(cfg, methods=["naive_mtl", "single_task"]), tmp_path / "ref", echo=lambda s: None)
    seed = summary["per_seed"][0]
    assert seed["runs"]["ew@param"]["per_task"] == ref["methods"]["naive_mtl"]["per_task"]
    assert seed["stl"]["per_task"] == ref["methods"]["single_task"]["per_task"]
    assert seed["runs"]["ew@param"]["delta_mtl"] == pytest.approx(ref["methods"]["naive_mtl"]["delta_mtl"])
    # feature-level EW computes the same gradients as plain EW: same metrics up to float rounding
    for t, m in seed["runs"]["ew@feature"]["per_task"].items():
        assert m["loss"] == pytest.approx(seed["runs"]["ew@param"]["per_task"][t]["loss"], rel=1e-4)


class _NoSharedNet(nn.Module):
    """A model returning ``{task: logits}`` with neither shared_parameters() nor forward_heads()."""

    def __init__(self, tasks):
        super().__init__()
        self.names = [t.name for t in tasks]
        self.lin = nn.Linear(64, 2 * len(self.names))

    def forward(self, x):
        y = self.lin(x)
        return {t: y[:, 2 * i:2 * i + 2] for i, t in enumerate(self.names)}


class _SharedNoFeatures(_NoSharedNet):
    def shared_parameters(self):
        return list(self.lin.parameters())


def test_clear_errors_before_anything_is_written(tmp_path):
    cfg = build_config(None, "digits", TINY)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown balancer 'pcgard'"):
        run_benchmark(cfg, ["pcgard"], out_dir=out, echo=lambda s: None)
    with pytest.raises(ValueError, match=r"unknown level\(s\) \['params'\]"):
        run_benchmark(cfg, ["pcgrad"], levels=("params",), out_dir=out, echo=lambda s: None)
    with pytest.raises(ValueError, match="sets feature_level"):
        run_benchmark(cfg, ["pcgrad"], balancer_options={"pcgrad": {"feature_level": True}}, out_dir=out,
                      echo=lambda s: None)
    no_shared = lambda ctx: _NoSharedNet(ctx.data.tasks)  # noqa: E731
    with pytest.raises(ValueError, match="'pcgrad' at level 'param' needs per-task gradients w.r.t. the shared "
                                         "parameters, but _NoSharedNet has no shared_parameters"):
        run_benchmark(cfg, ["pcgrad"], levels=("param",), out_dir=out, model_fn=no_shared, echo=lambda s: None)
    with pytest.raises(ValueError, match="'pcgrad' at level 'feature' needs .* shared features, but "
                                         "_SharedNoFeatures gives none"):
        run_benchmark(cfg, ["pcgrad"], levels=("feature",), out_dir=out,
                      model_fn=lambda ctx: _SharedNoFeatures(ctx.data.tasks), echo=lambda s: None)
    with pytest.raises(ValueError, match="diagnostics at level 'param' need the shared parameters"):
        run_benchmark(cfg, ["uw"], levels=("param",), out_dir=out, model_fn=no_shared, echo=lambda s: None)
    assert not out.exists()
    (out / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="not empty"):
        run_benchmark(cfg, ["uw"], out_dir=out, echo=lambda s: None)
