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
2. Active sampling (:func:`~taskgrouping.methods.mtg_net.sampling.active_sampling`): all
   single-task networks and the all-task network first (fanned out with ``backend`` / ``workers``),
   then ``rounds`` rounds that each retrain the meta-learner and train the combination it picks (one
   at a time, in this process: each round depends on the previous one).
3. The meta-learner's predictions (measured gains where available) drive the group search for at
   most K groups: a partition maximising the total gain (``overlap: false``, default) or the
   overlapping network-selection form (``overlap: true``).
4. The chosen groups form the final model, one branch per group. A group already trained during
   sampling is reused as it is (``reuse: true``, default: the same network with the same settings
   would be trained again); the others are trained now.

The options are :class:`~taskgrouping.methods.mtg_net.options.MTGNetOptions`.
"""

from __future__ import annotations

from typing import Any

from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.mtg_net.config import MTGNetConfig
from taskgrouping.methods.mtg_net.options import MTGNetOptions
from taskgrouping.methods.mtg_net.pipeline import mtgnet_search
from taskgrouping.methods.two_shot import (TrainedNetwork, fan_out, network_tag, networks_result, relative_gain,
                                           serve_by_validation, subset_job)

__all__ = ["GAIN_DEFINITION", "mtg_net"]

GAIN_DEFINITION = ("gain_i(S) = (L_i({i}) - L_i(S)) / L_i({i}); L = validation loss at the selected epoch of the "
                   "network trained on S (resp. task i alone)")


@register_method("mtg_net", MTGNetOptions)
def mtg_net(ctx: MethodContext) -> MethodResult:
    """Gains of sampled task combinations measured by training them, a meta-learner fit on them,
    at most K groups searched on its predictions, the groups trained."""
    opts = ctx.opts(MTGNetOptions)
    tasks = ctx.data.task_names
    n = len(tasks)
    rounds = opts.rounds_for(n)
    overlap, reuse = opts.overlap, opts.reuse
    config = MTGNetConfig(rounds=rounds, seed=ctx.seed, threads=None, epochs=opts.meta_epochs,
                          acquisition=opts.acquisition, initial=opts.initial)

    trained: dict[frozenset[str], TrainedNetwork] = {}

    def train_combos(combos: list[tuple[str, ...]], phase: str) -> None:
        jobs = [subset_job(ctx, network_tag(ctx, "combo" if phase == "sampled" else "final", c), c) for c in combos]
        # one combination per active round: train it here rather than start a worker for it
        for job, res in zip(jobs, fan_out(ctx, jobs, opts, backend="sequential" if len(jobs) == 1 else None)):
            trained[frozenset(job.tasks)] = TrainedNetwork(job, res, 1.0, phase)

    train_combos([(t,) for t in tasks] + ([tuple(tasks)] if n > 1 else []), "sampled")
    single = {t: trained[frozenset((t,))].result.loss("val")[t] for t in tasks}

    def evaluate(combo: tuple[str, ...]) -> dict[str, float]:
        if frozenset(combo) not in trained:
            train_combos([tuple(combo)], "sampled")
        losses = trained[frozenset(combo)].result.loss("val")
        return {t: relative_gain(single[t], losses[t], t) for t in combo}

    grouping = mtgnet_search(tasks, evaluate, ctx.K, config=config, overlap=overlap,
                             gain_source=opts.gain_source)
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
