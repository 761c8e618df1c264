"""The benchmarks whose labels hide the groups: every pair of tasks is (nearly) uncorrelated on the
training split, yet the known grouping trained as given beats naive MTL and single-task learning.

The label bound is what makes ``label_clusters`` (and any label statistic) blind there; the training
check, at seed 0 of each preset, is what makes the known grouping worth finding.
"""

import numpy as np
import pytest
import torch

from conftest import run_preset
from taskgrouping.data.builtin import multimnist_independent, planted


def _max_offdiag_corr(split, names) -> float:
    y = torch.stack([split.targets[n].reshape(len(split), -1)[:, 0].double() for n in names])
    return float((torch.corrcoef(y) - torch.eye(len(names), dtype=y.dtype)).abs().max())


def test_planted_independent_labels_are_uncorrelated_on_train_but_share_a_subspace():
    d = planted(n_tasks=6, group_sizes=[3, 3], input_dim=16, feature_dim=2, noise=0.0, independent_labels=True,
                within_group_similarity=0.0, n_train=3000, n_val=10, n_test=3000)
    assert _max_offdiag_corr(d.train, d.task_names) < 1e-5  # whitened on the training split
    assert _max_offdiag_corr(d.test, d.task_names) < 0.1  # and uncorrelated in expectation
    # Without noise each task is a quadratic form of its group's 2-d projection: the second moment
    # E[y x x^T] is a nonzero matrix whose column space lies inside that group's subspace (Stein's lemma), and
    # the two groups' subspaces are orthogonal. This is what group-mates share and labels do not show.
    x = d.test.x.double()

    def directions(name: str) -> torch.Tensor:
        y = d.test.targets[name].squeeze(1).double()
        evals, evecs = torch.linalg.eigh((x * y[:, None]).T @ x / len(y))
        keep = evals.abs() > 0.3 * evals.abs().max()
        return evecs[:, keep]

    spans = []
    for group in d.groups:
        span, _, _ = torch.linalg.svd(torch.cat([directions(n) for n in group], dim=1), full_matrices=False)
        spans.append(span[:, :2])
    for g, group in enumerate(d.groups):
        for name in group:
            u = directions(name)
            assert torch.linalg.norm(spans[g].T @ u, dim=0).min() > 0.9, name
            assert torch.linalg.norm(spans[1 - g].T @ u, dim=0).max() < 0.2, name


def test_planted_independent_bad_group_size_is_a_clear_error():
    with pytest.raises(ValueError, match="data.independent_labels needs group sizes <= 3"):
        planted(n_tasks=4, group_sizes=[4], feature_dim=2, independent_labels=True, within_group_similarity=0.0)


@pytest.mark.parametrize("all_parities, props", [(False, ("bit0", "bit1", "bit2", "parity")),
                                                 (True, ("x1", "x2", "x3", "x12", "x13", "x23", "x123"))])
def test_multimnist_independent_labels_are_exactly_uncorrelated_in_every_split(all_parities, props):
    d = multimnist_independent(n_train=640, n_val=64, n_test=130, all_parities=all_parities, seed=2)
    assert len(d.test) == 128  # rounded down to whole copies of the 64 class pairs
    for split in (d.train, d.val, d.test):
        assert _max_offdiag_corr(split, d.task_names) < 1e-9
        for n in d.task_names:
            assert split.targets[n].float().mean().item() == 0.5
    assert d.groups == [[f"{s}_{p}" for p in props] for s in ("left", "right")]


def test_multimnist_independent_labels_match_the_source_digits():
    from taskgrouping.data.builtin import load_mnist_5k

    _, labels = load_mnist_5k()
    d = multimnist_independent(n_train=128, n_val=64, n_test=64, seed=0)
    src = {s: getattr(d, s).source_indices for s in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(src[a].flatten().tolist()) & set(src[b].flatten().tolist())
    for side, col in (("left", 0), ("right", 1)):
        digit = labels[src["train"][:, col].numpy()]
        assert digit.max() <= 7
        for b in range(3):
            assert np.array_equal(d.train.targets[f"{side}_bit{b}"].numpy(), (digit >> b) & 1)
        parity = np.array([bin(v).count("1") % 2 for v in digit])
        assert np.array_equal(d.train.targets[f"{side}_parity"].numpy(), parity)
    d = multimnist_independent(n_train=128, n_val=64, n_test=64, all_parities=True, seed=0)
    digit = labels[d.train.source_indices[:, 0].numpy()]
    assert np.array_equal(d.train.targets["left_x13"].numpy(), (digit & 1) ^ ((digit >> 2) & 1))


def test_multimnist_independent_too_small_split_is_a_clear_error():
    with pytest.raises(ValueError, match="must be >= 64"):
        multimnist_independent(n_train=640, n_val=32, n_test=128)


@pytest.mark.parametrize("preset, margin", [("planted_independent", 0.03), ("multimnist_independent", 0.0),
                                            ("multimnist_dense", 0.0)])
def test_known_grouping_beats_naive_and_single_task_and_the_label_heuristic(preset, margin):
    from taskgrouping.config import build_config

    _, runs = run_preset(preset, ("naive_mtl", "single_task", "oracle", "label_clusters"))
    t = {name: sum(m["loss"] for m in res.per_task.values()) for name, res in runs.items()}
    assert t["oracle"] < (1 - margin) * t["naive_mtl"], t
    assert t["oracle"] < (1 - margin) * t["single_task"], t
    assert t["oracle"] < t["label_clusters"], t  # the labels do not reveal the known grouping
    train = build_config(preset=preset)["train"]
    if train.get("early_stopping"):  # trained to convergence: "÷ oracle" compares models, not training speed
        for name, res in runs.items():
            assert res.extra["epochs_run"] < train["epochs"], (name, res.extra)
