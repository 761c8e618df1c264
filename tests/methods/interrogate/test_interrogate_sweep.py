"""InterroGate's λ_s sweep: the summary over seeds, its table, and arguments it rejects."""

from __future__ import annotations

import math

import pytest

from taskgrouping.methods.interrogate import interrogate_sweep, summarise_sweep, sweep_table


def test_sweep_summary_averages_seeds_and_answers_the_two_questions():
    def run(seed, d_mtl, points):
        return {"seed": seed, "single_task": {"delta_mtl": 0.0, "flops": 100.0, "params": 10},
                "naive_mtl": {"delta_mtl": d_mtl, "flops": 20.0, "params": 2},
                "interrogate": {f"{lam:g}": {"delta_mtl": d, "flops": f, "params": 5,
                                             "task_specific_fraction": {"a": fr, "b": fr}}
                                for lam, (d, f, fr) in points.items()}}

    runs = [run(0, 0.01, {0.1: (0.03, 90.0, 0.9), 1.0: (0.00, 50.0, 0.5), 10.0: (-0.02, 60.0, 0.2)}),
            run(1, 0.03, {0.1: (0.05, 110.0, 0.7), 1.0: (0.02, 50.0, 0.3), 10.0: (-0.04, 20.0, 0.0)})]
    s = summarise_sweep(runs, [0.1, 1.0, 10.0])
    assert s["naive_mtl"]["delta_mtl"] == pytest.approx(0.02)
    p = {x["lambda_s"]: x for x in s["interrogate"]}
    assert p[0.1]["delta_mtl"] == pytest.approx(0.04) and p[0.1]["delta_mtl_std"] == pytest.approx(math.sqrt(2e-4))
    assert p[0.1]["flops"] == pytest.approx(100.0) and p[1.0]["task_specific_fraction"] == pytest.approx(0.4)
    # λ=0.1: Δ 0.04 ≥ 0.02 at 100 ≤ 100 FLOPs; λ=1: Δ 0.01 < 0.02; λ=10: Δ < 0
    assert s["answers"]["point_beating_naive_mtl_within_stl_flops"] == [0.1]
    assert s["answers"]["flops_monotone_nonincreasing_in_lambda"]  # 100, 50, 40
    runs[0]["interrogate"]["10"]["flops"] = 90.0  # mean 55 > 50
    assert not summarise_sweep(runs, [0.1, 1.0, 10.0])["answers"]["flops_monotone_nonincreasing_in_lambda"]
    assert "| InterroGate λ_s=0.1 | +4.00 ± 1.41 |" in sweep_table(s)


@pytest.mark.parametrize("lambdas,seeds,match", [
    ((), (0,), "at least one lambda_s"),
    ((0.1, -0.2), (0,), "numbers >= 0"),
    ((0.1,), (), "at least one seed"),
    ((0.1,), (1.5,), "seeds must be integers"),
])
def test_sweep_rejects_bad_arguments_before_training(tmp_path, lambdas, seeds, match):
    with pytest.raises(ValueError, match=match):
        interrogate_sweep({"data": {"name": "digits"}}, lambdas, seeds, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()
