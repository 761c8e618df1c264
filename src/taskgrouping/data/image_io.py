"""Reading the image and array files of real datasets, with errors that name the file at fault.

Shared by the CelebA, Taskonomy and NYUv2 loaders. Every reader returns a NumPy array in the file's
own units (``uint8`` / ``uint16`` / the ``.npy`` dtype); normalisation is the loaders' business.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

#: Errors Pillow raises on unreadable, truncated or malformed files.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def _open_decoded(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                return im.copy()
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as exc:
        raise ValueError(f"cannot decode image {str(path)!r}: {exc}; expected a valid image file") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """An image as ``uint8`` (H, W, 3); grayscale or RGBA files are converted to RGB."""
    im = _open_decoded(Path(path))
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise ValueError(f"image {str(path)!r} has mode {im.mode!r} (16-bit or float); expected an 8-bit image")
    return np.array(im.convert("RGB"))


def read_gray_uint8(path: str | Path) -> np.ndarray:
    """An 8-bit single-channel image (e.g. a label map) as ``uint8`` (H, W), values untouched.

    Palette (``P``) images give their palette indices, which is how label maps are often stored.
    """
    im = _open_decoded(Path(path))
    if im.mode not in ("L", "P"):
        raise ValueError(f"image {str(path)!r} has mode {im.mode!r}; expected an 8-bit single-channel "
                         "('L' or 'P') PNG")
    return np.array(im)


def read_gray_uint16(path: str | Path) -> np.ndarray:
    """A 16-bit single-channel PNG read as *unsigned* ``uint16`` (H, W).

    Pillow opens such files as mode ``I;16`` (or ``I`` in old versions, as int32); both are mapped
    to ``uint16`` without any sign reinterpretation, so 65535 stays 65535.
    """
    im = _open_decoded(Path(path))
    if im.mode in ("I;16", "I;16L", "I;16B"):
        return np.array(im).astype(np.uint16, copy=False)
    if im.mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"image {str(path)!r} has values outside 0..65535; expected a 16-bit PNG")
        return a.astype(np.uint16)
    raise ValueError(f"image {str(path)!r} has mode {im.mode!r}; expected a 16-bit single-channel PNG "
                     "(mode 'I;16')")


def npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file, read from its header only (no data, no unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy version {version}")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable .npy file: {exc}") from None
    if dtype.hasobject:
        raise ValueError(f"{str(path)!r} holds Python objects (dtype {dtype}); expected a numeric array")
    return tuple(int(s) for s in shape), dtype


def load_npy(path: str | Path) -> np.ndarray:
    """A numeric ``.npy`` array; never unpickles (``allow_pickle=False``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file {str(path)!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as a numeric .npy array: {exc}") from None


def resize_bilinear(x: Tensor, size: tuple[int, int], antialias: bool) -> Tensor:
    """Bilinear resize (half-pixel centres, ``align_corners=False``) of (C, H, W) or (N, C, H, W) floats.

    ``antialias=False`` is TensorFlow's ``tf.image.resize`` default (used by TAG and DMTG for
    CelebA); ``antialias=True`` widens the kernel when shrinking, as Pillow's BILINEAR does.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    batched = x.dim() == 4
    y = F.interpolate(x if batched else x.unsqueeze(0), size=tuple(size), mode="bilinear",
                      align_corners=False, antialias=antialias)
    return y if batched else y.squeeze(0)


def resize_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a (H, W) or (C, H, W) map (label ids stay label ids)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = x.float().reshape((1,) * (4 - x.dim()) + tuple(x.shape))
    y = F.interpolate(y, size=tuple(size), mode="nearest-exact")
    return y.reshape(tuple(x.shape[:-2]) + tuple(size)).to(x.dtype)


def to_chw_float(a: np.ndarray, scale: float = 1.0) -> Tensor:
    """(H, W) or (H, W, C) array -> float32 (C, H, W) tensor multiplied by ``scale``."""
    t = torch.from_numpy(np.ascontiguousarray(a)).float()
    t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    return t.mul_(scale) if scale != 1.0 else t.contiguous()
