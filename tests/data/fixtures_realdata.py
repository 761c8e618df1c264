"""Writers of tiny CelebA / Taskonomy / NYUv2 copies in the datasets' official on-disk formats."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from taskgrouping.data.celeba import CELEBA40

# --------------------------------------------------------------------------------------------- CelebA


def celeba_image(seed: int, size: tuple[int, int] = (178, 218)) -> Image.Image:
    """A noisy but structured RGB image (width, height = ``size``) that resizing methods disagree on."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx / (3 + seed % 5))[..., None] * np.cos(yy / 4.0)[..., None]
    img = base + rng.normal(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def attribute_line(name: str, values: Sequence[int]) -> str:
    """One row in the official style: values right-aligned in 2 columns, so ' 1' gets two spaces."""
    return name + " " + " ".join(f"{v:2d}" for v in values)


def write_celeba(root: Path, codes: Sequence[int] = (0, 0, 0, 0, 0, 1, 1, 2, 2), seed: int = 0,
                 names: Sequence[str] = CELEBA40) -> tuple[list[str], np.ndarray]:
    """Official CelebA files for ``len(codes)`` images under ``root``; returns (file names, +-1 matrix)."""
    rng = np.random.default_rng(seed)
    n = len(codes)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    values = rng.choice(np.array([-1, 1]), size=(n, len(names)))
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        celeba_image(seed * 100 + i).save(root / "img_align_celeba" / f, quality=95)
    lines = [str(n), " ".join(names) + " "]
    for i, f in enumerate(files):
        line = attribute_line(f, values[i])
        lines.append(line if i % 3 else line.replace(" ", "\t", 1) + "  ")  # irregular whitespace
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {c}\n" for f, c in zip(files, codes)))
    return files, values


# ------------------------------------------------------------------------------------------ Taskonomy

TASKONOMY_DOMAINS = ("rgb", "segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture",
                     "edge_occlusion")


def taskonomy_path(root: Path, domain: str, building: str, point: int, view: int,
                   layout: str = "official") -> Path:
    suffix = "segmentsemantic" if domain == "segment_semantic" else domain
    name = f"point_{point}_view_{view}_domain_{suffix}.png"
    if layout == "official":
        return root / domain / building / name
    return root / building / domain / name


def random_taskonomy_arrays(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    depth = rng.integers(0, 12000, size=(size, size)).astype(np.uint16)
    depth[0, 0] = 65535
    return {
        "rgb": rng.integers(0, 256, size=(size, size, 3)).astype(np.uint8),
        "segment_semantic": rng.integers(0, 18, size=(size, size)).astype(np.uint8),
        "depth_zbuffer": depth,
        "normal": rng.integers(0, 256, size=(size, size, 3)).astype(np.uint8),
        "keypoints2d": rng.integers(0, 4000, size=(size, size)).astype(np.uint16),
        "edge_texture": rng.integers(0, 8000, size=(size, size)).astype(np.uint16),
        "edge_occlusion": rng.integers(0, 2000, size=(size, size)).astype(np.uint16),
    }


def write_taskonomy_point(root: Path, building: str, point: int, view: int, arrays: dict[str, np.ndarray],
                          layout: str = "official") -> None:
    for domain, a in arrays.items():
        path = taskonomy_path(root, domain, building, point, view, layout)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path)


def write_taskonomy(root: Path, buildings: Sequence[str], points: int = 2, size: int = 8, seed: int = 0,
                    layout: str = "official") -> dict[tuple[str, int, int], dict[str, np.ndarray]]:
    """``points`` views per building, every domain of :data:`TASKONOMY_DOMAINS`; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in buildings:
        for p in range(points):
            arrays = random_taskonomy_arrays(rng, size)
            write_taskonomy_point(root, b, p, 0, arrays, layout)
            out[(b, p, 0)] = arrays
    return out


# --------------------------------------------------------------------------------------------- NYUv2


def write_nyuv2(root: Path, n_train: int = 10, n_val: int = 4, h: int = 6, w: int = 8,
                seed: int = 0) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """MTAN's preprocessed layout: root/{train,val}/{image,label,depth,normal}/{i}.npy."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for kind in ("image", "label", "depth", "normal"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            normal = rng.normal(size=(h, w, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=2, keepdims=True)
            normal[0, 0] = 0.0
            normal[0, 2] = (0.0, 0.6, 0.8)  # a zero component alone does not make a normal invalid
            depth = rng.uniform(0.5, 10.0, size=(h, w, 1)).astype(np.float32)
            depth[0, 1] = 0.0
            label = rng.integers(-1, 13, size=(h, w)).astype(np.float32)
            arrays = {"image": rng.uniform(0, 1, size=(h, w, 3)).astype(np.float32), "label": label,
                      "depth": depth, "normal": normal}
            for kind, a in arrays.items():
                np.save(root / split / kind / f"{i}.npy", a)
            out[(split, i)] = arrays
    return out
