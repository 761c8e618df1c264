"""The branched multi-task model: optional shared stem -> K group branches -> heads per branch.

One class serves every method: naive MTL is one branch with all heads, single-task learning is N
branches with one head each, a fixed (possibly overlapping) grouping is one branch per group, and
DMTG is K branches each carrying all N heads. ``serves`` says which branch's head answers for a
task at inference; :meth:`BranchedModel.prune` keeps only those heads and the branches they use.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.models.backbones import build_backbone, default_backbone, output_shape
from taskgrouping.models.heads import make_head
from taskgrouping.models.stacked import BranchMode, same_architecture, stackable, stacked_call
from taskgrouping.tasks import Task

HeadKey = tuple[int, str]


class BranchedModel(nn.Module):
    """Stem, branches and per-branch heads.

    Args:
        stem: module applied once to the input (``nn.Identity`` when nothing is shared).
        branches: one module per group.
        heads: per branch, a mapping task name -> head module (the tasks the branch is trained on).
        serves: task name -> index of the branch whose head predicts it at inference.
    """

    def __init__(self, stem: nn.Module, branches: Sequence[nn.Module],
                 heads: Sequence[Mapping[str, nn.Module]], serves: Mapping[str, int]) -> None:
        super().__init__()
        if len(branches) != len(heads):
            raise ValueError(f"{len(branches)} branches but {len(heads)} head sets; expected one head set per branch")
        self.stem = stem
        self.branches = nn.ModuleList(branches)
        # Task names are kept in lists because nn.ModuleDict rejects names containing '.'.
        self.groups: list[list[str]] = [list(h.keys()) for h in heads]
        self.heads = nn.ModuleList(nn.ModuleList(h.values()) for h in heads)
        for task, k in serves.items():
            if not 0 <= k < len(self.groups) or task not in self.groups[k]:
                raise ValueError(f"task {task!r} is served by branch {k}, which has no head for it")
        self.serves: dict[str, int] = dict(serves)
        #: how to rebuild this architecture (set by :func:`build_branched_model` for registered backbones)
        self.spec: dict | None = None
        #: ``stacked``: run the branches as one vmapped call (:mod:`~taskgrouping.models.stacked`) when they
        #: share an architecture; ``loop``: one after another. Same weights and results either way.
        self.branch_mode: BranchMode = "loop"
        self._uniform: bool | None = None

    @property
    def task_names(self) -> list[str]:
        return list(self.serves)

    def head(self, k: int, task: str) -> nn.Module:
        return self.heads[k][self.groups[k].index(task)]

    def all_head_keys(self) -> list[HeadKey]:
        return [(k, t) for k, g in enumerate(self.groups) for t in g]

    def features(self, x: Tensor, branches: Iterable[int] | None = None) -> dict[int, Tensor]:
        """Branch outputs (the features heads read) for the requested branches."""
        return self.branch_features(self.stem(x), range(len(self.branches)) if branches is None else branches)

    def branch_features(self, z: Tensor, branches: Iterable[int]) -> dict[int, Tensor]:
        """The requested branches applied to the stem's output ``z`` (stacked or looped, see ``branch_mode``)."""
        ks = sorted(set(branches))
        stacked = self.stacked_branch_features(z, ks)
        return dict(zip(ks, stacked.unbind(0) if stacked is not None else [self.branches[k](z) for k in ks]))

    def stacked_branch_features(self, z: Tensor, branches: Sequence[int]) -> Tensor | None:
        """The requested branches (in the given order) applied to ``z`` as one vmapped call, their outputs
        stacked along a new leading axis; ``None`` where they run as a loop (``branch_mode`` loop, branches of
        different architectures, fewer than two, or :func:`~taskgrouping.models.stacked.stackable` says no)."""
        if self._uniform is None:
            self._uniform = same_architecture(list(self.branches))
        modules = [self.branches[k] for k in branches]
        if self.branch_mode != "stacked" or not self._uniform or len(modules) < 2 or not stackable(modules):
            return None
        return stacked_call(modules, z, in_dims=None)

    def forward_heads(self, x: Tensor, keys: Iterable[HeadKey] | None = None,
                      ) -> tuple[dict[HeadKey, Tensor], dict[int, Tensor]]:
        """Predictions of the given heads (default: every head) and the branch features used."""
        keys = self.all_head_keys() if keys is None else list(keys)
        feats = self.features(x, {k for k, _ in keys})
        return {(k, t): self.head(k, t)(feats[k]) for k, t in keys}, feats

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Task name -> prediction of its serving head (only the branches needed are run)."""
        preds, _ = self.forward_heads(x, [(k, t) for t, k in self.serves.items()])
        return {t: preds[(k, t)] for t, k in self.serves.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the stem and the branches (everything but the heads)."""
        return [p for m in (self.stem, self.branches) for p in m.parameters() if p.requires_grad]

    @torch.no_grad()
    def load_from_single_branch(self, source: "BranchedModel") -> None:
        """Copy a one-branch model (naive MTL) into every branch and every head of the same task.

        Used for warm starts: the DMTG paper starts its K branches from naive-MTL weights copied K
        times; a given grouping can likewise start from them (DMTG Table 4).
        """
        if len(source.branches) != 1:
            raise ValueError(f"warm start needs a one-branch (naive MTL) model, got {len(source.branches)} branches")
        self.stem.load_state_dict(source.stem.state_dict())
        for k, branch in enumerate(self.branches):
            branch.load_state_dict(source.branches[0].state_dict())
            for t in self.groups[k]:
                if t not in source.groups[0]:
                    raise ValueError(f"warm start: the naive-MTL model has no head for task {t!r}")
                self.head(k, t).load_state_dict(source.head(0, t).state_dict())

    def prune(self) -> "BranchedModel":
        """A copy holding only the serving heads and the branches they read (empty ones dropped).

        The copy's outputs equal this model's :meth:`forward` exactly.
        """
        used = sorted(set(self.serves.values()))
        remap = {k: i for i, k in enumerate(used)}
        heads = [{t: copy.deepcopy(self.head(k, t)) for t in self.groups[k] if self.serves.get(t) == k} for k in used]
        pruned = BranchedModel(copy.deepcopy(self.stem), [copy.deepcopy(self.branches[k]) for k in used], heads,
                               {t: remap[k] for t, k in self.serves.items()})
        if self.spec is not None:
            pruned.spec = dict(self.spec, groups=pruned.groups, serves=pruned.serves)
        return pruned


def default_serves(groups: Sequence[Sequence[str]]) -> dict[str, int]:
    """Each task served by the first group that contains it."""
    serves: dict[str, int] = {}
    for k, g in enumerate(groups):
        for t in g:
            serves.setdefault(t, k)
    return serves


def validate_groups(groups: Sequence[Sequence[str]], task_names: Sequence[str], allow_overlap: bool = True) -> None:
    """Raise a clear error unless ``groups`` is a cover of ``task_names`` by non-empty groups."""
    known = set(task_names)
    if not groups:
        raise ValueError("grouping is empty; expected at least one group")
    seen: list[str] = []
    for i, g in enumerate(groups):
        if not g:
            raise ValueError(f"group {i} is empty; every group needs at least one task")
        for t in g:
            if t not in known:
                raise ValueError(f"group {i} names unknown task {t!r}; tasks are {list(task_names)}")
        if len(set(g)) != len(g):
            raise ValueError(f"group {i} lists a task twice: {list(g)}")
        seen += list(g)
    missing = known - set(seen)
    if missing:
        raise ValueError(f"tasks {sorted(missing)} are in no group; every task needs a group")
    if not allow_overlap and len(seen) != len(set(seen)):
        raise ValueError("groups overlap but this method needs a partition")


BackboneSpec = str | nn.Module | Callable[[], nn.Module]


def build_branched_model(tasks: Sequence[Task], groups: Sequence[Sequence[str]], input_shape: Sequence[int],
                         backbone: BackboneSpec | None = None, backbone_options: Mapping | None = None,
                         shared_blocks: int = 0, serves: Mapping[str, int] | None = None,
                         head_factory: Callable[[Task, tuple, tuple], nn.Module] = make_head) -> BranchedModel:
    """Build a :class:`BranchedModel` with one branch per group.

    Args:
        tasks: all tasks (each must be in some group).
        groups: task-name lists, one per branch; may overlap.
        input_shape: shape of one input.
        backbone: a registered backbone name (each branch freshly initialised), an ``nn.Module``
            (deep-copied per branch, so branches start identical), or a zero-argument factory.
            Default: ``mlp`` for vectors, ``small_cnn`` for images.
        shared_blocks: number of leading backbone blocks shared by all branches (the stem).
        serves: task -> branch answering for it; default the first group containing it.
    """
    names = [t.name for t in tasks]
    validate_groups(groups, names)
    by_name = {t.name: t for t in tasks}
    input_shape = tuple(int(s) for s in input_shape)
    backbone = backbone if backbone is not None else default_backbone(input_shape)
    options = dict(backbone_options or {})

    def new_backbone() -> nn.Module:
        if isinstance(backbone, str):
            return build_backbone(backbone, input_shape, **options)
        if isinstance(backbone, nn.Module):
            return copy.deepcopy(backbone)
        return backbone()

    def split(net: nn.Module) -> tuple[nn.Module, nn.Module]:
        if shared_blocks == 0:
            return nn.Identity(), net
        if not isinstance(net, nn.Sequential):
            raise ValueError("shared_blocks > 0 needs a backbone that is an nn.Sequential of blocks")
        if not 0 <= shared_blocks <= len(net):
            raise ValueError(f"shared_blocks={shared_blocks} but the backbone has {len(net)} blocks")
        return net[:shared_blocks], net[shared_blocks:]

    if shared_blocks < 0:
        raise ValueError(f"shared_blocks must be >= 0, got {shared_blocks}")
    stem, _ = split(new_backbone())
    branches = [split(new_backbone())[1] for _ in groups]
    feat_shape = output_shape(nn.Sequential(stem, branches[0]), input_shape)
    heads = [{t: head_factory(by_name[t], feat_shape, input_shape) for t in g} for g in groups]
    model = BranchedModel(stem, branches, heads, dict(serves) if serves is not None else default_serves(groups))
    if isinstance(backbone, str) and head_factory is make_head:
        model.spec = {"tasks": [asdict(t) for t in tasks], "groups": [list(g) for g in groups],
                      "serves": model.serves, "input_shape": list(input_shape), "backbone": backbone,
                      "backbone_options": options, "shared_blocks": shared_blocks}
    return model


def save_branched(model: BranchedModel, path: str | Path) -> None:
    """Write ``path.safetensors`` (weights) and ``path.json`` (architecture) for :func:`load_branched`.

    Only models built by :func:`build_branched_model` from a registered backbone carry the spec
    needed to rebuild them; others should be saved with their own code.
    """
    if model.spec is None:
        raise ValueError("this model has no architecture spec (built from a custom backbone); save its "
                         "state_dict and rebuild it with your own code")
    from taskgrouping.io import atomic_write_json, save_state_dict

    base = Path(path)
    save_state_dict(base.with_suffix(".safetensors"), model.state_dict())
    atomic_write_json(base.with_suffix(".json"), model.spec)


#: The keys of a spec written by :func:`save_branched` and the JSON type of each.
_SPEC_KEYS: dict[str, tuple[type, str]] = {
    "tasks": (list, "a list of task objects"), "groups": (list, "a list of lists of task names"),
    "serves": (dict, "an object {task: branch index}"), "input_shape": (list, "a list of positive integers"),
    "backbone": (str, "a registered backbone name"), "backbone_options": (dict, "an object of options"),
    "shared_blocks": (int, "an integer >= 0"),
}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _spec_entry_ok(key: str, value: object) -> bool:
    kind = _SPEC_KEYS[key][0]
    if not isinstance(value, kind) or isinstance(value, bool):
        return False
    if key == "tasks":
        return all(isinstance(t, dict) for t in value)
    if key == "groups":
        return all(isinstance(g, list) and all(isinstance(t, str) for t in g) for g in value)
    if key == "serves":
        return all(_is_int(k) for k in value.values())
    if key == "input_shape":
        return all(_is_int(s) and s > 0 for s in value)
    return key != "shared_blocks" or value >= 0


def _check_spec(spec: object, where: Path) -> dict:
    """The types of a model description (values are checked when the model is built)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected the JSON object written by save_branched, got {type(spec).__name__}")
    for key, (_, what) in _SPEC_KEYS.items():
        if key not in spec:
            raise ValueError(f"{where}: missing key {key!r} ({what}); expected the JSON written by save_branched")
        if not _spec_entry_ok(key, spec[key]):
            shown = json.dumps(spec[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(f"{where}: {key!r} must be {what}, got {shown}")
    return spec


def _build_from_spec(spec: dict) -> BranchedModel:
    tasks = [Task(**t) for t in spec["tasks"]]
    return build_branched_model(tasks, spec["groups"], spec["input_shape"], backbone=spec["backbone"],
                                backbone_options=spec["backbone_options"], shared_blocks=spec["shared_blocks"],
                                serves=spec["serves"])


def load_branched(path: str | Path) -> BranchedModel:
    """Rebuild a model saved by :func:`save_branched` (no pickle: JSON + safetensors).

    The architecture is first built on the meta device and checked against the weight file's header
    (tensor names, dtypes, shapes), so a malformed description or a truncated or foreign weight file
    is a ``ValueError`` naming the file, found before any weight is allocated.
    """
    from taskgrouping.readers import expected_layout, load_tensors, read_json

    base = Path(path)
    spec_file, weights = base.with_suffix(".json"), base.with_suffix(".safetensors")
    for f in (spec_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found; expected the pair written by save_branched")
    spec = _check_spec(read_json(spec_file, "the model description written by save_branched"), spec_file)
    try:
        with torch.device("meta"):
            layout = expected_layout(_build_from_spec(spec).state_dict())
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, IndexError) as exc:
        msg = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).strip()
        msg = msg.splitlines()[0] if msg else type(exc).__name__  # torch appends its C++ source location
        raise ValueError(f"{spec_file}: not a valid model description ({msg})") from None
    tensors = load_tensors(weights, layout, f"the architecture in {spec_file}")
    model = _build_from_spec(spec)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"{weights}: weights do not fit the architecture in {spec_file} ({reason})") from None
    model.eval()
    return model


__all__ = ["BranchedModel", "build_branched_model", "default_serves", "validate_groups",
           "save_branched", "load_branched", "HeadKey"]
