"""The MTG-Net pipeline end to end: candidate pool -> active sampling with the meta-learner -> group
search on the gains it knows (measured where trained, predicted elsewhere, as the authors' code does)."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Sequence

import numpy as np

from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.mtg_net.config import MTGNetConfig
from taskgrouping.methods.mtg_net.gain_table import GainTable
from taskgrouping.methods.mtg_net.masks import all_subsets, mask_code, random_pool
from taskgrouping.methods.mtg_net.meta_training import torch_threads
from taskgrouping.methods.mtg_net.sampling import ActiveSamplingResult, Evaluate, acquisition_rule, active_sampling
from taskgrouping.methods.mtg_net.search import beam_partition_search, search_groups

__all__ = ["default_candidates", "mtgnet_search", "search_from_sampling"]


def default_candidates(tasks: Sequence[str], evaluate: Evaluate | GainTable,
                       config: MTGNetConfig = MTGNetConfig()) -> tuple[np.ndarray, bool]:
    """The candidate pool :func:`mtgnet_search` uses, and whether it is the whole search space.

    The table's combinations in oracle mode; all ``2^N - 1`` combinations for ``N <= 16``;
    otherwise a seeded pool of ``config.pool_size`` combinations (singles, pairs, random larger
    sets) for sampling only — the final partition is then searched over arbitrary combinations.
    """
    n = len(tasks)
    if isinstance(evaluate, GainTable):
        return np.asarray(evaluate.masks), True
    if n <= 16:
        return all_subsets(n), True
    return random_pool(n, config.pool_size, config.seed), False


def search_from_sampling(result: ActiveSamplingResult, k: int, candidates: np.ndarray | None, *,
                         overlap: bool = False, gain_source: Literal["hybrid", "predicted"] = "hybrid",
                         beam_width: int = 8, threads: int | None = 1) -> Grouping:
    """Group search on the gains an :func:`active_sampling` run knows.

    ``gain_source="hybrid"`` (default, as in the authors' code) uses the measured gains of the
    combinations trained during sampling and the ensemble's predictions elsewhere;
    ``"predicted"`` uses predictions only. With ``candidates`` (``bool[M, N]``) the search is exact
    over those combinations (:func:`search_groups`); with ``None`` it is
    :func:`beam_partition_search` over arbitrary combinations.
    """
    if gain_source not in ("hybrid", "predicted"):
        raise ValueError(f"gain_source must be 'hybrid' or 'predicted', got {gain_source!r}")
    tasks = result.tasks
    measured = {mask_code(m): g for m, g in zip(result.sampled_masks, result.sampled_gains)}

    def gains_for(masks: np.ndarray) -> np.ndarray:
        with torch_threads(threads):
            out = result.predict(masks)
        if gain_source == "hybrid":
            for i, m in enumerate(masks):
                hit = measured.get(mask_code(m))
                if hit is not None:
                    out[i] = hit
        return out

    if candidates is not None:
        candidates = np.asarray(candidates, dtype=bool)
        grouping = search_groups(tasks, candidates, gains_for(candidates), k, overlap=overlap)
    else:
        if overlap:
            raise ValueError("overlap=True needs an explicit candidate pool")
        grouping = beam_partition_search(tasks, gains_for, k, beam_width=beam_width)
    info = dict(grouping.info)
    info.update({"method": "mtgnet", "gain_source": gain_source, "n_sampled": result.n_sampled,
                 "sampled": [[t for t, m in zip(tasks, mask) if m] for mask in result.sampled_masks]})
    return Grouping(grouping.groups, grouping.serves, info)


def mtgnet_search(tasks: Sequence[str] | None, evaluate: Evaluate | GainTable, k: int, *,
                  candidates: np.ndarray | None = None, config: MTGNetConfig = MTGNetConfig(),
                  overlap: bool = False, gain_source: Literal["hybrid", "predicted"] = "hybrid",
                  beam_width: int = 8) -> Grouping:
    """Active sampling + meta-learning + group search (MTG-Net), end to end.

    Args:
        tasks: task names; ``None`` takes them from a :class:`GainTable` ``evaluate``.
        evaluate: trains a combination and returns ``{task: gain}``; a :class:`GainTable` here is
            the oracle mode (no network is trained; the table answers).
        k: largest number of groups (cost 1 each).
        candidates: ``bool[M, N]`` combinations the sampler and the search may use; default
            :func:`default_candidates`.
        overlap, gain_source, beam_width: see :func:`search_groups` and :func:`search_from_sampling`.

    Returns:
        a :class:`Grouping`; ``info`` records the number of trained combinations, the objective under
        the gains used, and the combinations trained.
    """
    if isinstance(evaluate, GainTable):
        if tasks is None:
            tasks = list(evaluate.tasks)
        elif list(tasks) != list(evaluate.tasks):
            raise ValueError(f"tasks {list(tasks)} do not match the gain table's columns {list(evaluate.tasks)}")
    if tasks is None:
        raise ValueError("tasks are required unless evaluate is a GainTable")
    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be a non-empty list of unique names, got {tasks}")
    whole_space = True
    if candidates is None:
        candidates, whole_space = default_candidates(tasks, evaluate, config)
    candidates = np.asarray(candidates, dtype=bool)
    if candidates.ndim != 2 or candidates.shape[1] != len(tasks):
        raise ValueError(f"candidates must be a bool array [M, {len(tasks)}], got shape {candidates.shape}")
    if acquisition_rule(config, len(tasks)) == "search" and config.guide_k is None:
        config = replace(config, guide_k=int(k))
    result = active_sampling(tasks, evaluate, candidates, config)
    return search_from_sampling(result, k, candidates if whole_space else None, overlap=overlap,
                                gain_source=gain_source, beam_width=beam_width, threads=config.threads)
