"""NormGain, Delta_MTL and mean rank against hand-computed examples (DMTG Eqs. 7-8, InterroGate Eq. 6)."""

import pytest

from taskgrouping.metrics import delta_mtl, mean_rank, norm_gain


def test_norm_gain_hand_example():
    ref = {"a": {"loss": 2.0, "error": 0.2}, "b": {"loss": 1.0, "error": 0.1}}
    run = {"a": {"loss": 1.0, "error": 0.3}, "b": {"loss": 1.5, "error": 0.05}}
    assert norm_gain(run, ref, "loss") == pytest.approx(((2 - 1) / 2 + (1 - 1.5) / 1) / 2)
    assert norm_gain(run, ref, "error") == pytest.approx(((0.2 - 0.3) / 0.2 + (0.1 - 0.05) / 0.1) / 2)
    assert norm_gain(ref, ref, "loss") == 0.0


def test_delta_mtl_signs_follow_metric_direction():
    stl = {"seg": {"miou": 0.40}, "depth": {"abs_err": 0.50}}
    run = {"seg": {"miou": 0.44}, "depth": {"abs_err": 0.55}}
    # +10 % on mIoU (higher better), -10 % on depth error (lower better) -> 0
    assert delta_mtl(run, stl, {"seg": ["miou"], "depth": ["abs_err"]}) == pytest.approx(0.0)
    assert delta_mtl(run, stl, {"seg": ["miou"]}) == pytest.approx(0.1)


def test_mean_rank_with_ties():
    res = {"m1": {"a": {"error": 0.1}, "b": {"error": 0.3}},
           "m2": {"a": {"error": 0.1}, "b": {"error": 0.2}},
           "m3": {"a": {"error": 0.5}, "b": {"error": 0.1}}}
    r = mean_rank(res, {"a": "error", "b": "error"})
    assert r == {"m1": pytest.approx((1.5 + 3) / 2), "m2": pytest.approx((1.5 + 2) / 2), "m3": pytest.approx((3 + 1) / 2)}
