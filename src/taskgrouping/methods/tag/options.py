"""Options of TAG's method ``tag`` (Fifty et al., NeurIPS 2021), checked on creation."""

from __future__ import annotations

from dataclasses import dataclass

from taskgrouping.methods.baselines import INITS
from taskgrouping.methods.options import MethodOptions, expect, expect_choice, expect_int
from taskgrouping.methods.tag.affinity import LOOKAHEADS

__all__ = ["SOLVERS", "TAGOptions"]

SOLVERS = ("auto", "exhaustive", "milp")


@dataclass(frozen=True)
class TAGOptions(MethodOptions):
    """The options of ``tag``.

    * ``every`` (default 1, as TAG on CelebA; TAG used 10 on Taskonomy): measure every k-th step;
    * ``lookahead``: ``"sgd"`` (default) takes a plain gradient step with the optimiser's current
      learning rate and ``train.weight_decay``, the paper's Eq. 3 (and TAG's Taskonomy setting);
      ``"optimizer"`` takes the step the training optimiser would take with task i's gradient alone --
      Adam/AdamW with its current moments, SGD with its momentum buffer and weight decay (the
      momentum-aware lookahead of TAG's CelebA setting). The optimiser-aware lookahead needs the
      optimiser's state, which exists after its first step, so step 0 is not measured then. With Adam
      the running moments make up most of the step (a task's own gradient enters with weight
      1 - beta1), so the affinities of different sources differ less than with ``"sgd"``: on a problem
      where one task copies another, ``"sgd"`` finds the pair reliably and ``"optimizer"`` with Adam
      does not;
    * ``divide_by_lr`` (default true, as the authors' code): divide affinities by the learning rate
      (only ratios matter for the selection);
    * ``solver``: ``"auto"`` / ``"exhaustive"`` / ``"milp"`` for the group selection; ``init``:
      ``"scratch"`` or ``"naive_mtl"`` for the final groups.
    """

    every: int = 1
    lookahead: str = "sgd"
    divide_by_lr: bool = True
    solver: str = "auto"
    init: str = "scratch"

    def __post_init__(self) -> None:
        expect_int("every", self.every, low=1)
        expect_choice("lookahead", self.lookahead, LOOKAHEADS)
        expect(isinstance(self.divide_by_lr, bool), "divide_by_lr", "true or false", self.divide_by_lr)
        expect_choice("solver", self.solver, SOLVERS)
        expect_choice("init", self.init, INITS)
