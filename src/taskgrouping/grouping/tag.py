"""TAG: task grouping from lookahead inter-task affinities (Fifty et al., NeurIPS 2021).

Two halves:

* **Measuring affinity** (:func:`lookahead_affinity`, :class:`AffinityAccumulator`). The affinity of
  source task ``i`` onto task ``j`` at a step is (paper Eq. 3)::

      Z[i, j] = 1 - L_j(batch; theta_s - step_i) / L_j(batch; theta_s)

  where ``step_i`` is the optimiser step of the *shared* parameters ``theta_s`` computed from
  ``L_i``'s gradient alone and both losses are taken on the same batch. Values are averaged over the
  steps of an epoch and the epoch means are summed over training.

* **Selecting groups** (:func:`select_groups`). Candidate groups are all task subsets; a task's
  score in a group is the mean affinity onto it from the other members; we choose at most ``k``
  groups that cover every task, *overlap allowed*, maximising the mean over tasks of each task's
  best score; each task is then served by its best chosen group.

Orientation convention used throughout this module: an affinity **matrix** ``A`` is indexed
``A[source, recipient]`` (row = the task whose gradient took the step). The JSON files of the
TAG authors (``{recipient: {source: value}}``) are the transpose; :func:`load_affinity` and
:meth:`AffinityAccumulator.to_mapping` convert between the two.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from taskgrouping.grouping.grouping import Grouping

AffinityLike = Mapping[str, Mapping[str, float]] | np.ndarray | Tensor | Sequence[Sequence[float]]

#: Above this many tasks the candidate set (all subsets) is too large to enumerate.
MAX_SELECTION_TASKS = 16


# --------------------------------------------------------------------------------------------
# Reading affinity tables
# --------------------------------------------------------------------------------------------

def _check_nested(obj: Any, where: str) -> tuple[list[str], np.ndarray]:
    """Validate ``{recipient: {source: value}}`` and return (names, A[source, recipient])."""
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{where}: expected a non-empty JSON object {{recipient: {{source: value}}}}, "
                         f"got {type(obj).__name__}")
    names = [str(k) for k in obj]
    first_sources: list[str] | None = None
    n = len(names)
    mat = np.empty((n, n), dtype=np.float64)
    for r, recipient in enumerate(names):
        row = obj[recipient]
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: the entry of task {recipient!r} must be an object {{source: value}}, "
                             f"got {type(row).__name__}")
        sources = [str(s) for s in row]
        if first_sources is None:
            first_sources = sources
        if set(sources) != set(first_sources):
            missing = sorted(set(first_sources) - set(sources))
            extra = sorted(set(sources) - set(first_sources))
            raise ValueError(f"{where}: task {recipient!r} has a different source set than {names[0]!r} "
                             f"(missing {missing}, extra {extra}); every recipient needs the same sources")
        if set(sources) != set(names):
            missing = sorted(set(names) - set(sources))
            extra = sorted(set(sources) - set(names))
            raise ValueError(f"{where}: matrix is not square over the same tasks: task {recipient!r} lists "
                             f"sources {sources}; missing {missing}, unknown {extra}")
        for s, source in enumerate(names):
            value = row[source]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}: affinity of {source!r} onto {recipient!r} must be a finite number, "
                                 f"got {value!r}")
            mat[s, r] = float(value)
    return names, mat


def load_affinity(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a TAG affinity JSON file ``{recipient: {source: value}}``.

    Returns ``(task_names, A)`` with ``A[source, recipient]`` (the module's convention), tasks in
    the file's order. Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the
    offending task when the file is not a square table of numbers over one task set.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"affinity file {str(path)!r} does not exist")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return _check_nested(obj, str(path))


def _as_matrix(affinity: AffinityLike, tasks: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    """Normalise the accepted affinity forms to (tasks, A[source, recipient]) restricted to ``tasks``."""
    if isinstance(affinity, Mapping):
        names, mat = _check_nested(affinity, "affinity")
        if tasks is None:
            return names, mat
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ValueError(f"tasks {unknown} are not in the affinity matrix, which names {names}")
        idx = [names.index(t) for t in tasks]
        return list(tasks), mat[np.ix_(idx, idx)]
    mat = affinity.detach().cpu().double().numpy() if isinstance(affinity, Tensor) else np.asarray(affinity, float)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"affinity matrix must be square [N, N], got shape {tuple(mat.shape)}")
    if tasks is None:
        raise ValueError("an affinity given as a matrix needs `tasks` (the names of its rows/columns)")
    if len(tasks) != mat.shape[0]:
        raise ValueError(f"affinity matrix is {mat.shape[0]}x{mat.shape[0]} but {len(tasks)} task names were given")
    if not np.all(np.isfinite(mat)):
        raise ValueError("affinity matrix contains non-finite values")
    return list(tasks), mat


# --------------------------------------------------------------------------------------------
# Group selection
# --------------------------------------------------------------------------------------------

def _candidate_scores(mat: np.ndarray) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """All subsets of size >= 2 (size-major, lexicographic) and their per-task scores.

    ``scores[g, t]`` = mean affinity onto ``t`` from the other members of group ``g``; ``-inf``
    when ``t`` is not in ``g``.
    """
    n = mat.shape[0]
    groups = [c for r in range(2, n + 1) for c in itertools.combinations(range(n), r)]
    scores = np.full((len(groups), n), -np.inf)
    diag = np.diag(mat)
    for gi, g in enumerate(groups):
        idx = list(g)
        onto = mat[idx][:, idx].sum(axis=0) - diag[idx]
        scores[gi, idx] = onto / (len(g) - 1)
    return groups, scores


def _exhaustive(scores: np.ndarray, k: int) -> list[int]:
    """Best set of <= k rows of ``scores``; fewer rows win ties, then the earliest combination."""
    m, n = scores.shape
    best_val, best = -np.inf, [0]
    for size in range(1, min(k, m) + 1):
        combos = np.array(list(itertools.combinations(range(m), size)), dtype=np.int64)
        for start in range(0, len(combos), 20000):
            chunk = combos[start:start + 20000]
            value = scores[chunk].max(axis=1).mean(axis=1)  # [combos]; -inf when a task is uncovered
            j = int(np.argmax(value))
            if value[j] > best_val:
                best_val, best = float(value[j]), chunk[j].tolist()
    return best


def _milp(scores: np.ndarray, k: int) -> list[int]:
    """Facility-location integer program: open <= k rows, serve each column by one open row."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    m, n = scores.shape
    pairs = np.argwhere(np.isfinite(scores))  # (group, task) pairs that may serve
    p = len(pairs)
    # variables: y_0..y_{m-1} (group opened), then x_p (pair p serves)
    c = np.concatenate([np.zeros(m), -scores[pairs[:, 0], pairs[:, 1]] / n])
    rows, cols, vals = [], [], []
    # each task served exactly once
    rows += pairs[:, 1].tolist(); cols += (m + np.arange(p)).tolist(); vals += [1.0] * p
    # x_p - y_g <= 0
    r0 = n
    rows += (r0 + np.arange(p)).tolist() * 2
    cols += (m + np.arange(p)).tolist() + pairs[:, 0].tolist()
    vals += [1.0] * p + [-1.0] * p
    # sum y <= k
    rows += [r0 + p] * m; cols += list(range(m)); vals += [1.0] * m
    a = coo_matrix((vals, (rows, cols)), shape=(n + p + 1, m + p)).tocsr()
    lb = np.concatenate([np.ones(n), np.full(p, -np.inf), [-np.inf]])
    ub = np.concatenate([np.ones(n), np.zeros(p), [k]])
    res = milp(c, constraints=LinearConstraint(a, lb, ub), integrality=np.ones(m + p),
               bounds=Bounds(0, 1))
    if res.x is None:
        raise RuntimeError(f"group selection MILP failed: {res.message}")
    served_by = pairs[np.round(res.x[m:]) > 0.5][:, 0]
    return sorted(set(served_by.tolist()))


def _local_search(scores: np.ndarray, k: int, beam_width: int = 16) -> list[int]:
    """Beam-greedy construction then best-improvement swaps (a heuristic for large candidate sets).

    An uncovered task counts a penalty below any achievable score difference, so covering every
    task comes first (as the "large constant" of Standley's search does).
    """
    m, n = scores.shape
    finite = np.isfinite(scores)
    lo, hi = scores[finite].min(), scores[finite].max()
    uncovered = lo - (hi - lo + 1.0) * n
    s = np.where(finite, scores, uncovered)

    def gains_with(base: np.ndarray) -> np.ndarray:
        return np.maximum(s, base).sum(axis=1)

    beam: list[tuple[float, tuple[int, ...], np.ndarray]] = [(uncovered * n, (), np.full(n, uncovered))]
    for _ in range(min(k, m)):
        expanded: dict[frozenset, tuple[float, tuple[int, ...], np.ndarray]] = {}
        for _, chosen, base in beam:
            vals = gains_with(base)
            vals[list(chosen)] = -np.inf
            for g in np.argsort(-vals, kind="stable")[:beam_width]:
                key = frozenset(chosen + (int(g),))
                if key not in expanded:
                    expanded[key] = (float(vals[g]), chosen + (int(g),), np.maximum(base, s[g]))
        beam = sorted(expanded.values(), key=lambda e: (-e[0], sorted(e[1])))[:beam_width]

    def improve(chosen: list[int]) -> tuple[float, list[int]]:
        current = float(s[chosen].max(axis=0).sum())
        for _ in range(100 * k):
            best_gain, best_move = 1e-12 * max(1.0, abs(current)), None
            for i in range(len(chosen)):
                others = chosen[:i] + chosen[i + 1:]
                base = s[others].max(axis=0) if others else np.full(n, uncovered)
                vals = gains_with(base)
                vals[chosen] = -np.inf
                j = int(np.argmax(vals))
                if vals[j] - current > best_gain:
                    best_gain, best_move = vals[j] - current, (i, j)
            if best_move is None:
                break
            chosen[best_move[0]] = best_move[1]
            current = float(s[chosen].max(axis=0).sum())
        return current, chosen

    results = [improve(list(chosen)) for _, chosen, _ in beam]
    return sorted(max(results, key=lambda r: r[0])[1])


def best_cover(scores: np.ndarray, k: int, *,
               method: Literal["auto", "exhaustive", "milp", "local"] = "auto",
               max_exhaustive: int = 200_000, max_milp_pairs: int = 20_000) -> tuple[list[int], str]:
    """Choose at most ``k`` rows of ``scores[group, task]`` maximising the mean over tasks of the
    best chosen score (``-inf`` = the group cannot serve that task).

    This is the network-selection problem shared by TAG and MTG-Net's overlapping search.

    * ``"exhaustive"`` enumerates all combinations of 1..k rows (fewer rows win exact ties);
    * ``"milp"`` solves the facility-location integer program (binary "row used" and "row serves
      task" variables, one server per task, at most ``k`` rows) with SciPy's HiGHS — exact;
    * ``"local"`` is a heuristic: beam-greedy construction (width 16) then best-improvement swaps;
    * ``"auto"``: exhaustive when there are at most ``max_exhaustive`` combinations, else the MILP
      when it has at most ``max_milp_pairs`` (row, task) serving pairs, else local search.

    Returns ``(chosen row indices sorted, solver used)``.
    """
    m = scores.shape[0]
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of groups) must be a positive integer, got {k!r}")
    if not np.isfinite(scores).any(axis=0).all():
        bad = np.flatnonzero(~np.isfinite(scores).any(axis=0)).tolist()
        raise ValueError(f"no candidate group can serve task columns {bad}")
    if method == "auto":
        n_combos = sum(math.comb(m, s) for s in range(1, min(k, m) + 1))
        if n_combos <= max_exhaustive:
            method = "exhaustive"
        else:
            method = "milp" if int(np.isfinite(scores).sum()) <= max_milp_pairs else "local"
    if method == "exhaustive":
        return sorted(_exhaustive(scores, int(k))), method
    if method == "milp":
        return sorted(_milp(scores, int(k))), method
    if method == "local":
        return _local_search(scores, int(k)), method
    raise ValueError(f"method must be 'auto', 'exhaustive', 'milp' or 'local', got {method!r}")


def select_groups(affinity: AffinityLike, tasks: Sequence[str] | None, k: int, *,
                  method: Literal["auto", "exhaustive", "milp", "local"] = "auto",
                  max_exhaustive: int = 200_000, max_milp_pairs: int = 200_000) -> Grouping:
    """Choose at most ``k`` (possibly overlapping) task groups from an affinity table.

    Args:
        affinity: either the file form ``{recipient: {source: value}}`` (``tasks`` may then pick a
            subset, or be ``None`` for all), or a square matrix ``A[source, recipient]`` whose rows
            are named by ``tasks`` in order.
        tasks: task names (see above).
        k: the largest number of groups (networks) allowed.
        method: ``"exhaustive"`` enumerates every combination of <= k candidate groups;
            ``"milp"`` solves the equivalent facility-location integer program with SciPy's HiGHS;
            ``"local"`` is a beam + swap heuristic; ``"auto"`` picks as :func:`best_cover` does
            (exhaustive, else the exact MILP up to ``max_milp_pairs`` serving pairs — every TAG
            problem up to 14 tasks —, else local search).

    Rules (TAG's network selection):
        * candidate groups are all subsets of >= 2 tasks; a task's score in group ``g`` is the mean
          of ``A[s, t]`` over the other members ``s`` of ``g`` (the diagonal is never used);
        * singletons are never candidates when there are >= 2 tasks: a singleton has no
          "other members", we define its score as ``-inf``, and since groups may overlap the
          all-task group always covers every task at a finite score, so a singleton can never win.
          With a single task the result is that task alone;
        * maximise the mean over tasks of each task's best score among the chosen groups;
          each task is served by its best chosen group (ties: the earlier group);
        * the exhaustive search prefers fewer groups on exact ties; groups serving no task are dropped.

    Returns:
        a :class:`Grouping` (overlap allowed), groups listed in task order, with
        ``info = {"method": "tag", "k": k, "score": objective, "task_scores": {...}}``.
    """
    names, mat = _as_matrix(affinity, tasks)
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of groups) must be a positive integer, got {k!r}")
    n = len(names)
    if n == 1:
        return Grouping(((names[0],),), {names[0]: 0}, {"method": "tag", "k": int(k), "score": 0.0})
    if n > MAX_SELECTION_TASKS:
        raise ValueError(f"TAG selection enumerates all {2 ** n} task subsets; {n} tasks exceed the limit of "
                         f"{MAX_SELECTION_TASKS}")
    groups, scores = _candidate_scores(mat)
    # candidate order = size, then lexicographic in task order
    chosen, method = best_cover(scores, int(k), method=method, max_exhaustive=max_exhaustive,
                                max_milp_pairs=max_milp_pairs)
    sub = scores[chosen]  # [chosen, N]
    best = sub.argmax(axis=0)  # first maximum = earlier group on ties
    used = sorted(set(best.tolist()))
    remap = {g: i for i, g in enumerate(used)}
    out_groups = tuple(tuple(names[t] for t in groups[chosen[g]]) for g in used)
    serves = {names[t]: remap[int(best[t])] for t in range(n)}
    task_scores = {names[t]: float(sub[best[t], t]) for t in range(n)}
    return Grouping(out_groups, serves, {
        "method": "tag", "k": int(k), "solver": method,
        "score": float(np.mean(list(task_scores.values()))), "task_scores": task_scores,
    })


def tag_select_cli(affinity_path: str | Path, groups: int) -> dict[str, Any]:
    """Back end of ``taskgrouping tag-select --affinity FILE.json --groups K``.

    Returns ``{"groups": [[task, ...], ...], "serves": {task: group_index}}`` (tasks named as in the
    file).
    """
    names, mat = load_affinity(affinity_path)
    g = select_groups(mat, names, groups)
    return {"groups": g.as_lists(), "serves": dict(g.serves)}


# --------------------------------------------------------------------------------------------
# Measuring affinity: the lookahead
# --------------------------------------------------------------------------------------------

def _sgd_direction(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, weight_decay: float,
                   optimizer: torch.optim.Optimizer | None) -> list[Tensor]:
    """The parameter change an SGD step would make with these gradients (state is not touched)."""
    group_of = _group_lookup(optimizer, params) if optimizer is not None else None
    deltas = []
    for p, g in zip(params, grads):
        if group_of is None:
            d = g + weight_decay * p if weight_decay else g
            deltas.append(-lr * d)
            continue
        grp = group_of[p]
        if grp.get("maximize", False):
            raise ValueError("lookahead does not support optimisers with maximize=True")
        wd, mom = grp.get("weight_decay", 0.0), grp.get("momentum", 0.0)
        d = g + wd * p if wd else g
        if mom:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            buf = d if buf is None else mom * buf + (1 - grp.get("dampening", 0.0)) * d
            d = d + mom * buf if grp.get("nesterov", False) else buf
        deltas.append(-lr * d)
    return deltas


def _adam_direction(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float,
                    optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameter change the next Adam/AdamW step would make with these gradients.

    Uses the optimiser's running moments and step count (Kingma & Ba, Alg. 1) without changing them.
    """
    group_of = _group_lookup(optimizer, params)
    decoupled_default = isinstance(optimizer, torch.optim.AdamW)
    deltas = []
    for p, g in zip(params, grads):
        grp = group_of[p]
        if grp.get("maximize", False):
            raise ValueError("lookahead does not support optimisers with maximize=True")
        beta1, beta2 = grp["betas"]
        eps, wd = grp["eps"], grp.get("weight_decay", 0.0)
        decoupled = decoupled_default or grp.get("decoupled_weight_decay", False)
        if wd and not decoupled:
            g = g + wd * p
        state = optimizer.state.get(p, {})
        step = float(state["step"]) if "step" in state else 0.0
        m = state.get("exp_avg", torch.zeros_like(p))
        v = state.get("exp_avg_sq", torch.zeros_like(p))
        step += 1
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        if grp.get("amsgrad", False):
            v = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(p)), v)
        denom = (v / (1 - beta2 ** step)).sqrt() + eps
        d = -lr * (m / (1 - beta1 ** step)) / denom
        if wd and decoupled:
            d = d - lr * wd * p
        deltas.append(d)
    return deltas


def _group_lookup(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict[Tensor, dict]:
    lookup: dict[Tensor, dict] = {}
    for grp in optimizer.param_groups:
        for q in grp["params"]:
            lookup[q] = grp
    missing = [i for i, p in enumerate(params) if p not in lookup]
    if missing:
        raise ValueError(f"shared parameters at positions {missing} are not managed by the given optimizer")
    return lookup


def lookahead_affinity(model: nn.Module, shared_params: Sequence[Tensor],
                       losses_fn: Callable[[nn.Module, Any], Mapping[str, Tensor]], batch: Any,
                       lr: float | None, *, mode: Literal["sgd", "adam_aware"] = "sgd",
                       optimizer: torch.optim.Optimizer | None = None, divide_by_lr: bool = False,
                       weight_decay: float = 0.0) -> Tensor:
    """TAG's lookahead inter-task affinity on one batch (Fifty et al. 2021, Eq. 3).

    ``Z[i, j] = 1 - L_j(after_i) / L_j(before)``: ``after_i`` is the model after one step of the
    shared parameters only, driven by source task ``i``'s gradient alone; both losses come from
    ``losses_fn(model, batch)`` on the same batch. Positive = task ``i``'s step helps task ``j``.

    Args:
        model: the multi-task model; ``losses_fn(model, batch)`` returns ``{task: scalar loss}`` and
            fixes the task order of the result.
        shared_params: the parameters the lookahead step moves (heads stay put, as in TAG).
        lr: step size; ``None`` takes the optimiser's learning rate.
        mode: ``"sgd"`` = plain gradient step (with ``weight_decay``); when an ``torch.optim.SGD``
            ``optimizer`` is given its momentum buffer, dampening, Nesterov and weight decay are used
            (momentum-aware lookahead). ``"adam_aware"`` = the step the given Adam/AdamW would take
            next with this gradient (its moments and step count; the TAG CelebA setting).
        divide_by_lr: divide the affinities by ``lr`` (as the authors' code does; only ratios
            matter for selection).

    Returns:
        ``Tensor[N, N]`` (float64, CPU), indexed ``[source, recipient]``.

    Side effects: none that survive the call — the shared parameters are restored bit-for-bit
    and every buffer (e.g. BatchNorm running statistics) is restored; the optimiser state and
    ``.grad`` fields are not touched. ``losses_fn`` runs ``N + 1`` times, so make it
    deterministic (e.g. model in eval mode, or no dropout) for meaningful values.
    """
    params = list(shared_params)
    if not params:
        raise ValueError("lookahead_affinity needs at least one shared parameter")
    if mode not in ("sgd", "adam_aware"):
        raise ValueError(f"mode must be 'sgd' or 'adam_aware', got {mode!r}")
    if mode == "adam_aware" and not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"mode='adam_aware' needs a torch.optim.Adam or AdamW optimizer, got {type(optimizer).__name__}")
    if mode == "sgd" and optimizer is not None and not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"mode='sgd' takes an optional torch.optim.SGD optimizer, got {type(optimizer).__name__}")
    if lr is None:
        if optimizer is None:
            raise ValueError("lr=None needs an optimizer to read the learning rate from")
        lr = float(optimizer.param_groups[0]["lr"])
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")

    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        before = dict(losses_fn(model, batch))
        if not before:
            raise ValueError("losses_fn returned no losses")
        names = list(before)
        for t, loss in before.items():
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"losses_fn must return scalar tensors; task {t!r} gave {loss!r}")
        base = torch.stack([before[t].detach().double().reshape(()) for t in names])
        zero_base = [t for t, v in zip(names, base.tolist()) if v == 0.0]
        if zero_base:
            raise ValueError(f"loss of tasks {zero_base} is exactly 0 before the step; the affinity ratio is undefined")
        n = len(names)
        # every gradient is taken before any parameter moves (in-place steps invalidate the graph)
        all_grads = []
        for i, source in enumerate(names):
            if not before[source].requires_grad:
                raise ValueError(f"the loss of task {source!r} does not depend on any parameter requiring grad")
            grads = torch.autograd.grad(before[source], params, retain_graph=i < n - 1, allow_unused=True)
            all_grads.append([torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)])
        out = torch.empty(n, n, dtype=torch.float64)
        for i, grads in enumerate(all_grads):
            with torch.no_grad():
                if mode == "adam_aware":
                    deltas = _adam_direction(params, grads, lr, optimizer)
                else:
                    deltas = _sgd_direction(params, grads, lr, weight_decay, optimizer)
                for p, d in zip(params, deltas):
                    p.add_(d)
                after = losses_fn(model, batch)
                missing = [t for t in names if t not in after]
                if missing:
                    raise ValueError(f"losses_fn returned no loss for tasks {missing} after the lookahead step")
                out[i] = 1.0 - torch.stack([after[t].detach().double().reshape(()) for t in names]) / base
                for p, s in zip(params, saved_params):
                    p.copy_(s)
                for b, s in saved_buffers:
                    b.copy_(s)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved_params):
                p.copy_(s)
            for b, s in saved_buffers:
                b.copy_(s)
    if divide_by_lr:
        out /= lr
    return out


@dataclass
class AffinityAccumulator:
    """Averages lookahead affinities within an epoch and sums the epoch means over training.

    This is TAG's accumulation: the selection reads the integral over training of the per-epoch
    mean affinity (the authors' Taskonomy table has a diagonal of ~9.8 = 1 per epoch x ~10 epochs
    when divided by the learning rate).

    Usage::

        acc = AffinityAccumulator(task_names)
        for epoch ...:
            for step, batch ...:
                if step % 10 == 0:
                    acc.update(lookahead_affinity(model, shared, losses_fn, batch, lr))
            acc.end_epoch()
        grouping = select_groups(acc.total.numpy(), acc.tasks, k=3)
    """

    tasks: list[str]
    _epoch_sum: Tensor = field(init=False, repr=False)
    _epoch_count: int = field(init=False, default=0, repr=False)
    _total: Tensor = field(init=False, repr=False)
    epochs: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks)
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list of unique names, got {self.tasks}")
        n = len(self.tasks)
        self._epoch_sum = torch.zeros(n, n, dtype=torch.float64)
        self._total = torch.zeros(n, n, dtype=torch.float64)

    def update(self, affinity: Tensor) -> None:
        """Add one step's ``[source, recipient]`` affinity matrix to the current epoch."""
        n = len(self.tasks)
        if tuple(affinity.shape) != (n, n):
            raise ValueError(f"expected an affinity of shape ({n}, {n}) for tasks {self.tasks}, "
                             f"got {tuple(affinity.shape)}")
        self._epoch_sum += affinity.detach().to("cpu", torch.float64)
        self._epoch_count += 1

    def end_epoch(self) -> Tensor | None:
        """Close the epoch: add its mean to the running total; returns that mean (None if empty)."""
        if self._epoch_count == 0:
            return None
        mean = self._epoch_sum / self._epoch_count
        self._total += mean
        self.epochs += 1
        self._epoch_sum.zero_()
        self._epoch_count = 0
        return mean

    @property
    def total(self) -> Tensor:
        """Sum over closed epochs of the per-epoch mean affinity, ``[source, recipient]``."""
        return self._total.clone()

    def to_mapping(self) -> dict[str, dict[str, float]]:
        """The total in the TAG file form ``{recipient: {source: value}}``."""
        tot = self._total
        return {r: {s: float(tot[i, j]) for i, s in enumerate(self.tasks)} for j, r in enumerate(self.tasks)}

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_mapping` as JSON (readable by :func:`load_affinity`)."""
        Path(path).write_text(json.dumps(self.to_mapping(), indent=1))
