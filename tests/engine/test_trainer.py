"""Trainer: same seed -> same numbers, resume -> same numbers, divergence and bad checkpoints reported."""

import copy
import json

import pytest
import torch

from taskgrouping.data.base import make_loader
from taskgrouping.data.builtin import planted
from taskgrouping.models.branched import build_branched_model
from taskgrouping.engine.checkpoint import CheckpointError
from taskgrouping.engine.evaluation import evaluate
from taskgrouping.engine.hooks import TaskLossObjective
from taskgrouping.engine.trainer import TrainConfig, TrainingDiverged, train


def _setup(seed=0):
    data = planted(n_tasks=4, group_sizes=[2, 2], input_dim=8, feature_dim=3, n_train=128, n_val=64, n_test=64)
    torch.manual_seed(seed)
    model = build_branched_model(data.tasks, [data.task_names[:2], data.task_names[2:]], data.input_shape,
                                 backbone="mlp", backbone_options={"widths": [16, 8]})
    return data, model


def _fit(model, data, epochs, **kw):
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, progress=False, schedule="step", step_size=2)
    return train(model, make_loader(data.train, 32, True), make_loader(data.val, 32, False), data.tasks, cfg,
                 seed=5, **kw)


def test_same_seed_same_numbers():
    data, m1 = _setup()
    _, m2 = _setup()
    r1, r2 = _fit(m1, data, 3), _fit(m2, data, 3)
    for (k1, v1), (k2, v2) in zip(r1.model.state_dict().items(), r2.model.state_dict().items()):
        assert torch.equal(v1, v2), k1


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    data, m_full = _setup()
    full = _fit(m_full, data, 4)
    data, m_part = _setup()
    _fit(m_part, data, 2, checkpoint_dir=tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epoch"] == 1
    # a fresh model object, as after a crash, continues from epoch 2 to 4
    _, m_new = _setup(seed=123)
    cfg_epochs = 4
    resumed = _fit(m_new, data, cfg_epochs, checkpoint_dir=tmp_path, resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    e1 = evaluate(full.model, make_loader(data.test, 64, False), data.tasks)
    e2 = evaluate(resumed.model, make_loader(data.test, 64, False), data.tasks)
    assert e1 == e2


def test_nan_loss_names_the_task():
    data, model = _setup()
    data.train.targets["g1_t0"][5] = float("inf")
    with pytest.raises(TrainingDiverged, match="task 'g1_t0'"):
        _fit(model, data, 1)


def test_unreadable_checkpoint(tmp_path):
    data, model = _setup()
    _fit(model, data, 1, checkpoint_dir=tmp_path)
    (tmp_path / "epoch_0" / "model.safetensors").write_bytes(b"not a safetensors file")
    _, fresh = _setup()
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        _fit(fresh, data, 2, checkpoint_dir=tmp_path, resume=True)


def test_early_stopping_and_best_epoch_restored():
    data, model = _setup()
    cfg = TrainConfig(epochs=30, batch_size=32, lr=0.05, early_stopping=2, progress=False)
    res = train(model, make_loader(data.train, 32, True), make_loader(data.val, 32, False), data.tasks, cfg)
    assert res.epochs_run < 30
    best_val = min(h["val_total_loss"] for h in res.history)
    now = evaluate(res.model, make_loader(data.val, 64, False), data.tasks)
    assert sum(m["loss"] for m in now.values()) == pytest.approx(best_val, rel=1e-6)


class _HoldFirstEpochs(TaskLossObjective):
    """Plain task losses; the first ``held`` epochs are not selectable (as DMTG's warm-up)."""

    def __init__(self, tasks, held: int) -> None:
        super().__init__(tasks)
        self.held = held

    def on_epoch_end(self, epoch, model):
        return {"selectable": False} if epoch < self.held else {}


def test_held_epochs_are_not_selected_and_do_not_count_towards_early_stopping():
    """With a learning rate that makes validation worse after the first epoch, plain selection returns epoch 0;
    an objective holding epochs 0-2 gets the best of the later epochs, and early stopping (patience 2)
    counts only those: training runs at least to epoch 5."""
    data, model = _setup()
    cfg = TrainConfig(epochs=12, batch_size=32, lr=0.3, early_stopping=2, progress=False)
    loaders = make_loader(data.train, 32, True), make_loader(data.val, 32, False)
    plain = train(copy.deepcopy(model), *loaders, data.tasks, cfg)
    held = train(model, *loaders, data.tasks, cfg, objective=_HoldFirstEpochs(data.tasks, 3))
    assert plain.best_epoch == 0  # the held run would pick it too, if the hold were ignored
    assert held.best_epoch >= 3 and held.epochs_run >= 6
    later = [h["val_total_loss"] for h in held.history[3:]]
    assert held.history[held.best_epoch]["val_total_loss"] == min(later)


def test_a_run_held_throughout_returns_its_best_epoch():
    data, model = _setup()
    cfg = TrainConfig(epochs=6, batch_size=32, lr=0.3, progress=False)
    res = train(model, make_loader(data.train, 32, True), make_loader(data.val, 32, False), data.tasks, cfg,
                objective=_HoldFirstEpochs(data.tasks, 99))
    losses = [h["val_total_loss"] for h in res.history]
    assert res.best_epoch == losses.index(min(losses)) < 5


class _HoldThenRewind(_HoldFirstEpochs):
    """Holds epochs 0-2, asks to rewind after epoch 2 and records the weights it sees."""

    def __init__(self, tasks) -> None:
        super().__init__(tasks, 3)
        self.seen: dict[str, dict] = {}

    def on_epoch_start(self, epoch, model):
        if epoch == 3:
            self.seen["start_3"] = copy.deepcopy(model.state_dict())

    def on_epoch_end(self, epoch, model):
        self.seen[f"end_{epoch}"] = copy.deepcopy(model.state_dict())
        facts = super().on_epoch_end(epoch, model)
        return {**facts, "rewind": True} if epoch == 2 else facts


def test_rewind_continues_from_the_best_held_epoch():
    data, model = _setup()
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.3, progress=False)
    objective = _HoldThenRewind(data.tasks)
    res = train(model, make_loader(data.train, 32, True), make_loader(data.val, 32, False), data.tasks, cfg,
                objective=objective)
    losses = [h["val_total_loss"] for h in res.history[:3]]
    best = losses.index(min(losses))
    assert best < 2  # the rewind goes back, not to the last held epoch
    for k, v in objective.seen[f"end_{best}"].items():
        assert torch.equal(objective.seen["start_3"][k], v), k


class _Extend(TaskLossObjective):
    """Asks for one more epoch at the end of epochs 1 and 2 (the plan grows from 3 to 5 epochs)."""

    def on_epoch_end(self, epoch, model):
        return {"extend": True} if epoch in (1, 2) else {}


def test_extend_adds_epochs_past_the_config_and_resumes_to_the_same_weights(tmp_path):
    """Each ``extend`` fact adds one epoch: 3 planned + 2 = epochs 0-4. A run cut after epoch 3 (its
    checkpoint) and resumed with the same config finishes the extended plan, to the same weights."""
    data, model = _setup()
    full = _fit(model, data, 3, objective=_Extend(data.tasks))
    assert [h["epoch"] for h in full.history] == [0, 1, 2, 3, 4] and full.epochs_run == 5
    data, part = _setup()
    _fit(part, data, 4, checkpoint_dir=tmp_path)  # epochs 0-3 without extending: the same weights so far
    state = json.loads((tmp_path / "state.json").read_text())
    for h in state["history"]:
        h.update({"extend": True} if h["epoch"] in (1, 2) else {})
    (tmp_path / "state.json").write_text(json.dumps(state))
    _, fresh = _setup(seed=123)
    resumed = _fit(fresh, data, 3, checkpoint_dir=tmp_path, resume=True, objective=_Extend(data.tasks))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3, 4]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    again = _fit(fresh, data, 3, checkpoint_dir=tmp_path, resume=True, objective=_Extend(data.tasks))
    assert again.epochs_run == 5  # a finished extended run does not train again
