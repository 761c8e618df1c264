"""MTG-Net (Song et al., NeurIPS 2022), "Efficient and Effective Multi-task Grouping via Meta Learning
on Task Combinations", as an end-to-end method ``mtg_net``.

1. Gains are measured by training: a task combination S is trained as one network (a shared
   encoder, a head per task of S, the run's training settings) and each task i of S gets the
   *gain* (the paper's per-task relative performance gain of multi-task over single-task learning,
   written with losses, lower = better)::

       gain_i(S) = (L_i({i}) - L_i(S)) / L_i({i})

   where ``L_i(S)`` is task i's validation loss of the network trained on S, at its selected
   (best-validation) epoch, and ``L_i({i})`` the same for the single-task network of i. A task
   trained alone has gain 0; positive = learning with S helps i.
2. Active sampling (:func:`taskgrouping.grouping.mtgnet.active_sampling`): all single-task networks
   and the all-task network first (fanned out with ``backend`` / ``workers``), then ``rounds``
   rounds that each retrain the meta-learner and train the combination it picks (one at a time, in
   this process: each round depends on the previous one).
3. The meta-learner's predictions (measured gains where available) drive the group search for at
   most K groups: a partition maximising the total gain (``overlap: false``, default) or the
   overlapping network-selection form (``overlap: true``).
4. The chosen groups form the final model, one branch per group. A group already trained during
   sampling is reused as it is (``reuse: true``, default: the same network with the same settings
   would be trained again); the others are trained now.

``rounds``: the paper uses N(N-1)/2 (``rounds: paper``), which makes the gain collection cost as
many trainings as Standley's pair networks. The default ``rounds: n_tasks`` (N rounds, one actively
chosen combination per task on top of the N + 1 initial ones, 2N + 1 trainings in all) keeps
CPU runs affordable; an integer sets the count directly. ``acquisition`` (``auto``: the challenger
rule for N <= 10, else the paper's; ``active``: the paper's per-task rule; ``search``; ``random``) and
``initial`` (``auto`` | ``paper`` | ``leave_one_out``) pick the sampling loop's rules (see
:class:`~taskgrouping.grouping.mtgnet.MTGNetConfig`).
"""

from __future__ import annotations

from typing import Any

from taskgrouping.grouping.mtgnet import MTGNetConfig, mtgnet_search
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.two_shot import (FANOUT_OPTIONS, TrainedNetwork, fan_out, network_tag,
                                           networks_result, relative_gain, serve_by_validation, subset_job)

GAIN_DEFINITION = ("gain_i(S) = (L_i({i}) - L_i(S)) / L_i({i}); L = validation loss at the selected epoch of the "
                   "network trained on S (resp. task i alone)")


def _rounds(ctx: MethodContext, n: int) -> int:
    rounds = ctx.option("rounds", "n_tasks")
    if rounds == "n_tasks":
        return n
    if rounds == "paper":
        return n * (n - 1) // 2
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"mtg_net.rounds must be 'n_tasks', 'paper' or an integer >= 0, got {rounds!r}")
    return rounds


@register_method("mtg_net", dict(FANOUT_OPTIONS, rounds="n_tasks", overlap=False, reuse=True, meta_epochs=20,
                                 gain_source="hybrid", acquisition="auto", initial="auto"))
def mtg_net(ctx: MethodContext) -> MethodResult:
    """Gains of sampled task combinations measured by training them, a meta-learner fit on them,
    at most K groups searched on its predictions, the groups trained."""
    tasks = ctx.data.task_names
    n = len(tasks)
    rounds = _rounds(ctx, n)
    overlap, reuse = ctx.option("overlap", False), ctx.option("reuse", True)
    for key, value in (("overlap", overlap), ("reuse", reuse)):
        if not isinstance(value, bool):
            raise ValueError(f"mtg_net.{key} must be true or false, got {value!r}")
    meta_epochs = ctx.option("meta_epochs", 20)
    if isinstance(meta_epochs, bool) or not isinstance(meta_epochs, int) or meta_epochs < 1:
        raise ValueError(f"mtg_net.meta_epochs must be a positive integer, got {meta_epochs!r}")

    acquisition, initial = ctx.option("acquisition", "auto"), ctx.option("initial", "auto")
    if acquisition not in ("auto", "active", "search", "random"):
        raise ValueError(f"mtg_net.acquisition must be auto, active, search or random, got {acquisition!r}")
    if initial not in ("auto", "paper", "leave_one_out"):
        raise ValueError(f"mtg_net.initial must be auto, paper or leave_one_out, got {initial!r}")
    config = MTGNetConfig(rounds=rounds, seed=ctx.seed, threads=None, epochs=meta_epochs, acquisition=acquisition,
                          initial=initial)

    trained: dict[frozenset[str], TrainedNetwork] = {}

    def train_combos(combos: list[tuple[str, ...]], phase: str) -> None:
        jobs = [subset_job(ctx, network_tag(ctx, "combo" if phase == "sampled" else "final", c), c) for c in combos]
        # one combination per active round: train it here rather than start a worker for it
        for job, res in zip(jobs, fan_out(ctx, jobs, backend="sequential" if len(jobs) == 1 else None)):
            trained[frozenset(job.tasks)] = TrainedNetwork(job, res, 1.0, phase)

    train_combos([(t,) for t in tasks] + ([tuple(tasks)] if n > 1 else []), "sampled")
    single = {t: trained[frozenset((t,))].result.loss("val")[t] for t in tasks}

    def evaluate(combo: tuple[str, ...]) -> dict[str, float]:
        if frozenset(combo) not in trained:
            train_combos([tuple(combo)], "sampled")
        losses = trained[frozenset(combo)].result.loss("val")
        return {t: relative_gain(single[t], losses[t], t) for t in combo}

    grouping = mtgnet_search(tasks, evaluate, ctx.K, config=config, overlap=overlap,
                             gain_source=ctx.option("gain_source", "hybrid"))
    sampled = list(trained.values())
    missing = [g for g in grouping.groups if frozenset(g) not in trained or not reuse]
    if missing:
        if not reuse:  # train every chosen group anew
            for g in missing:
                trained.pop(frozenset(g), None)
        train_combos([tuple(g) for g in missing], "final")
    networks = [trained[frozenset(g)] for g in grouping.groups]
    later = [net for net in networks if net.phase == "final"]
    gains = [{"tasks": list(net.tasks), "gain": evaluate(net.tasks), "val_loss": net.result.loss("val")}
             for net in sampled]
    extra: dict[str, Any] = {
        "gain_definition": GAIN_DEFINITION, "rounds": rounds, "n_sampled": grouping.info.get("n_sampled"),
        "sampled_gains": gains, "search_objective": grouping.info.get("objective"), "overlap": overlap,
        "networks": [net.record() for net in sampled + later],
        "chosen": [dict(net.record(), reused=net.phase == "sampled") for net in networks],
    }
    seconds = sum(net.result.train_seconds for net in sampled + later)
    return networks_result(ctx, networks, serve_by_validation(ctx, networks), seconds, len(sampled) + len(later),
                           extra, method="mtg_net", objective=grouping.info.get("objective"))
