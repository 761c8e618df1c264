"""The MTG-Net meta-learner: it sees only the tasks of a combination, its batched ensemble members are
independent learners, and it fits a measured table."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mtgnet_cases import load_table
from taskgrouping.methods.mtg_net import MetaLearner, MTGNetConfig, fit_meta_learner, predict_gains


def test_meta_learner_only_sees_tasks_in_the_combination():
    torch.manual_seed(0)
    model = MetaLearner(6, dim=8, layers=2).eval()
    masks = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(masks)[0]
    assert torch.all(out[~masks] == 0)
    with torch.no_grad():  # changing an absent task's embedding cannot change the prediction
        model.embedding[:, 4] += 5.0
    assert torch.allclose(model(masks[:1])[0], out[:1])
    assert not torch.allclose(model(masks[1:])[0], out[1:])
    with pytest.raises(ValueError, match="at least one task"):
        model(torch.zeros(1, 6, dtype=torch.bool))


def test_meta_learner_ensemble_members_are_independent_learners():
    """The batched ensemble: member m computes what a one-member learner with m's weights computes,
    and training the ensemble on the sum of the members' losses trains each member as if alone."""
    masks = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=bool)
    gains = np.where(masks, np.arange(15, dtype=np.float32).reshape(3, 5) / 10 - 0.7, 0.0)
    cfg = MTGNetConfig(dim=8, layers=2, epochs=5, ensemble=3)
    ensemble = fit_meta_learner(masks, gains, cfg, seed=11)
    torch.manual_seed(11)
    start = MetaLearner(5, dim=8, layers=2, members=3)  # the initialisation fit_meta_learner draws
    for m in range(3):
        single = MetaLearner(5, dim=8, layers=2, members=1)
        with torch.no_grad():
            for p_single, p_start in zip(single.parameters(), start.parameters()):
                p_single.copy_(p_start[m:m + 1])
        alone = fit_meta_learner(masks, gains, replace(cfg, ensemble=1), model=single, seed=0)
        np.testing.assert_allclose(predict_gains(alone, masks), predict_gains(ensemble, masks, per_member=True)[m],
                                   rtol=1e-5, atol=1e-6)


def test_meta_learner_fits_measured_table():
    ett = load_table("ett")
    cfg = MTGNetConfig(dim=16, layers=2, epochs=150, weight_decay=5e-4)
    model = fit_meta_learner(ett.masks, ett.gains, cfg)
    pred = predict_gains(model, ett.masks)
    l1 = np.abs(pred - ett.gains)[ett.masks].mean()
    assert l1 < 0.7 * np.abs(ett.gains)[ett.masks].mean()  # well below predicting "no gain"
