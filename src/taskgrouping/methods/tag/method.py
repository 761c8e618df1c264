"""TAG (Fifty et al., NeurIPS 2021), "Efficiently Identifying Task Groupings for Multi-Task Learning",
as an end-to-end method ``tag``.

1. One naive-MTL training (all tasks, one shared encoder) during which, every ``every`` steps and
   before the step's forward pass, :class:`~taskgrouping.methods.tag.affinity.AffinityCollector`
   measures the lookahead inter-task affinity on the step's batch (paper Eq. 3,
   :func:`~taskgrouping.methods.tag.lookahead.lookahead_affinity`):
   ``Z[i, j] = 1 - L_j(theta_s - step_i) / L_j(theta_s)``. The shared parameters are restored
   exactly afterwards and the losses are evaluated under a forked RNG, so the training itself is
   bit-for-bit the naive-MTL run (the trained model is kept as the run's naive-MTL model for
   warm starts). Affinities are averaged per epoch and the epoch means summed
   (:class:`~taskgrouping.methods.tag.affinity.AffinityAccumulator`).
2. :func:`~taskgrouping.methods.tag.selection.select_groups` picks at most K groups (overlap
   allowed; each task served by its best group).
3. The chosen groups are trained as one branched model (one branch per group, a task in several
   groups gets a head in each), from scratch or from the naive-MTL weights (``init``).

Options: :class:`~taskgrouping.methods.tag.options.TAGOptions`. Recorded: ``affinity`` (the
accumulated matrix in TAG's file form ``{recipient: {source: value}}``), the lookahead settings, the
seconds of the affinity run and of the final training.
"""

from __future__ import annotations

import torch

from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.baselines import fit_grouping
from taskgrouping.methods.tag.affinity import AffinityCollector
from taskgrouping.methods.tag.options import TAGOptions
from taskgrouping.methods.tag.selection import select_groups

__all__ = ["tag"]


@register_method("tag", TAGOptions)
def tag(ctx: MethodContext) -> MethodResult:
    """Lookahead affinities from one naive-MTL run, at most K (possibly overlapping) groups selected
    on them, the groups trained."""
    opts = ctx.opts(TAGOptions)
    names = ctx.data.task_names
    divide = opts.divide_by_lr
    model = ctx.build_model(Grouping.partition([names]))
    collector = AffinityCollector(ctx.data.tasks, model.shared_parameters(), every=opts.every,
                                  lookahead=opts.lookahead, divide_by_lr=divide,
                                  lr=ctx.train.lr, weight_decay=ctx.train.weight_decay, seed=ctx.seed)
    run, _, _ = ctx.fit(model, "tag_affinity", score_test=False, callbacks=[collector])
    if collector.accumulator.epochs == 0:
        raise ValueError(f"tag measured no affinity: {collector.skipped} lookahead steps were skipped "
                         f"(tag.every={collector.every}, {run.history[-1]['steps'] if run.history else 0} steps "
                         "per epoch); lower tag.every or train more steps")
    if "naive_mtl_model" not in ctx.cache:  # the affinity run is a naive-MTL run, bit for bit
        ctx.cache.update(naive_mtl_model=run.model, naive_mtl_seconds=run.train_seconds)
    affinity = collector.accumulator.total
    if not bool(torch.isfinite(affinity).all()):
        raise ValueError("tag: the measured affinity contains non-finite values (a loss diverged in the "
                         "lookahead); lower train.lr")
    grouping = select_groups(affinity, names, ctx.K, method=opts.solver)
    final = fit_grouping(ctx, grouping, "tag_groups", init=opts.init)
    extra = dict(final.extra)
    extra.update({
        "affinity": collector.accumulator.to_mapping(),
        "affinity_form": "affinity[recipient][source] = sum over epochs of the mean of "
                         "1 - L_recipient(after source's step) / L_recipient(before)" + (" / lr" if divide else ""),
        "affinity_epochs": collector.accumulator.epochs, "affinity_steps": collector.steps,
        "affinity_skipped_steps": collector.skipped, "lookahead": collector.lookahead, "every": collector.every,
        "divide_by_lr": divide, "affinity_seconds": run.train_seconds, "groups_seconds": final.train_seconds,
        "selection_score": grouping.info.get("score"),
    })
    return MethodResult(final.grouping, final.model, final.per_task, final.val_per_task,
                        run.train_seconds + final.train_seconds, n_networks=1 + len(grouping.groups), extra=extra)
