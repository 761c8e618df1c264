"""``multimnist_dense``: per-pixel tasks on two overlaid real MNIST digits, grouped by digit.

A CPU-sized stand-in for Taskonomy's dense tasks with a *known* grouping. Images are built exactly
as for :func:`~taskgrouping.data.builtin.multimnist` (left digit at the top-left of a
``(28 + offset)`` canvas, right digit shifted by ``offset``, combined by maximum, resized to
``image_size``); every task is an image of one digit alone, at the input's resolution:

* ``{side}_mask``: the digit's own intensity on the canvas (resized like the input);
* ``{side}_ddiag`` / ``{side}_danti`` (default): its signed derivatives along the diagonal and the
  anti-diagonal; ``{side}_dx`` / ``{side}_dy`` (optional): along x and y. All derivatives are
  central differences of the resized mask with zero padding.

Each target is a ``dense_regression`` map (1, H, W), standardised to zero mean and unit variance over
the labelled pixels of the training split (the statistics are in ``info["target_stats"]``).

Why these tasks: one digit's tasks share one hard computation (which strokes of the overlay are that
digit's), yet pixel-wise their targets are nearly uncorrelated (a signed central difference is exactly
uncorrelated with the map it differentiates; diagonal derivatives because MNIST's slant correlates
``dx`` with ``dy``). Their supports still reveal the sides (squared targets correlate within a digit).
Measurements: ``benchmarks/bench_multimnist_dense.py``.

``label_fraction < 1`` labels each task on its own random subset of the training images (NaN
elsewhere), the regime in which pooling a digit's tasks pays off: a single-task network sees only
its task's images, a digit's shared network sees every image labelled for any of its tasks.

The known grouping is {left tasks}, {right tasks}. Source digits are split into train / val / test
pools by index before pairing (``source_indices`` on each split), so no digit is seen in two splits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.data.builtin import (check_overlay_options, digit_canvases, load_mnist_5k, mnist_5k_path,
                                       paired_sources, resize_canvas)
from taskgrouping.data.registry import register_dataset
from taskgrouping.tasks import Task

DENSE_MAPS: tuple[str, ...] = ("mask", "dx", "dy", "ddiag", "danti")
DEFAULT_MAPS: tuple[str, ...] = ("mask", "ddiag", "danti")
SIDES: tuple[str, str] = ("left", "right")


def digit_maps(m: Tensor) -> dict[str, Tensor]:
    """Every map of :data:`DENSE_MAPS` for digit images ``m`` (n, 1, H, W), each of the same shape.

    ``mask`` is ``m``; ``dx`` / ``dy`` are its central differences along W / H with zero padding;
    ``ddiag`` and ``danti`` are the derivatives along the diagonal (towards the bottom-right) and
    the anti-diagonal (towards the top-right): ``(dx + dy) / sqrt(2)`` and ``(dx - dy) / sqrt(2)``.
    """
    px = F.pad(m, (1, 1, 0, 0))
    py = F.pad(m, (0, 0, 1, 1))
    dx = (px[..., 2:] - px[..., :-2]) / 2
    dy = (py[..., 2:, :] - py[..., :-2, :]) / 2
    return {"mask": m, "dx": dx, "dy": dy, "ddiag": (dx + dy) / 2 ** 0.5, "danti": (dx - dy) / 2 ** 0.5}


@register_dataset("multimnist_dense")
def multimnist_dense(n_train: int = 600, n_val: int = 200, n_test: int = 1000, image_size: int = 16,
                     offset: int = 8, source_split: Sequence[float] = (0.7, 0.1, 0.2),
                     maps: Sequence[str] = DEFAULT_MAPS, label_fraction: float = 0.25, loss_type: str = "mse",
                     seed: int = 0) -> TaskData:
    """Two overlaid MNIST digits; per digit, dense regression of its mask and of its signed derivatives.

    Args:
        n_train, n_val, n_test: images per split.
        image_size: side of the (square) input and target maps.
        offset: shift of the right digit on the ``(28 + offset)`` canvas (0 = fully overlapping).
        source_split: fractions of the 5,000 source digits in the train / val / test pools.
        maps: which per-digit maps to predict, distinct names from :data:`DENSE_MAPS` (``mask``,
            ``dx``, ``dy``, ``ddiag``, ``danti``; kept in that order); tasks are ``{side}_{map}``,
            left side first. Default ``mask``, ``ddiag``, ``danti``.
        label_fraction: each task is labelled on ``round(label_fraction * n_train)`` training
            images (at least one), a random subset drawn independently per task; its other training
            targets are NaN (missing). Validation and test are fully labelled. Below 1, a network
            trained on one task sees only that fraction of the images, while a network shared by a
            digit's tasks learns that digit from every image carrying any of their labels.
        loss_type: ``"mse"`` or ``"l1"`` for every task. (With L1, the small CNN of the preset
            often stalls on the constant-background solution of these mostly empty maps.)
        seed: pairing seed.
    """
    check_overlay_options(n_train, n_val, n_test, image_size, offset, source_split,
                          maps_per_image=2 * len(DENSE_MAPS))
    if isinstance(maps, str) or not maps or any(m not in DENSE_MAPS for m in maps) or len(set(maps)) != len(maps):
        raise ValueError(f"data.maps must be a non-empty list of distinct names from {list(DENSE_MAPS)}, got {maps!r}")
    if not 0 < label_fraction <= 1:
        raise ValueError(f"data.label_fraction must be in (0, 1], got {label_fraction!r}")
    if loss_type not in ("l1", "mse"):
        raise ValueError(f"data.loss_type must be 'l1' or 'mse', got {loss_type!r}")
    maps = [m for m in DENSE_MAPS if m in maps]
    images, labels = load_mnist_5k()
    g = torch.Generator().manual_seed(int(seed))
    picks = paired_sources(len(labels), source_split, (n_train, n_val, n_test), g)
    names = [f"{side}_{m}" for side in SIDES for m in maps]
    tasks = [Task(n, "dense_regression", loss_type=loss_type) for n in names]
    splits = []
    for pick in picks:
        left, right = digit_canvases(images, pick, offset)
        x = resize_canvas(torch.maximum(left, right) / 255.0, image_size)
        targets = {}
        for side, canvas in zip(SIDES, (left, right)):
            side_maps = digit_maps(resize_canvas(canvas / 255.0, image_size))
            targets.update({f"{side}_{m}": side_maps[m].contiguous() for m in maps})
        splits.append((x.contiguous(), targets, pick))
    train_targets = splits[0][1]
    if label_fraction < 1:  # each task keeps its training labels on its own random subset of images
        n_labelled = max(1, int(round(label_fraction * n_train)))
        for n in names:
            missing = torch.randperm(n_train, generator=g)[n_labelled:]
            train_targets[n][missing] = float("nan")
    stats = {}
    for n in names:  # standardise every task with the statistics of its labelled training pixels
        t = train_targets[n].double()
        t = t[~torch.isnan(t)]
        stats[n] = {"mean": float(t.mean()), "std": float(t.std())}
        if not stats[n]["std"] > 0:
            raise ValueError(f"task {n!r} is constant on its labelled training pixels; raise data.image_size "
                             f"(got {image_size}) or data.n_train / data.label_fraction")
    datasets = []
    for x, targets, pick in splits:
        ys = {n: (targets[n] - stats[n]["mean"]) / stats[n]["std"] for n in names}
        ds = TensorTaskDataset(x, ys)
        ds.source_indices = torch.from_numpy(pick.T.copy())  # (n, 2): left / right digit's row in mnist_5k
        datasets.append(ds)
    groups = [[n for n in names if n.startswith(side)] for side in SIDES]
    info = dict(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, offset=offset,
                source_split=list(source_split), maps=list(maps), label_fraction=label_fraction,
                loss_type=loss_type, seed=int(seed), source=str(mnist_5k_path().name), target_stats=stats)
    return TaskData("multimnist_dense", tasks, *datasets, input_shape=(1, image_size, image_size), groups=groups,
                    info=info)
