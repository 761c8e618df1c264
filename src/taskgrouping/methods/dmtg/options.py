"""DMTG's options: one frozen dataclass, with the four recipes resolved in one place.

A recipe fills every option the user left unset (``None``): ``paper`` is the paper's text, ``paper_code``
the authors' released configs, ``attribution`` (default: S learned from training signals only) and
``robust`` (a label-correlation start) ours; their evidence is in ``benchmarks/results/dmtg*.md``.
Values are checked on creation, so a bad ``dmtg.*`` key fails at config validation, before anything
trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from taskgrouping.data.base import TaskData
from taskgrouping.methods.baselines import INITS as RETRAIN_INITS  # how retrain variants start
from taskgrouping.methods.dmtg.prior import label_prior_fits
from taskgrouping.methods.options import MethodOptions, expect, expect_choice, expect_int, expect_number

__all__ = ["DMTGOptions", "GRAD_SCALINGS", "INITS", "RECIPES", "RETRAIN_INITS", "WARMUP_MODES"]

RECIPES: dict[str, dict[str, Any]] = {
    # The paper's text: branches start from naive-MTL weights copied K times, S uniform, tau constant,
    # one optimiser for weights and S, intended gradient scaling 1/sqrt(K) into branches, 1/sqrt(N) into heads.
    "paper": dict(warm_start=True, init="uniform", tau=2.5, tau_schedule="constant", s_lr=None,
                  grad_scaling="intended", hard=False, samples=1, entropy_weight=0.0, head_pruning=False,
                  s_warmup_epochs=0, s_warmup_fraction=0.0, warmup="gumbel", attribution_weight=0.0,
                  select_converged=False, rewind=False, shrink=1.0, add_hold_epochs=False,
                  converge_extension=0.0),
    # The released configs: no warm start, 1/sqrt(K) applied to branches and heads (their code's bug).
    "paper_code": dict(warm_start=False, init="uniform", tau=2.5, tau_schedule="constant", s_lr=None,
                       grad_scaling="authors_code", hard=False, samples=1, entropy_weight=0.0, head_pruning=False,
                       s_warmup_epochs=0, s_warmup_fraction=0.0, warmup="gumbel", attribution_weight=0.0,
                       select_converged=False, rewind=False, shrink=1.0, add_hold_epochs=False,
                       converge_extension=0.0),
    # Ours: a label prior held fixed while the branches specialise, then S learned faster, with several
    # Gumbel draws per step, and collapsed heads pruned.
    "robust": dict(warm_start=False, init="auto", tau=1.0, tau_schedule="constant", s_lr=0.05,
                   grad_scaling="intended", hard=False, samples=4, entropy_weight=0.0, head_pruning=True,
                   s_warmup_epochs=3, s_warmup_fraction=0.0, warmup="probe", attribution_weight=0.0,
                   select_converged=False, rewind=False, shrink=1.0, add_hold_epochs=False,
                   converge_extension=0.0),
    # Ours, learned from training signals only: a small random start (no label statistics); for the first
    # 40 % of the run every task trains every branch alike (so nothing depends on the start) while the
    # tasks' input-attribution affinity is measured; then S is pulled towards the branches whose tasks read
    # the same inputs (methods/dmtg/attribution.py), besides its own-loss gradient; the result is chosen
    # after S has converged, training on from the best epoch's weights with S's assignment: shrunk and perturbed
    # where the run stops early, for as many more epochs as S was held where it does not; a run that would
    # end before S has converged goes on until it has (at most train.epochs more epochs).
    # Recovery rates per benchmark: benchmarks/results/dmtg_learning_attribution.md.
    "attribution": dict(warm_start=False, init="noisy", tau=1.0, tau_schedule="constant", s_lr=0.05,
                        grad_scaling="intended", hard=False, samples=4, entropy_weight=0.0, head_pruning=True,
                        s_warmup_epochs=3, s_warmup_fraction=0.4, warmup="uniform", attribution_weight=20.0,
                        select_converged=True, rewind=True, shrink=0.6, add_hold_epochs=True,
                        converge_extension=1.0),
}
#: how S is initialised (``auto``: ``labels`` where the label prior is defined, else ``noisy``)
INITS = ("auto", "uniform", "noisy", "prior", "affinity", "labels")
#: how the weights train while S is held fixed (see :mod:`taskgrouping.methods.dmtg.objective`)
WARMUP_MODES = ("probe", "softmax", "gumbel", "uniform")
#: how gradients into branches and heads are scaled (see :mod:`taskgrouping.methods.dmtg.model`)
GRAD_SCALINGS = ("none", "intended", "authors_code")


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    expect(value in choices, key, "one of " + " | ".join(choices), value)


def _flag(key: str, value: Any) -> None:
    expect(isinstance(value, bool), key, "true or false", value)


@dataclass(frozen=True)
class DMTGOptions(MethodOptions):
    """Every ``dmtg.*`` option; ``None`` takes the recipe's value (or, off the recipe, the default).

    Recipe options: ``warm_start`` (branches from naive-MTL weights), ``init`` (S's start, see
    :data:`INITS`), ``tau`` / ``tau_schedule`` (Gumbel temperature, constant or exponential from
    ``tau_start`` by ``tau_decay`` per epoch down to ``tau_end``), ``s_lr`` (S's learning rate; ``None``:
    the weights'), ``grad_scaling``, ``hard`` (straight-through draws), ``samples`` (Gumbel draws per step),
    ``entropy_weight``, ``head_pruning``, ``s_warmup_epochs`` (epochs S is held fixed; or
    ``s_warmup_fraction`` of the run's epochs), ``warmup`` (how the weights train meanwhile),
    ``attribution_weight``, ``select_converged`` (the result is chosen only after S has converged, so early
    stopping cannot end S's learning), ``rewind`` (continue from the best epoch's weights when S starts
    learning, or, with ``select_converged``, once it has converged, keeping S's learned assignment),
    ``shrink`` (at that rewind, in a run with early stopping, every weight but S is multiplied by ``shrink``
    and Gaussian noise of std ``perturb`` added; 1 = off) and ``add_hold_epochs`` (in a run without early
    stopping, DMTG trains ``train.epochs`` plus the held epochs: the hold finds the grouping, and does not
    come out of the grouped model's training) and ``converge_extension`` (with ``select_converged``: where
    S has not converged when the run would end, it goes on one epoch at a time until S has, for at most
    ``converge_extension × train.epochs`` epochs; S's learning is counted in steps, and a small table has
    few per epoch).
    Values are resolved on creation: ``dataclasses.replace(opts, recipe=...)`` keeps the old recipe's.
    """

    recipe: str = "attribution"
    warm_start: bool | None = None
    init: str | None = None
    prior: Any = None  # N x K initial logits for init=prior
    prior_strength: float = 3.0  # S_ik of a task's cluster in the label / affinity prior
    init_noise: float = 0.1  # std of S for init=noisy
    tau: float | None = None
    tau_schedule: str | None = None
    tau_start: float = 10.0
    tau_end: float = 0.01
    tau_decay: float = 0.9
    s_lr: float | None = None
    grad_scaling: str | None = None
    hard: bool | None = None
    samples: int | None = None
    entropy_weight: float | None = None
    head_pruning: bool | None = None
    prune_threshold: float = 0.02  # a head is low while its assignment probability is below this
    prune_patience: int = 2  # epochs all of a task's other heads must stay low before they are pruned
    warm_epochs: int | None = None  # warm start from a naive-MTL run this short (None: the run's converged one)
    s_warmup_epochs: int | None = None
    s_warmup_fraction: float | None = None  # > 0: S is held for round(fraction x train.epochs) epochs instead
    rewind: bool | None = None  # continue from the best epoch's weights when S starts learning (or has converged)
    select_converged: bool | None = None  # the result is chosen among epochs after S has converged
    shrink: float | None = None  # at the rewind after S converged, with early stopping: weights x shrink + noise
    perturb: float = 0.01  # std of that noise
    add_hold_epochs: bool | None = None  # without early stopping: train.epochs + the held epochs in all
    converge_extension: float | None = None  # S unconverged at the end: up to this x train.epochs more epochs
    warmup: str | None = None
    affinity_batches: int = 20  # training batches of the gradient-affinity prior (init=affinity)
    finetune_epochs: int = 0  # epochs to fine-tune the pruned model (0: one-shot)
    retrain: Any = ()  # also train the found grouping from these starts (RETRAIN_INITS)
    mates_weight: float = 0.0  # opt-in pull of S towards branches whose tasks' gradients agree
    mates_every: int = 10  # steps between measurements of the branch-mates' gradient cosines
    mates_decay: float = 0.9  # running-mean decay of those cosines
    attribution_weight: float | None = None  # pull of S towards branches whose tasks read the same inputs
    attribution_every: int = 10  # steps between measurements of the input-attribution affinity
    attribution_samples: int = 32  # rows of a batch it is measured on
    attribution_decay: float = 0.9  # running-mean decay of the affinity

    def __post_init__(self) -> None:
        expect_choice("recipe", self.recipe, sorted(RECIPES))
        recipe = RECIPES[self.recipe]
        if self.s_warmup_epochs is not None and self.s_warmup_fraction is None:  # the user's count wins
            object.__setattr__(self, "s_warmup_fraction", 0.0)
        for f in dataclasses.fields(self):  # an explicit null means "the recipe's value, else the default"
            if getattr(self, f.name) is None:
                object.__setattr__(self, f.name, recipe.get(f.name, f.default))
        for key in ("warm_start", "hard", "head_pruning", "rewind", "select_converged", "add_hold_epochs"):
            _flag(key, getattr(self, key))
        _one_of("init", self.init, INITS)
        _one_of("tau_schedule", self.tau_schedule, ("constant", "exponential"))
        _one_of("grad_scaling", self.grad_scaling, GRAD_SCALINGS)
        _one_of("warmup", self.warmup, WARMUP_MODES)
        for key in ("tau", "tau_start", "tau_end"):
            expect_number(key, getattr(self, key), low=0, low_open=True)
        expect_number("tau_decay", self.tau_decay, low=0, high=1, low_open=True)
        expect_number("s_lr", self.s_lr, low=0, low_open=True, allow_none=True)
        for key in ("prior_strength", "init_noise", "entropy_weight"):
            expect_number(key, getattr(self, key))
        expect_number("shrink", self.shrink, low=0, high=1, low_open=True)
        expect_number("perturb", self.perturb, low=0)
        expect_number("converge_extension", self.converge_extension, low=0)
        expect_number("prune_threshold", self.prune_threshold, low=0)
        expect(self.prune_threshold < 1, "prune_threshold", "< 1", self.prune_threshold)
        expect_int("samples", self.samples, low=1)
        expect_int("prune_patience", self.prune_patience, low=0)
        expect_int("warm_epochs", self.warm_epochs, low=1, allow_none=True)
        expect_int("s_warmup_epochs", self.s_warmup_epochs, low=0)
        expect_number("s_warmup_fraction", self.s_warmup_fraction, low=0)
        expect(self.s_warmup_fraction < 1, "s_warmup_fraction", "< 1", self.s_warmup_fraction)
        expect_int("affinity_batches", self.affinity_batches, low=1)
        expect_int("finetune_epochs", self.finetune_epochs, low=0)
        expect(isinstance(self.retrain, (list, tuple)) and all(r in RETRAIN_INITS for r in self.retrain), "retrain",
               "a list of " + " | ".join(RETRAIN_INITS), self.retrain)
        object.__setattr__(self, "retrain", tuple(self.retrain))
        expect_number("mates_weight", self.mates_weight, low=0)
        expect_int("mates_every", self.mates_every, low=1)
        expect_number("mates_decay", self.mates_decay, low=0)
        expect(self.mates_decay < 1, "mates_decay", "< 1", self.mates_decay)
        expect_number("attribution_weight", self.attribution_weight, low=0)
        expect_int("attribution_every", self.attribution_every, low=1)
        expect_int("attribution_samples", self.attribution_samples, low=1)
        expect_number("attribution_decay", self.attribution_decay, low=0)
        expect(self.attribution_decay < 1, "attribution_decay", "< 1", self.attribution_decay)
        expect(self.prior is not None or self.init != "prior", "prior",
               "an N x K matrix of initial logits (tasks x groups) with init=prior", self.prior)
        expect(self.prior is None or (isinstance(self.prior, (list, tuple))
                                      and all(isinstance(r, (list, tuple)) for r in self.prior)),
               "prior", "null or a list of rows of logits", self.prior)
        expect(self.warm_start or self.init != "affinity", "warm_start",
               "true with init=affinity (the affinity is measured on the warm-start model)", self.warm_start)

    def check_data(self, data: TaskData) -> None:
        """The label prior (``init=labels``) needs tasks whose labels correlate."""
        if self.init == "labels" and not label_prior_fits(data.tasks):
            raise ValueError(f"dmtg.init=labels needs binary / regression tasks or only dense_regression ones; "
                             f"{[t.name for t in data.tasks]} do not fit (use dmtg.init=affinity)")
