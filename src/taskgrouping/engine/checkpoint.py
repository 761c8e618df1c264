"""Per-epoch training checkpoints: weights, best weights and optimiser state (safetensors) plus the
trainer's JSON state. ``state.json`` is written last and is the commit point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from taskgrouping.io import atomic_write_json, save_state_dict


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in state["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpoint:
    """Files of one training run's checkpoint directory; ``state.json`` is written last (commit)."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)

    @property
    def exists(self) -> bool:
        return (self.dir / "state.json").is_file()

    def save(self, model: nn.Module, best: dict[str, Tensor], optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        save_state_dict(self.dir / "model.safetensors", model.state_dict())
        save_state_dict(self.dir / "best.safetensors", best)
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_state_dict(self.dir / "optimizer.safetensors", opt_tensors)
        atomic_write_json(self.dir / "state.json", dict(state, optimizer=opt_meta))

    def load(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any], dict[str, Any]]:
        """(model tensors, best tensors, optimizer state_dict, trainer state); CheckpointError if unreadable."""
        try:
            state = json.loads((self.dir / "state.json").read_text())
            model = load_file(str(self.dir / "model.safetensors"))
            best = load_file(str(self.dir / "best.safetensors"))
            opt = _unflatten_optimizer(load_file(str(self.dir / "optimizer.safetensors")), state.pop("optimizer"))
        except Exception as exc:  # any corruption is reported the same way, naming the directory
            raise CheckpointError(f"checkpoint in {self.dir} is unreadable ({type(exc).__name__}: {exc}); "
                                  "delete it or start without --resume") from None
        return model, best, opt, state


