"""Options of the ``mtg_net`` method (:class:`MTGNetOptions`), checked when the config is validated."""

from __future__ import annotations

from dataclasses import dataclass

from taskgrouping.methods.options import expect
from taskgrouping.methods.two_shot import FanoutOptions

__all__ = ["MTGNetOptions"]

ACQUISITIONS = ("auto", "active", "search", "random")
INITIAL_DESIGNS = ("auto", "paper", "leave_one_out")
GAIN_SOURCES = ("hybrid", "predicted")


@dataclass(frozen=True)
class MTGNetOptions(FanoutOptions):
    """Options of ``mtg_net`` (besides ``backend`` / ``workers`` for the initial trainings).

    Attributes:
        rounds: actively chosen combinations after the N singles and the all-task set. ``"paper"`` =
            N(N-1)/2, the paper's budget, which makes the gain collection cost as many trainings as
            Standley's pair networks; ``"n_tasks"`` (default) = N (2N + 1 trainings in all), which
            keeps CPU runs affordable; an integer >= 0 sets the count directly.
        overlap: search the overlapping network-selection form instead of a partition.
        reuse: reuse a chosen group's network trained during sampling instead of training it again
            (the same network with the same settings would be trained).
        meta_epochs: full-batch epochs per retraining of the meta-learner.
        gain_source: ``"hybrid"`` (measured gains where trained, predictions elsewhere) or
            ``"predicted"`` (predictions only) for the group search.
        acquisition: ``"auto"`` (the challenger rule for N <= 10, else the paper's), ``"active"`` (the
            paper's per-task rule), ``"search"`` (the challenger rule) or ``"random"``.
        initial: ``"auto"``, ``"paper"`` or ``"leave_one_out"`` (the sampling loop's initial design).

    See :class:`~taskgrouping.methods.mtg_net.config.MTGNetConfig` for the rules.
    """

    rounds: str | int = "n_tasks"
    overlap: bool = False
    reuse: bool = True
    meta_epochs: int = 20
    gain_source: str = "hybrid"
    acquisition: str = "auto"
    initial: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.rounds
        expect(r in ("n_tasks", "paper") or (isinstance(r, int) and not isinstance(r, bool) and r >= 0),
               "rounds", "'n_tasks', 'paper' or an integer >= 0", r)
        for key in ("overlap", "reuse"):
            expect(isinstance(getattr(self, key), bool), key, "true or false", getattr(self, key))
        e = self.meta_epochs
        expect(isinstance(e, int) and not isinstance(e, bool) and e >= 1, "meta_epochs", "a positive integer", e)
        expect(self.gain_source in GAIN_SOURCES, "gain_source", "'hybrid' or 'predicted'", self.gain_source)
        expect(self.acquisition in ACQUISITIONS, "acquisition", "auto, active, search or random", self.acquisition)
        expect(self.initial in INITIAL_DESIGNS, "initial", "auto, paper or leave_one_out", self.initial)

    def rounds_for(self, n_tasks: int) -> int:
        """The number of active rounds with ``n_tasks`` tasks."""
        if self.rounds == "n_tasks":
            return n_tasks
        if self.rounds == "paper":
            return n_tasks * (n_tasks - 1) // 2
        return int(self.rounds)
