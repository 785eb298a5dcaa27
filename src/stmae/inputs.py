"""Everything a user may hand to ``predict`` (and ``fit``), turned into a flat list of items.

Why one place: ``fit``, ``predict``, ``iter_predict``, the CLI and the service must accept
the same things and name the same item in an error. Accepted:

- a path to an image file, or a folder (searched recursively, hidden files skipped);
- a PIL image;
- a numpy array: ``(H, W)``, ``(H, W, 1|3|4)`` (uint8, uint16 or float in [0, 1]), or a batch
  ``(N, H, W, C)`` (and ``(N, H, W)`` grayscale when the last axis is not 1, 3 or 4);
- a torch tensor: ``(C, H, W)`` or ``(N, C, H, W)`` with C = 1 or 3 (uint8, or float in
  [0, 1]), or ``(H, W)``;
- a list (or any iterable) of the above.

Items are described without decoding anything: a folder of 100,000 files costs a list of
paths, and each image is decoded only when its batch is scored (in worker threads).

Torch-free on purpose: tensors are recognised by duck typing, so the runtime of an
exported model uses this module too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .data.io import DataError, as_rgb, list_images


@dataclass(frozen=True)
class Item:
    """One image to score: ``name`` for messages and CSV rows, ``source`` to decode lazily."""

    name: str
    source: Any  # a Path, a PIL image or a numpy array
    is_path: bool


def _is_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach") and hasattr(obj, "numpy")


def _tensor_images(t: Any, name: str) -> list[np.ndarray]:
    """A torch tensor (C,H,W) / (N,C,H,W) / (H,W) -> list of numpy (H, W[, C]) arrays."""
    arr = t.detach().cpu()
    if str(arr.dtype) in ("torch.bfloat16", "torch.float16"):
        arr = arr.float()
    a = arr.numpy()
    if a.ndim == 2:
        return [a]
    if a.ndim == 3 and a.shape[0] in (1, 3):
        return [np.moveaxis(a, 0, -1)]
    if a.ndim == 4 and a.shape[1] in (1, 3):
        return [np.moveaxis(x, 0, -1) for x in a]
    raise DataError(f"{name}: tensor of shape {tuple(a.shape)}; expected (C, H, W), (N, C, H, W) with C = 1 or 3, or (H, W)")


def _array_images(a: np.ndarray, name: str) -> list[np.ndarray]:
    if a.ndim == 4:
        return list(a)
    if a.ndim == 3 and a.shape[2] not in (1, 3, 4):
        return list(a)  # (N, H, W) grayscale batch
    if a.ndim in (2, 3):
        return [a]
    raise DataError(f"{name}: array of shape {a.shape}; expected (H, W), (H, W, C) or a batch (N, H, W, C)")


def expand(images: Any) -> list[Item]:
    """Flatten ``images`` (see the module docstring) into :class:`Item` s, in order.

    Raises DataError for a missing path, an empty folder or an unsupported object, naming it.
    """
    single = isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) or _is_tensor(images)
    out: list[Item] = []
    for index, obj in enumerate([images] if single else images):
        out.extend(_expand_one(obj, index))
    return out


def _expand_one(obj: Any, index: int) -> Iterator[Item]:
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if p.is_dir():
            found = list_images(p, recursive=True)
            if not found:
                raise DataError(f"{p}: folder contains no images")
            for f in found:
                yield Item(str(f), f, True)
        elif p.exists():
            yield Item(str(p), p, True)
        else:
            raise DataError(f"{p}: no such file or folder")
    elif isinstance(obj, Image.Image):
        yield Item(f"<image {index}>", obj, False)
    elif isinstance(obj, np.ndarray):
        arrays = _array_images(obj, f"<array {index}>")
        for j, a in enumerate(arrays):
            yield Item(f"<array {index}>" if len(arrays) == 1 and a is obj else f"<array {index}[{j}]>", a, False)
    elif _is_tensor(obj):
        arrays = _tensor_images(obj, f"<tensor {index}>")
        for j, a in enumerate(arrays):
            yield Item(f"<tensor {index}[{j}]>" if len(arrays) > 1 else f"<tensor {index}>", a, False)
    else:
        raise DataError(
            f"input {index}: {type(obj).__name__} is not an image; give paths, folders, PIL images, numpy arrays or tensors"
        )


def load_rgb(item: Item, max_pixels: int | None = None, reduce_to: int | None = None) -> np.ndarray:
    """Decode ``item`` as uint8 (H, W, 3) RGB. DataError (naming the item) for anything unusable.

    ``reduce_to``: see :func:`stmae.data.io.read_image` (large JPEG files decode at a reduced scale).
    """
    try:
        if max_pixels is None:
            arr = as_rgb(item.source, reduce_to=reduce_to)
        else:
            arr = as_rgb(item.source, max_pixels=max_pixels, reduce_to=reduce_to)
    except DataError as exc:
        msg = str(exc)
        raise DataError(msg if item.name in msg else f"{item.name}: {msg}") from None
    except (OSError, ValueError, MemoryError, Image.DecompressionBombError) as exc:
        raise DataError(f"{item.name}: cannot read the image ({type(exc).__name__}: {exc})") from None
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"{item.name}: image has no pixels ({arr.shape[1]}x{arr.shape[0]})")
    return arr


__all__ = ["Item", "expand", "load_rgb"]
