"""Mao et al. (2024) measures on given gradients and saliencies: hand-computed GDS / GMS / FD
values, and a SciPy peer for ranking similarity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from taskgrouping.diagnostics import (feature_disentanglement, feature_disentanglement_from_saliency,
                                      gradient_direction_matrix, gradient_direction_similarity,
                                      gradient_magnitude_matrix, gradient_magnitude_similarity, ranking_similarity,
                                      ranking_similarity_gap)


# -- GDS / GMS ------------------------------------------------------------------------------------

def test_gds_identical_opposite_orthogonal():
    g = torch.tensor([1.0, -2.0, 0.5])
    assert gradient_direction_similarity(torch.stack([g, 3 * g, 0.1 * g])) == pytest.approx(1.0)
    assert gradient_direction_similarity(torch.stack([g, -2 * g])) == pytest.approx(-1.0)
    assert gradient_direction_similarity(torch.eye(4)) == pytest.approx(0.0)


def test_gds_hand_computed_three_tasks():
    # pairs: (e1, e2) -> 0, (e1, e1+e2) -> 1/sqrt2, (e2, e1+e2) -> 1/sqrt2
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert gradient_direction_similarity(G) == pytest.approx(2 / math.sqrt(2) / 3)
    M = gradient_direction_matrix(G)
    assert torch.allclose(M, M.T) and torch.allclose(M.diagonal(), torch.ones(3, dtype=M.dtype))
    assert M[0, 2].item() == pytest.approx(1 / math.sqrt(2))


def test_gms_equal_norms_and_norm_ratio():
    assert gradient_magnitude_similarity(torch.tensor([[3.0, 4.0], [5.0, 0.0], [0.0, -5.0]])) == pytest.approx(1.0)
    for r in (0.5, 3.0, 10.0):
        G = torch.tensor([[1.0, 0.0], [0.0, r]])
        assert gradient_magnitude_similarity(G) == pytest.approx(2 * r / (1 + r * r))
    assert gradient_magnitude_similarity(torch.tensor([[1.0, 0.0], [0.0, 3.0]])) == pytest.approx(0.6)
    # three tasks with norms 1, 2, 4: pairs 2*2/5, 2*4/17, 2*8/20
    G = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    assert gradient_magnitude_similarity(G) == pytest.approx((0.8 + 8 / 17 + 0.8) / 3)
    assert gradient_magnitude_matrix(G)[1, 2].item() == pytest.approx(0.8)


def test_zero_gradient_pairs():
    G = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    # cosine is undefined with the zero row: only the (0, 2) pair counts
    assert gradient_direction_similarity(G) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(gradient_direction_matrix(G)[0, 1].item())
    # magnitude: zero vs non-zero scores 0; pairs 0, 2*sqrt2/3, 0
    assert gradient_magnitude_similarity(G) == pytest.approx((2 * math.sqrt(2) / 3) / 3)
    assert math.isnan(gradient_direction_similarity(torch.zeros(2, 3)))
    assert math.isnan(gradient_magnitude_similarity(torch.zeros(2, 3)))


def test_similarity_bad_input():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        gradient_direction_similarity(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[T, P\]"):
        gradient_magnitude_similarity(torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        gradient_direction_similarity(torch.tensor([[1.0, float("nan")], [1.0, 0.0]]))


# -- feature disentanglement ----------------------------------------------------------------------

def test_fd_zero_when_each_position_serves_one_task():
    torch.manual_seed(0)
    Z = torch.randn(5, 12, requires_grad=True)
    w = torch.randn(5, 12)
    # task i reads only columns 4i..4i+3 (with non-zero weights), so every position has one task
    losses = {f"t{i}": (w[:, 4 * i:4 * i + 4] * Z[:, 4 * i:4 * i + 4]).sum() * (i + 1) for i in range(3)}
    assert feature_disentanglement(losses, Z) == 0.0


def test_fd_log_t_when_all_tasks_equally_salient():
    torch.manual_seed(0)
    Z = torch.randn(4, 6, requires_grad=True)
    signs = [1.0, -1.0, 1.0, -1.0]  # |dL_i/dZ_j| = 1 for every task and position
    losses = {f"t{i}": (s * Z).sum() for i, s in enumerate(signs)}
    assert feature_disentanglement(losses, Z) == pytest.approx(math.log(4), rel=1e-6)


def test_fd_hand_computed_and_empty_positions_excluded():
    # one position with saliencies 1 and 3: p = (1/4, 3/4); one with a single task; one with none
    S = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert feature_disentanglement_from_saliency(S) == pytest.approx(h / 2)
    assert math.isnan(feature_disentanglement_from_saliency(torch.zeros(3, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        feature_disentanglement_from_saliency(-S)


def test_fd_over_several_feature_tensors_and_batch():
    Z1 = torch.ones(2, 3, requires_grad=True)
    Z2 = torch.ones(2, 3, requires_grad=True)
    # Z1 serves both tasks with saliency 1 each (entropy log 2); Z2 only task b (entropy 0)
    losses = {"a": Z1.sum(), "b": (Z1 - 2 * Z2).sum()}
    assert feature_disentanglement(losses, [Z1, Z2]) == pytest.approx(math.log(2) / 2)


# -- ranking similarity ---------------------------------------------------------------------------

def test_ranking_self_reverse_and_hand_case():
    r = [3.0, 1.0, 4.0, 1.5, 9.0]
    assert ranking_similarity(r, r) == 1.0
    assert ranking_similarity(r, [-x for x in r]) == 0.0
    assert ranking_similarity([1, 2, 3, 4], [4, 3, 2, 1]) == 0.0
    # one swapped pair out of six: 5/6
    assert ranking_similarity([1, 2, 3, 4], [2, 1, 3, 4]) == pytest.approx(5 / 6)
    # two swapped pairs, (0,1) and (2,3): 4/6
    assert ranking_similarity([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(4 / 6)
    assert ranking_similarity_gap([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(1 / 6)
    assert ranking_similarity_gap(r, [-x for x in r]) == 0.5


def test_ranking_ties():
    # tie in a vs strict order in b disagrees; tie vs tie agrees
    assert ranking_similarity([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / 6)
    assert ranking_similarity([1, 1, 2, 3], [5, 5, 6, 7]) == 1.0


def test_ranking_matches_kendall_tau_without_ties():
    rng = np.random.default_rng(0)
    for n in (2, 5, 12):
        a, b = rng.normal(size=n), rng.normal(size=n)
        tau = kendalltau(a, b).statistic
        assert ranking_similarity(a, torch.tensor(b)) == pytest.approx((1 + tau) / 2)


def test_ranking_bad_input():
    with pytest.raises(ValueError, match="4 items but b has 3"):
        ranking_similarity([1, 2, 3, 4], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2 items"):
        ranking_similarity([1], [1])
    with pytest.raises(ValueError, match="NaN"):
        ranking_similarity([1, float("nan")], [1, 2])


def test_fd_from_saliency_leaves_input_alone_and_rejects_nan():
    S = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    before = S.clone()
    feature_disentanglement_from_saliency(S)
    assert torch.equal(S, before)
    with pytest.raises(ValueError, match="NaN or inf"):
        feature_disentanglement_from_saliency(torch.tensor([[1.0, float("nan")], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        feature_disentanglement_from_saliency(torch.tensor([[1.0, float("inf")], [1.0, 1.0]]))
