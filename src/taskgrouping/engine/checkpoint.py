"""Per-epoch training checkpoints with one commit point per epoch.

Layout of a checkpoint directory::

    state.json            the commit point: trainer state, optimiser scalars and a manifest naming
                          the epoch folder and the size and SHA-256 of each of its files
    epoch_<e>/            model.safetensors, best.safetensors, optimizer.safetensors

Saving epoch ``e`` writes ``epoch_<e>/`` (every file fsynced, then the folder), then replaces
``state.json`` atomically (fsynced temporary file + rename) and fsyncs the directory. Only then is
the previous epoch folder removed. A crash at any point leaves ``state.json`` naming a complete,
fsynced folder: the new epoch or the previous one. Folders that ``state.json`` does not name are
leftovers of an interrupted save; they are never read and are removed by the next save.

Loading reads only the committed folder and checks every file's size and SHA-256 against the
manifest before parsing it; anything missing, corrupt or unparsable raises :class:`CheckpointError`
with one line naming the file and what to do. Checkpoints of the older layout (weight files beside
``state.json``, no manifest) cannot be verified and are refused the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensor_bytes
from torch import Tensor, nn

from taskgrouping.io import atomic_write_bytes, atomic_write_json, fsync_dir, tensor_bytes

STATE = "state.json"
FORMAT = 2
FILES = ("model.safetensors", "best.safetensors", "optimizer.safetensors")
_FOLDER = re.compile(r"epoch_\d+(\.\d+)?")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, is corrupt or does not fit the model."""


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def error_line(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class Checkpoint:
    """One training run's checkpoint directory (layout and commit protocol in the module docstring)."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)
        self._committed: str | None = None  # the folder state.json names, once known

    @property
    def exists(self) -> bool:
        """Whether a checkpoint was committed here (it is verified by :meth:`load`)."""
        return (self.dir / STATE).is_file()

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint in {self.dir} {what}; delete {self.dir} to train this network "
                               "again from its first epoch")

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.dir / STATE).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON
            raise self._fail(f"is unreadable ({self.dir / STATE}: {error_line(exc)})") from None
        if not isinstance(state, dict):
            raise self._fail(f"is unreadable ({self.dir / STATE} holds no JSON object)")
        return state

    def _manifest(self, state: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        info = state.get("checkpoint")
        if info is None:
            raise self._fail("was written by an older version of taskgrouping (no manifest in state.json), "
                             "so it cannot be verified")
        try:
            folder, files = info["folder"], info["files"]
            ok = (info["format"] == FORMAT and isinstance(folder, str) and _FOLDER.fullmatch(folder) is not None
                  and all(isinstance(files[f]["bytes"], int) and isinstance(files[f]["sha256"], str) for f in FILES))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise self._fail(f"is unreadable ({self.dir / STATE} has no valid manifest)")
        return folder, files

    def _committed_folder(self) -> str | None:
        if self._committed is None and self.exists:
            try:
                self._committed = self._manifest(self._read_state())[0]
            except CheckpointError:  # overwritten by this save anyway
                return None
        return self._committed

    def save(self, model: nn.Module, best: dict[str, Tensor], optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> None:
        """Commit one epoch: write its folder, then switch ``state.json`` to it, then drop the old one.
        An OS error (full disk, permissions) becomes a :class:`CheckpointError`; what was committed
        before stays intact."""
        try:
            self._save(model, best, optimizer, state)
        except OSError as exc:
            previous = "the previous epoch's checkpoint is intact" if self.exists else "no epoch was saved yet"
            raise CheckpointError(f"could not write the checkpoint in {self.dir} ({error_line(exc)}); {previous}: "
                                  "fix the cause and continue with --resume") from None

    def _save(self, model: nn.Module, best: dict[str, Tensor], optimizer: torch.optim.Optimizer,
              state: dict[str, Any]) -> None:
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.dir.parent)
        committed = self._committed_folder()
        self._clean(committed)
        folder = self._new_folder_name(state.get("epoch"), committed)
        target = self.dir / folder
        target.mkdir()
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        files: dict[str, dict[str, Any]] = {}
        for name, tensors in zip(FILES, (model.state_dict(), best, opt_tensors)):
            data = tensor_bytes(tensors)
            atomic_write_bytes(target / name, data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        fsync_dir(target)
        manifest = {"format": FORMAT, "folder": folder, "files": files}
        atomic_write_json(self.dir / STATE, dict(state, optimizer=opt_meta, checkpoint=manifest))
        fsync_dir(self.dir)  # the commit is durable from here on
        self._committed = folder
        self._clean(folder)

    def _clean(self, keep: str | None) -> None:
        """Remove every epoch folder but ``keep`` (the previous epoch, leftovers of an interrupted save),
        files of the older layout and a temporary state file left by a crash."""
        for path in [*self.dir.glob("epoch_*"), *(self.dir / f for f in FILES), self.dir / (STATE + ".tmp")]:
            if path.name != keep and (path.exists() or path.is_symlink()):
                _remove(path)

    def _new_folder_name(self, epoch: Any, committed: str | None) -> str:
        base = f"epoch_{epoch}" if isinstance(epoch, int) and epoch >= 0 else "epoch_0"
        name, k = base, 0
        while name == committed:  # never overwrite the committed folder
            k += 1
            name = f"{base}.{k}"
        return name

    def load(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any], dict[str, Any]]:
        """(model tensors, best tensors, optimizer state_dict, trainer state) of the committed epoch,
        every file checked against the manifest; :class:`CheckpointError` if anything does not match."""
        state = self._read_state()
        folder, files = self._manifest(state)
        state.pop("checkpoint")
        loaded = [self._read_file(self.dir / folder / name, files[name]) for name in FILES]
        try:
            opt = _unflatten_optimizer(loaded[2], state.pop("optimizer"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._fail(f"is unreadable (optimiser state in {self.dir / STATE}: {error_line(exc)})") from None
        self._committed = folder
        self._clean(folder)  # verified: what an interrupted save or clean-up left can go
        return loaded[0], loaded[1], opt, state

    def _verified(self, path: Path, expected: dict[str, Any]) -> bytes:
        """The bytes of ``path`` after checking their size and SHA-256 against the manifest."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise self._fail(f"is incomplete ({path}: {exc.strerror or error_line(exc)})") from None
        if len(data) != expected["bytes"]:
            raise self._fail(f"is corrupt ({path} has {len(data)} bytes, {self.dir / STATE} records "
                             f"{expected['bytes']})")
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise self._fail(f"is corrupt ({path} does not match the SHA-256 recorded in {self.dir / STATE})")
        return data

    def _read_file(self, path: Path, expected: dict[str, Any]) -> dict[str, Tensor]:
        data = self._verified(path, expected)
        try:
            return load_tensor_bytes(data)
        except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
            raise self._fail(f"is unreadable ({path}: {error_line(exc)})") from None

    def copy_to(self, directory: Path | str) -> Checkpoint:
        """Copy the committed, verified checkpoint into ``directory`` (which must hold none) with the
        same commit protocol: ``state.json`` is written last, so an interrupted copy is never taken
        for a checkpoint and the next copy starts over."""
        target = Checkpoint(directory)
        if target.exists:
            raise CheckpointError(f"cannot copy the checkpoint in {self.dir} to {target.dir}: it holds one already")
        state = self._read_state()
        folder, files = self._manifest(state)
        data = {name: self._verified(self.dir / folder / name, files[name]) for name in FILES}
        if (target.dir / folder).exists():
            _remove(target.dir / folder)  # left by an interrupted copy
        (target.dir / folder).mkdir(parents=True)
        for name in FILES:
            atomic_write_bytes(target.dir / folder / name, data[name])
        fsync_dir(target.dir / folder)
        atomic_write_json(target.dir / STATE, state)
        fsync_dir(target.dir)
        return target
