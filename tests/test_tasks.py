"""Task losses and meters against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from taskgrouping.tasks import Task


def test_binary_loss_ignores_missing_labels():
    t = Task("a", "binary")
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    target = torch.tensor([0, 1, -1])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    assert t.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_loss_with_no_valid_label_is_zero_and_differentiable():
    t = Task("r", "regression")
    pred = torch.randn(3, 1, requires_grad=True)
    loss = t.loss(pred, torch.full((3,), float("nan")))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(pred.grad == 0)


def test_regression_mse_and_l1_mask_nan():
    pred = torch.tensor([[1.0], [2.0], [3.0]])
    target = torch.tensor([2.0, float("nan"), 1.0])
    assert Task("r", "regression").loss(pred, target).item() == pytest.approx((1 + 4) / 2)
    assert Task("r", "regression", loss_type="l1").loss(pred, target).item() == pytest.approx((1 + 2) / 2)


def test_classification_meter_error_and_loss_sum_over_batches():
    t = Task("a", "binary")
    m = t.meter()
    logits = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0]])]
    targets = [torch.tensor([0, 0]), torch.tensor([1])]
    for p, y in zip(logits, targets):
        m.update(p, y)
    out = m.compute()
    assert out["error"] == pytest.approx(1 / 3)
    full = F.cross_entropy(torch.cat(logits), torch.cat(targets), reduction="mean").item()
    assert out["loss"] == pytest.approx(full, rel=1e-6)


def test_segmentation_miou_hand_example():
    t = Task("seg", "segmentation", num_classes=2)
    m = t.meter()
    # prediction: class 0 everywhere except pixel (0,1); target has one ignored pixel
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 1] = 1.0
    target = torch.tensor([[[0, 1], [1, -1]]])
    m.update(logits, target)
    out = m.compute()
    # class 0: inter 1, union 2 (pred {00,10}, tgt {00}) ; class 1: inter 1, union 2
    assert out["miou"] == pytest.approx(0.5)
    assert out["pixel_acc"] == pytest.approx(2 / 3)


def test_normal_angles():
    t = Task("n", "normal", out_channels=3)
    m = t.meter()
    pred = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    target = torch.zeros(1, 3, 1, 2)
    target[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # 0 degrees
    target[0, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0])  # 90 degrees
    m.update(pred, target)
    out = m.compute()
    assert out["mean_angle"] == pytest.approx(45.0, abs=1e-3)
    assert out["within_11.25"] == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(name="x", kind="ordinal"), "unknown kind"),
    (dict(name="x", kind="binary", num_classes=3), "num_classes=2"),
    (dict(name="x", kind="regression", loss_type="ce"), "loss_type"),
])
def test_bad_task_definitions(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Task(**kwargs)
