"""Hyper-parameters of MTG-Net's meta-learner and active sampling loop (:class:`MTGNetConfig`), with
the defaults tuned in oracle mode on the authors' measured gains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["MTGNetConfig"]


@dataclass(frozen=True)
class MTGNetConfig:
    """Hyper-parameters of the meta-learner and the active sampling loop.

    ``lr`` and ``temperature`` are the paper's; the others were chosen on the oracle-mode success
    rate on Taskonomy-5 / ETTm1-7 (``benchmarks/bench_mtgnet.py``): with N(N-1)/2 acquisitions the
    meta-learner sees few combinations, so a small, regularised, warm-started 16-member ensemble, the
    challenger acquisition and the leave-one-out initial design (the settings tried and how they
    fared: ``benchmarks/results/mtgnet_defaults.md``).

    Attributes:
        rounds: combinations acquired by active sampling after the initial singles + all-task set;
            ``None`` = ``N(N-1)/2`` (the paper's budget).
        picks_per_round: acquisitions per retraining (1 = the paper). Larger values retrain less
            often (faster); the task whose gain drives a pick still cycles per acquisition.
        acquisition: ``"auto"`` (default: ``"search"`` for ``N <= SEARCH_GUIDED_MAX_TASKS``, where
            the partition search per pick is exact and cheap, else ``"active"``), ``"active"`` (the
            paper's rule), ``"search"`` (the challenger acquisition, see :func:`active_sampling`;
            our addition, not the paper's) or ``"random"`` (uniform among the untrained
            candidates; the paper's ablation baseline, seeded by ``seed``).
        guide_k: the most groups the ``"search"`` acquisition plans for (``None`` = N;
            :func:`mtgnet_search` sets it to its ``k``).
        ucb_beta: optimism of the ``"search"`` acquisition: ensemble mean + ``ucb_beta`` x ensemble
            standard deviation (needs ``ensemble > 1`` to matter).
        initial: ``"paper"`` (singles + the all-task set), ``"leave_one_out"`` (then the N groups of
            N - 1 tasks that are among the candidates, as the first acquisitions, counted in the
            budget) or ``"auto"`` (default: leave-one-out when N >= 3 and those N trainings take at
            most a third of the budget, i.e. N >= 7 with the paper's budget). The all-task set
            tells how every task fares with all the others; the leave-one-out groups tell what
            each task does to the rest, which no other N trainings show as directly (a one-factor-
            at-a-time design). On ETTm1-7 the best partition is one task alone and the other six
            together, a group the meta-learner, trained on mostly-negative pair gains, does not
            rank high enough to try.
        dropout: dropout after attention and FFN (the authors' code uses 0.5).
        warm_start: continue from the previous retraining's weights instead of starting afresh (the
            paper retrains from scratch), which allows fewer epochs per retraining.
        ensemble: number of independently initialised meta-learners whose predictions are averaged.
        threads: torch CPU threads used while the searcher runs (restored afterwards).
        pool_size: size of the random candidate pool drawn when N > 16 and no pool is given.
    """

    dim: int = 8
    layers: int = 1
    ffn_dim: int | None = None
    temperature: float = 0.2
    dropout: float = 0.0
    lr: float = 7e-3
    weight_decay: float = 5e-3
    epochs: int = 20
    rounds: int | None = None
    picks_per_round: int = 1
    acquisition: Literal["auto", "active", "search", "random"] = "auto"
    guide_k: int | None = None
    ucb_beta: float = 0.5
    initial: Literal["auto", "paper", "leave_one_out"] = "auto"
    warm_start: bool = True
    ensemble: int = 16
    seed: int = 0
    threads: int | None = 1
    pool_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("dim", "layers", "epochs", "picks_per_round", "ensemble", "pool_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MTGNetConfig.{name} must be a positive integer, got {value!r}")
        if self.rounds is not None and (not isinstance(self.rounds, int) or self.rounds < 0):
            raise ValueError(f"MTGNetConfig.rounds must be None or a non-negative integer, got {self.rounds!r}")
        if self.initial not in ("auto", "paper", "leave_one_out"):
            raise ValueError(f"MTGNetConfig.initial must be 'auto', 'paper' or 'leave_one_out', got {self.initial!r}")
        if self.acquisition not in ("auto", "active", "search", "random"):
            raise ValueError(f"MTGNetConfig.acquisition must be 'auto', 'active', 'search' or 'random', "
                             f"got {self.acquisition!r}")
        if self.guide_k is not None and (not isinstance(self.guide_k, int) or self.guide_k < 1):
            raise ValueError(f"MTGNetConfig.guide_k must be None or a positive integer, got {self.guide_k!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MTGNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.lr <= 0 or self.temperature <= 0 or self.weight_decay < 0:
            raise ValueError("MTGNetConfig needs lr > 0, temperature > 0 and weight_decay >= 0")
