"""CelebA from its official files, as binary attribute tasks preprocessed the way TAG and DMTG do.

Expected layout (directly under ``root`` or under ``root/celeba``)::

    img_align_celeba/000001.jpg ...   aligned 178x218 JPEGs
    list_attr_celeba.txt              line 1: image count; line 2: attribute names;
                                      then "file v1 ... vK" with -1/1, any whitespace
    list_eval_partition.txt           "file 0|1|2" = train / val / test

Preprocessing follows TAG and DMTG, which read CelebA through TensorFlow Datasets and call
``tf.image.resize(image_in_[0,1], [64, 64])``: no crop, the whole image is squeezed to
``image_size`` x ``image_size`` with bilinear interpolation *without antialiasing* (half-pixel
centres). That is ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``;
Pillow's BILINEAR resize antialiases when shrinking and gives different pixels. Each attribute
is a two-logit binary task with labels 0 (attribute -1) / 1 (attribute 1).

The resized images are decoded once and cached as a ``uint8`` ``.npy`` file read through a
memory map, so later loads start in about the time it takes to stat the image files. Storing
``uint8`` rounds each resized value to the nearest 1/255 (at most 0.5/255 from the float result).
The cache file name carries a hash of the selected images' names, sizes and modification times
and of ``image_size``, so a changed source file gives a new cache; files are written to a temporary
name and moved into place with ``os.replace``, so a crash never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.data.image_io import read_rgb, resize_bilinear
from taskgrouping.data.registry import register_dataset
from taskgrouping.tasks import Task

#: The 40 attributes of ``list_attr_celeba.txt``, in file order.
CELEBA40: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
#: The 9 attributes of TAG's and DMTG's CelebA experiments.
CELEBA9: tuple[str, ...] = ("5_o_Clock_Shadow", "Black_Hair", "Blond_Hair", "Brown_Hair", "Goatee",
                            "Mustache", "No_Beard", "Rosy_Cheeks", "Wearing_Hat")
ATTRIBUTE_SETS: dict[str, tuple[str, ...]] = {"celeba9": CELEBA9, "celeba40": CELEBA40}
SPLITS = ("train", "val", "test")
_CACHE_FORMAT = 1
_DECODE_CHUNK = 256
_LABEL_TOKENS = frozenset(("1", "-1"))


@dataclass(frozen=True)
class CelebAFiles:
    """Where the official files of one CelebA copy are."""

    base: Path
    images: Path
    attributes: Path
    partition: Path


def find_celeba(root: str | Path) -> CelebAFiles:
    """Locate the official files under ``root`` or ``root/celeba``."""
    root = Path(root).expanduser()
    for base in (root, root / "celeba"):
        if (base / "list_attr_celeba.txt").is_file():
            files = CelebAFiles(base, base / "img_align_celeba", base / "list_attr_celeba.txt",
                                base / "list_eval_partition.txt")
            if not files.partition.is_file():
                raise FileNotFoundError(f"{str(files.partition)!r} does not exist; expected the official "
                                        "CelebA split file next to list_attr_celeba.txt")
            if not files.images.is_dir():
                raise FileNotFoundError(f"{str(files.images)!r} is not a directory; expected the aligned "
                                        "CelebA JPEGs there")
            return files
    raise FileNotFoundError(f"no list_attr_celeba.txt in {str(root)!r} or {str(root / 'celeba')!r}; expected "
                            "the official CelebA files img_align_celeba/, list_attr_celeba.txt, "
                            "list_eval_partition.txt")


def _first_duplicate(items: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not a text file ({exc})") from None


def read_attribute_file(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt`` into (attribute names, image file names, int8 matrix of -1/1)."""
    path = Path(path)
    lines = _read_lines(path)
    if len(lines) < 2:
        raise ValueError(f"{str(path)!r}: {len(lines)} line(s); expected an image count on line 1 and the "
                         "attribute names on line 2")
    head = lines[0].split()
    if len(head) != 1 or not head[0].isdigit():
        raise ValueError(f"{str(path)!r}, line 1: {lines[0]!r}; expected the number of images")
    names = lines[1].split()
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{str(path)!r}, line 2: expected distinct attribute names, got {names}")
    ncol = len(names) + 1
    files: list[str] = []
    rows: list[list[bool]] = []
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != ncol:
            raise ValueError(f"{str(path)!r}, line {lineno}: {len(parts)} columns; expected {ncol} "
                             f"(file name and {len(names)} attribute values)")
        vals = parts[1:]
        if not _LABEL_TOKENS.issuperset(vals):
            c = next(i for i, v in enumerate(vals) if v not in _LABEL_TOKENS)
            raise ValueError(f"{str(path)!r}, line {lineno}: attribute {names[c]!r} has value {vals[c]!r}; "
                             "expected -1 or 1")
        files.append(parts[0])
        rows.append([v == "1" for v in vals])
    if int(head[0]) != len(files):
        raise ValueError(f"{str(path)!r}: line 1 announces {head[0]} images but {len(files)} rows follow")
    dup = _first_duplicate(files)
    if dup is not None:
        raise ValueError(f"{str(path)!r}: image {dup!r} is listed twice; expected one row per image")
    positive = np.array(rows, dtype=bool).reshape(len(files), len(names))
    return names, files, np.where(positive, 1, -1).astype(np.int8)


def read_partition_file(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Parse ``list_eval_partition.txt`` into (image file names, split codes 0/1/2)."""
    path = Path(path)
    files: list[str] = []
    codes: list[int] = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"{str(path)!r}, line {lineno}: {line.strip()!r}; expected 'file 0|1|2' "
                             "(0 = train, 1 = val, 2 = test)")
        files.append(parts[0])
        codes.append(int(parts[1]))
    return files, np.asarray(codes, dtype=np.int64)


def resolve_attributes(attributes: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """``"celeba9"`` / ``"celeba40"`` / explicit names -> attribute names, each checked against the file."""
    if isinstance(attributes, str):
        if attributes in ATTRIBUTE_SETS:
            chosen = list(ATTRIBUTE_SETS[attributes])
        elif attributes in available:
            chosen = [attributes]
        else:
            raise ValueError(f"unknown CelebA attribute or attribute set {attributes!r}; expected one of "
                             f"{sorted(ATTRIBUTE_SETS)}, a list of attribute names, or one of {list(available)}")
    else:
        chosen = [str(a) for a in attributes]
    if not chosen:
        raise ValueError("data.attributes is empty; expected at least one CelebA attribute")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"data.attributes repeats a name: {chosen}")
    unknown = [a for a in chosen if a not in available]
    if unknown:
        raise ValueError(f"unknown CelebA attribute(s) {unknown}; valid names are {list(available)}")
    return chosen


def preprocess_images(images: Sequence[np.ndarray], image_size: int) -> Tensor:
    """uint8 (H, W, 3) images -> uint8 (N, 3, S, S): [0, 1] floats, bilinear without antialiasing, rounded."""
    out = torch.empty((len(images), 3, image_size, image_size), dtype=torch.uint8)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, a in enumerate(images):
        by_shape[a.shape].append(i)
    for idx in by_shape.values():
        x = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2).float().div_(255.0)
        y = resize_bilinear(x, (image_size, image_size), antialias=False)
        out[idx] = y.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out


class UInt8ImageDataset(TensorTaskDataset):
    """A :class:`TensorTaskDataset` whose images are stored as ``uint8`` (possibly memory-mapped)
    and are yielded as float32 in [0, 1]; batched indexing works as in the parent class."""

    def __getitem__(self, index: Any) -> tuple[Tensor, dict[str, Tensor]]:
        x, targets = super().__getitem__(index)
        return x.float().div_(255.0), targets


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/taskgrouping`` (default ``~/.cache/taskgrouping``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "taskgrouping"


def _is_writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _manifest_key(paths: Sequence[Path], image_size: int) -> str:
    h = hashlib.sha256(f"celeba-cache v{_CACHE_FORMAT} size={image_size}\n".encode())
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"image file {str(p)!r} (listed in list_eval_partition.txt) does not "
                                    "exist") from None
        h.update(f"{p.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _open_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.shape == shape and arr.dtype == np.uint8 else None


def _write_cache(path: Path, paths: Sequence[Path], image_size: int) -> None:
    shape = (len(paths), 3, image_size, image_size)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npy", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                tqdm(total=len(paths), desc=f"decoding CelebA to {image_size}x{image_size}", disable=None) as bar:
            for start in range(0, len(paths), _DECODE_CHUNK):
                chunk = paths[start:start + _DECODE_CHUNK]
                mm[start:start + len(chunk)] = preprocess_images(list(pool.map(read_rgb, chunk)), image_size).numpy()
                bar.update(len(chunk))
        mm.flush()
        del mm
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_images(paths: Sequence[Path], image_size: int, cache_dirs: Sequence[Path]) -> tuple[np.ndarray, Path]:
    """The preprocessed ``uint8`` (N, 3, S, S) images of ``paths`` (memory-mapped) and the cache file.

    An existing valid cache in any of ``cache_dirs`` is reused; otherwise the images are decoded
    into the first writable directory.
    """
    key = _manifest_key(paths, image_size)
    name = f"celeba_{image_size}px_{len(paths)}img_{key}.npy"
    shape = (len(paths), 3, image_size, image_size)
    for d in cache_dirs:
        arr = _open_cache(d / name, shape)
        if arr is not None:
            return arr, d / name
    for d in cache_dirs:
        if _is_writable_dir(d):
            _write_cache(d / name, paths, image_size)
            arr = _open_cache(d / name, shape)
            if arr is None:
                raise OSError(f"cache file {str(d / name)!r} was written but cannot be read back")
            return arr, d / name
    raise OSError(f"no writable cache directory among {[str(d) for d in cache_dirs]}; set data.cache_dir to "
                  "a writable directory")


@register_dataset("celeba")
def celeba(root: str | None = None, attributes: str | Sequence[str] = "celeba9", image_size: int = 64,
           max_per_split: int | None = None, cache_dir: str | None = None) -> TaskData:
    """CelebA attribute tasks from the official files under ``root`` (see the module docstring).

    Args:
        root: directory holding the official files (or a ``celeba/`` folder with them).
        attributes: ``"celeba9"`` (TAG/DMTG), ``"celeba40"`` or a list of attribute names.
        image_size: side of the square network input (64 in TAG and DMTG).
        max_per_split: keep only the first ``n`` images of each split (quick runs).
        cache_dir: where the decoded images are cached; by default ``<root>/.taskgrouping_cache``
            when writable, else ``~/.cache/taskgrouping/celeba``.
    """
    if not root:
        raise ValueError("data.root is required for data.name=celeba (the folder with img_align_celeba/, "
                         "list_attr_celeba.txt and list_eval_partition.txt)")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"data.image_size must be a positive integer, got {image_size!r}")
    if max_per_split is not None and (not isinstance(max_per_split, int) or max_per_split < 1):
        raise ValueError(f"data.max_per_split must be a positive integer or null, got {max_per_split!r}")
    files = find_celeba(root)
    names, attr_files, values = read_attribute_file(files.attributes)
    chosen = resolve_attributes(attributes, names)
    part_files, codes = read_partition_file(files.partition)
    row_of = {f: i for i, f in enumerate(attr_files)}
    listed = set(part_files)
    dup = _first_duplicate(part_files)
    if dup is not None:
        raise ValueError(f"{str(files.partition)!r}: image {dup!r} is listed twice; expected one line per image")
    missing = [f for f in part_files if f not in row_of]
    if missing:
        raise ValueError(f"{str(files.partition)!r} lists {missing[0]!r} ({len(missing)} such images), which has "
                         f"no row in {str(files.attributes)!r}; expected the same images in both files")
    extra = [f for f in attr_files if f not in listed]
    if extra:
        raise ValueError(f"{str(files.attributes)!r} has image {extra[0]!r} ({len(extra)} such images), which is "
                         f"missing from {str(files.partition)!r}; expected the same images in both files")

    split_files: dict[str, list[str]] = {}
    for code, split in enumerate(SPLITS):
        chosen_files = [f for f, c in zip(part_files, codes) if c == code]
        split_files[split] = chosen_files[:max_per_split] if max_per_split else chosen_files
    ordered = [f for split in SPLITS for f in split_files[split]]
    paths = [files.images / f for f in ordered]

    if cache_dir is not None:
        dirs = [Path(cache_dir).expanduser()]
    else:
        dirs = [files.base / ".taskgrouping_cache", user_cache_dir() / "celeba"]
    images, cache_file = cached_images(paths, image_size, dirs)
    x_all = torch.from_numpy(images)

    cols = [names.index(a) for a in chosen]
    labels = torch.from_numpy((values[[row_of[f] for f in ordered]][:, cols] > 0).astype(np.int64))
    datasets, start = {}, 0
    for split in SPLITS:
        stop = start + len(split_files[split])
        datasets[split] = UInt8ImageDataset(x_all[start:stop],
                                            {a: labels[start:stop, j].clone() for j, a in enumerate(chosen)})
        start = stop
    tasks = [Task(a, "binary") for a in chosen]
    info = {"root": str(files.base), "attributes": chosen, "image_size": image_size,
            "max_per_split": max_per_split, "cache_file": str(cache_file),
            "split_sizes": {s: len(split_files[s]) for s in SPLITS},
            "preprocessing": "whole image, bilinear align_corners=False antialias=False, [0,1], uint8 cache"}
    return TaskData(name="celeba", tasks=tasks, train=datasets["train"], val=datasets["val"],
                    test=datasets["test"], input_shape=(3, image_size, image_size), info=info)
