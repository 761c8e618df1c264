"""MTG-Net active sampling and the whole pipeline in oracle mode, pinned to the measured gains the
MTG-Net authors committed (grouping-data/mtg_net/collected_gain)."""

from __future__ import annotations

import numpy as np
import pytest

from mtgnet_cases import FAST, ROOT, as_sets, brute_force_best, load_table
from taskgrouping.methods.mtg_net import (MTGNetConfig, active_sampling, grouping_gain, load_mtgnet_gains,
                                          mtgnet_search, search_from_sampling, search_groups)
from taskgrouping.methods.mtg_net.sampling import _challenger_pick


def test_active_sampling_invariants():
    ett = load_table("ett")
    cfg = MTGNetConfig(rounds=12, picks_per_round=4, seed=3, **FAST)
    res = active_sampling(ett.tasks, ett, ett.masks, cfg)
    n = ett.n_tasks
    assert res.n_sampled == n + 1 + 12
    assert np.array_equal(res.sampled_masks[:n], np.eye(n, dtype=bool)) and res.sampled_masks[n].all()
    codes = {tuple(m) for m in res.sampled_masks}
    assert len(codes) == res.n_sampled  # no combination trained twice
    for i, (task, combo) in enumerate(res.picks):
        assert task == ett.tasks[i % n] and task in combo  # the driving task cycles and is in its pick
    for m, g in zip(res.sampled_masks, res.sampled_gains):
        assert np.array_equal(g, ett.gains_of_masks(m[None])[0])
    again = active_sampling(ett.tasks, ett, ett.masks, cfg)
    assert np.array_equal(again.sampled_masks, res.sampled_masks)


@pytest.mark.parametrize("name", ["taskonomy", "ett"])
def test_pipeline_with_every_combination_sampled_finds_measured_best(name):
    """Once sampling has trained every candidate, the hybrid gains are the measured ones."""
    table = load_table(name)
    cfg = MTGNetConfig(rounds=len(table), picks_per_round=64, **FAST)
    res = active_sampling(table.tasks, table, table.masks, cfg)
    assert res.n_sampled == len(table)
    for k in (2, 3):
        best, groups = brute_force_best(table, k)
        g = search_from_sampling(res, k, table.masks)
        assert as_sets(g.groups) == groups and grouping_gain(table, g) == pytest.approx(best, abs=1e-9)


def test_mimic_mtgnet_beats_hoa_at_equal_samples():
    """MIMIC-III-27 oracle: select on validation gains, score the chosen groups on measured test gains.

    HOA needs the 27 singles + 351 pairs = 378 trainings; MTG-Net gets the same 378 (27 singles, the
    all-task set, 350 acquisitions). Reduced setting (few retrainings, small learner) to stay fast;
    benchmarks/bench_mtgnet.py runs the paper's one-pick-per-retraining schedule.
    """
    valid = load_mtgnet_gains(ROOT, "mimic27", "valid")
    test = load_mtgnet_gains(ROOT, "mimic27", "test")
    hoa = load_mtgnet_gains(ROOT, "mimic27", "hoa")
    n_hoa = int((hoa.masks.sum(axis=1) <= 2).sum())
    assert n_hoa == 378
    cfg = MTGNetConfig(rounds=n_hoa - 28, picks_per_round=50, seed=0, **FAST)
    active = active_sampling(valid.tasks, valid, valid.masks, cfg)
    rand = active_sampling(valid.tasks, valid, valid.masks, MTGNetConfig(**{**cfg.__dict__, "acquisition": "random"}))
    assert active.n_sampled == rand.n_sampled == n_hoa
    for k in (2, 3):
        g_mtg = search_from_sampling(active, k, valid.masks, overlap=True)
        g_rand = search_from_sampling(rand, k, valid.masks, overlap=True)
        g_hoa = search_groups(hoa.tasks, hoa.masks, hoa.gains, k, overlap=True)
        mtg, hoa_gain, rnd = (grouping_gain(test, g) for g in (g_mtg, g_hoa, g_rand))
        assert mtg > hoa_gain + 0.1, (k, mtg, hoa_gain)
        assert mtg > rnd, (k, mtg, rnd)


def test_callable_evaluator_beyond_enumeration_planted_blocks():
    """N = 18 > 16: random candidate pool for sampling, beam search over arbitrary combinations.

    Planted gains (HOA-like): a task's gain = mean over its partners of +0.2 (same block of 9) or
    -0.3 (other block), so the best 2-group partition is the two blocks (total 18 x 0.2 = 3.6).
    """
    tasks = [f"t{i}" for i in range(18)]
    block = {t: i // 9 for i, t in enumerate(tasks)}

    def evaluate(combo):
        if len(combo) == 1:
            return {combo[0]: 0.0}
        return {t: float(np.mean([0.2 if block[s] == block[t] else -0.3 for s in combo if s != t])) for t in combo}

    cfg = MTGNetConfig(picks_per_round=50, pool_size=300, dim=16, layers=1, epochs=40, warm_start=True, ensemble=1,
                       weight_decay=5e-4)
    g = mtgnet_search(tasks, evaluate, 2, config=cfg)
    assert as_sets(g.groups) == {frozenset(tasks[:9]), frozenset(tasks[9:])}
    assert g.info["n_sampled"] == 18 + 1 + 18 * 17 // 2


def test_pipeline_argument_errors():
    taskonomy = load_table("taskonomy")
    with pytest.raises(ValueError, match="do not match"):
        mtgnet_search(["a", "b", "c", "d", "e"], taskonomy, 2)
    with pytest.raises(ValueError, match="tasks are required"):
        mtgnet_search(None, lambda c: {}, 2)
    with pytest.raises(ValueError, match="picks_per_round"):
        MTGNetConfig(picks_per_round=0)
    with pytest.raises(ValueError, match="'auto', 'active', 'search' or 'random'.*'greedy'"):
        MTGNetConfig(acquisition="greedy")
    with pytest.raises(ValueError, match="guide_k"):
        MTGNetConfig(guide_k=0)
    with pytest.raises(ValueError, match="dropout"):
        MTGNetConfig(dropout=1.0)
    with pytest.raises(ValueError, match="returned no gain"):
        mtgnet_search(["a", "b"], lambda c: {}, 1, config=MTGNetConfig(rounds=0, epochs=1))


# ------------------------------------------------------------------ acceptance: measured-best partition


def test_challenger_pick_trains_best_then_runner_up_partition_when_predictions_are_exact():
    """With a perfect meta-learner (optimistic totals = measured totals), the challenger acquisition
    first trains the untrained groups of the brute-force best partition, then - that partition now
    verified - a group of the runner-up partition (the strongest alternative), not a random one."""
    taskonomy = load_table("taskonomy")
    n = taskonomy.n_tasks
    for k in (2, 3):
        _, best = brute_force_best(taskonomy, k)
        runner_up = {frozenset(g) for g in (("d", "n", "k"), ("s", "e"))}  # 0.451, vs 0.484 for the best
        sampled = [m for m in taskonomy.masks if m.sum() in (1, n)]
        pool = np.array([m for m in taskonomy.masks if m.sum() not in (1, n)])
        totals = taskonomy.gains_of_masks(pool).sum(axis=1)
        available = np.ones(len(pool), dtype=bool)
        picked = []
        for _ in range(3):
            j = _challenger_pick(n, sampled, [taskonomy.gains_of_masks(m[None])[0] for m in sampled], pool,
                                 available, totals, k)
            available[j] = False
            sampled.append(pool[j])
            picked.append(frozenset(t for t, m in zip(taskonomy.tasks, pool[j]) if m))
        assert set(picked[:2]) == {g for g in best if len(g) > 1}
        assert picked[2] in runner_up


@pytest.mark.parametrize("name", ["taskonomy", "ett"])
def test_default_pipeline_finds_measured_best_partition_in_most_seeds(name):
    """Oracle mode with default settings and the paper's budget (singles + all-task set + N(N-1)/2
    acquisitions: 16 of 31 Taskonomy combinations, 29 of 127 ETTm1 ones), K = 2 and 3, seeds 0-4:
    the chosen partition is the brute-force measured best in at least 4 of 5 seeds per K (a
    regression guard on the rate, not a guarantee: over seeds 0-39 it is about 95 % on Taskonomy
    and 100 % on ETTm1, see benchmarks/results/mtgnet.md). The K = 3 optimum is the K = 2 one on
    both tables."""
    table = load_table(name)
    _, best = brute_force_best(table, 2)
    assert brute_force_best(table, 3)[1] == best
    for k in (2, 3):
        hits = [as_sets(mtgnet_search(None, table, k, config=MTGNetConfig(seed=s)).groups) == best for s in range(5)]
        assert sum(hits) >= 4, (k, hits)
