"""Meta-training (MTG-Net, Sec. 4.1): fit the meta-learner ensemble to the gains measured so far with
the L1 loss on the tasks present, and predict gains of untrained combinations."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from taskgrouping.methods.mtg_net.config import MTGNetConfig
from taskgrouping.methods.mtg_net.meta_learner import MetaLearner

__all__ = ["fit_meta_learner", "predict_gains", "torch_threads"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (restored afterwards); ``None`` leaves them as they are."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fit_meta_learner(masks: np.ndarray, gains: np.ndarray, config: MTGNetConfig = MTGNetConfig(),
                     model: MetaLearner | None = None, seed: int | None = None) -> MetaLearner:
    """Train a :class:`MetaLearner` ensemble of ``config.ensemble`` members on measured combinations
    (full batch, ``config.epochs`` Adam steps; each member's loss is the L1 error on present tasks).

    ``model`` continues training an existing learner; otherwise a fresh one is initialised from
    ``seed`` (default ``config.seed``), which also seeds the dropout masks; the global RNG is untouched.
    """
    masks_t = torch.from_numpy(np.array(masks, dtype=bool))
    gains_t = torch.from_numpy(np.array(gains, dtype=np.float32))
    if masks_t.shape != gains_t.shape or masks_t.dim() != 2:
        raise ValueError(f"masks and gains must both be [M, N], got {tuple(masks_t.shape)} and {tuple(gains_t.shape)}")
    if model is not None and model.n_tasks != masks_t.shape[1]:
        raise ValueError(f"the learner predicts {model.n_tasks} tasks but the masks have {masks_t.shape[1]} columns")
    with torch_threads(config.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed if seed is None else seed)  # initialisation and dropout masks
        if model is None:
            model = MetaLearner(masks_t.shape[1], config.dim, config.layers, config.ffn_dim, config.temperature,
                                config.dropout, members=config.ensemble)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
        present = masks_t.float()
        model.train()
        for _ in range(config.epochs):
            opt.zero_grad(set_to_none=True)
            err = (model(masks_t) - gains_t).abs() * present  # [members, M, N]
            loss = err.sum(dim=(1, 2)).sum() / present.sum()  # sum over members of each member's mean
            loss.backward()
            opt.step()
        model.eval()
    return model


@torch.no_grad()
def predict_gains(model: MetaLearner, masks: np.ndarray, *, per_member: bool = False,
                  batch_size: int = 8192) -> np.ndarray:
    """Predicted per-task gains for bool masks: the ensemble mean ``[B, N]``, or with ``per_member``
    every member's ``[members, B, N]``; singletons are 0 by definition."""
    masks = np.asarray(masks, dtype=bool)
    out = np.zeros((model.members, *masks.shape), dtype=np.float64)
    model.eval()
    for start in range(0, len(masks), batch_size):
        chunk = torch.from_numpy(masks[start:start + batch_size].copy())
        out[:, start:start + batch_size] = model(chunk).double().numpy()
    out[:, masks.sum(axis=1) == 1] = 0.0
    return out if per_member else out.mean(axis=0)
