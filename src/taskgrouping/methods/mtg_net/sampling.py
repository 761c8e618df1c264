"""MTG-Net's active sampling (Song et al., NeurIPS 2022, Sec. 4.2): which task combinations to train
to meta-train the gain predictor. Start from all singles and the all-task set; each round retrain
the meta-learner and train the untrained combination an acquisition rule picks: the paper's per-task
rule (largest ``|predicted gain|`` of the driving task), random (the paper's ablation), or our
*challenger* rule, which trains the group of the partition that could still beat the best verified
one; optionally the leave-one-out groups first."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from taskgrouping.methods.mtg_net.config import MTGNetConfig
from taskgrouping.methods.mtg_net.masks import mask_code
from taskgrouping.methods.mtg_net.meta_learner import MetaLearner
from taskgrouping.methods.mtg_net.meta_training import fit_meta_learner, predict_gains, torch_threads
from taskgrouping.methods.mtg_net.search import partition_solver

__all__ = ["ActiveSamplingResult", "Evaluate", "SEARCH_GUIDED_MAX_TASKS", "acquisition_rule", "active_sampling"]

#: Trains a combination (tuple of task names) and returns ``{task: gain}``.
Evaluate = Callable[[tuple[str, ...]], Mapping[str, float]]


@dataclass
class ActiveSamplingResult:
    """What the active loop trained and learned.

    ``sampled_masks``/``sampled_gains`` are the trained combinations in the order they were trained
    (the initial singles + all-task set first); ``model`` is the meta-learner ensemble retrained on
    all of them; ``picks`` lists (driving task, combination) per acquisition; the driving task is
    ``""`` for random picks, the task left out for leave-one-out picks and, for challenger picks, the
    first task of the combination.
    """

    tasks: list[str]
    sampled_masks: np.ndarray
    sampled_gains: np.ndarray
    model: MetaLearner
    picks: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    @property
    def n_sampled(self) -> int:
        return len(self.sampled_masks)

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Ensemble-mean predicted gains ``[B, N]`` (singletons 0)."""
        return predict_gains(self.model, masks)


def _query(evaluate: Evaluate, tasks: Sequence[str], mask: np.ndarray) -> np.ndarray:
    combo = tuple(t for t, m in zip(tasks, mask) if m)
    answer = evaluate(combo)
    missing = [t for t in combo if t not in answer]
    if missing:
        raise ValueError(f"the gain evaluator returned no gain for tasks {missing} of combination {list(combo)}")
    row = np.zeros(len(tasks))
    for i, t in enumerate(tasks):
        if mask[i]:
            row[i] = float(answer[t])
    if mask.sum() == 1:
        row[:] = 0.0  # a task trained alone has no gain over itself
    return row


#: Largest N for which ``acquisition="auto"`` uses the challenger rule (an exact partition
#: search per acquisition; its cost grows like 3^N).
SEARCH_GUIDED_MAX_TASKS = 10


def acquisition_rule(config: MTGNetConfig, n_tasks: int) -> str:
    """The acquisition rule ``config`` asks for with ``n_tasks`` tasks (``"auto"`` resolved)."""
    if config.acquisition == "auto":
        return "search" if n_tasks <= SEARCH_GUIDED_MAX_TASKS else "active"
    return config.acquisition


def _initial_design(config: MTGNetConfig, n_tasks: int, budget: int) -> str:
    if config.initial == "auto":
        return "leave_one_out" if n_tasks > 2 and 3 * n_tasks <= budget else "paper"
    return config.initial


def _challenger_pick(n_tasks: int, sampled_masks: Sequence[np.ndarray], sampled_gains: Sequence[np.ndarray],
                     pool_masks: np.ndarray, available: np.ndarray, optimistic: np.ndarray, k: int) -> int:
    """Index into ``pool_masks`` of the untrained group to train next, or -1 when none fits a partition.

    The *challenger* is the best partition into ``<= k`` groups that contains at least one untrained
    group, valued by the measured total gain of trained groups and the ``optimistic`` total of
    untrained ones: the partition that could still beat the best partition of trained groups. Its
    value is ``max_g optimistic[g] + best(complement of g, k - 1)`` over untrained groups ``g``
    (``best`` over all groups, trained or not); the maximising ``g`` is returned.
    """
    idx = np.flatnonzero(available)
    codes = [mask_code(m) for m in sampled_masks] + [mask_code(pool_masks[j]) for j in idx]
    totals = [float(g.sum()) for g in sampled_gains] + [float(optimistic[j]) for j in idx]
    best = partition_solver(codes, totals, n_tasks)
    full = (1 << n_tasks) - 1
    pick, top = -1, -math.inf
    for j, code in zip(idx, codes[len(sampled_masks):]):
        value = float(optimistic[j]) + best(full & ~code, k - 1)[0]
        if value > top:
            pick, top = int(j), value
    return pick


def active_sampling(tasks: Sequence[str], evaluate: Evaluate, candidates: np.ndarray,
                    config: MTGNetConfig = MTGNetConfig()) -> ActiveSamplingResult:
    """MTG-Net's active collection of meta-training combinations (paper Sec. 4.2).

    Starts from all singles and the all-task combination, then makes ``config.rounds`` (default
    ``N(N-1)/2``) acquisitions — the first N of them the leave-one-out groups when
    ``config.initial`` asks for them (driving task: the one left out) — retraining the
    meta-learner every ``config.picks_per_round`` of them (warm-started if
    ``config.warm_start``); stops early when every candidate is trained, and
    retrains once more on everything at the end. An acquisition trains (``evaluate``) one untrained
    candidate, chosen by ``config.acquisition``:

    * ``"active"`` (the paper's per-task rule): acquisition ``a`` drives on task ``c = a mod N``
      and trains the untrained candidate containing ``c`` whose predicted gain for ``c`` is largest
      in absolute value (the next task is tried when no untrained candidate contains ``c``).
    * ``"search"`` (our addition; default for ``N <= SEARCH_GUIDED_MAX_TASKS``): train the untrained
      group of the best *unverified* partition (:func:`_challenger_pick`), valued with measured
      gains where trained and optimistic predictions elsewhere (ensemble mean + ``ucb_beta`` x
      ensemble standard deviation of the group's total gain), for partitions into at most
      ``config.guide_k`` groups. This is optimism in the face of uncertainty over partitions, as
      in combinatorial UCB (Chen et al., ICML 2013), and, like
      LUCB's challenger (Kalyanakrishnan et al., ICML 2012), it keeps testing the strongest
      alternative to the best partition already trained rather than stopping once that partition
      is verified. Falls back to the paper's rule when no untrained candidate fits a partition.
    * ``"random"``: uniform among the untrained candidates (the paper's ablation), seeded by ``seed``.

    Args:
        tasks: task names (mask columns).
        evaluate: trains a combination (tuple of task names) and returns ``{task: gain}`` — a
            :class:`GainTable` in oracle mode.
        candidates: ``bool[M, N]`` pool of combinations the loop may pick from.
    """
    tasks = list(tasks)
    n = len(tasks)
    candidates = np.asarray(candidates, dtype=bool)
    if candidates.ndim != 2 or candidates.shape[1] != n:
        raise ValueError(f"candidates must be a bool array [M, {n}], got shape {candidates.shape}")
    budget = n * (n - 1) // 2 if config.rounds is None else config.rounds
    initial = np.vstack([np.eye(n, dtype=bool), np.ones((1, n), dtype=bool)]) if n > 1 else np.ones((1, 1), bool)
    seen = {mask_code(m) for m in initial}
    sampled_masks = list(initial)
    sampled_gains = [_query(evaluate, tasks, m) for m in initial]
    untrained = []
    for i, m in enumerate(candidates):  # each distinct, not yet trained candidate once
        if mask_code(m) not in seen:
            seen.add(mask_code(m))
            untrained.append(i)
    picks: list[tuple[str, tuple[str, ...]]] = []
    model: MetaLearner | None = None
    retrain = 0
    acquisition = acquisition_rule(config, n)

    def train(mask: np.ndarray, driver: str) -> None:
        sampled_masks.append(mask)
        sampled_gains.append(_query(evaluate, tasks, mask))
        picks.append((driver, tuple(t for t, m in zip(tasks, mask) if m)))

    if _initial_design(config, n, budget) == "leave_one_out":
        where = {mask_code(candidates[i]): i for i in untrained}
        for out in range(n):  # the leave-one-out groups among the candidates, as the first acquisitions
            i = where.get(mask_code(np.arange(n) != out))
            if i is not None and len(picks) < budget:
                untrained.remove(i)
                train(candidates[i], tasks[out])
    if acquisition == "random":
        order = np.random.default_rng(config.seed).permutation(len(untrained))[:budget - len(picks)]
        for i in order:
            train(candidates[untrained[i]], "")
        untrained = []

    def retrained(previous: MetaLearner | None) -> MetaLearner:
        return fit_meta_learner(np.array(sampled_masks), np.array(sampled_gains), config,
                                model=previous if config.warm_start else None, seed=config.seed * 1009 + retrain)

    with torch_threads(config.threads):
        while len(picks) < budget and untrained:
            model = retrained(model)
            retrain += 1
            pool = np.array(untrained)
            pool_masks = candidates[pool]
            per_member = predict_gains(model, pool_masks, per_member=True)
            pred = np.abs(per_member.mean(axis=0))
            totals = per_member.sum(axis=2)  # [members, pool]
            optimistic = totals.mean(axis=0) + config.ucb_beta * totals.std(axis=0)
            available = np.ones(len(pool), dtype=bool)
            for _ in range(min(config.picks_per_round, budget - len(picks), len(pool))):
                j = -1
                if acquisition == "search":
                    j = _challenger_pick(n, sampled_masks, sampled_gains, pool_masks, available, optimistic,
                                         min(config.guide_k or n, n))
                if j >= 0:
                    c = int(np.flatnonzero(pool_masks[j])[0])
                else:
                    for offset in range(n):
                        c = (len(picks) + offset) % n
                        holders = np.flatnonzero(available & pool_masks[:, c])
                        if len(holders):
                            break
                    j = int(holders[np.argmax(pred[holders, c])])  # first maximum: earliest candidate
                available[j] = False
                train(pool_masks[j], tasks[c])
            untrained = pool[available].tolist()
        model = retrained(model)
    return ActiveSamplingResult(tasks, np.array(sampled_masks), np.array(sampled_gains), model, picks)
