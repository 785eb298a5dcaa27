"""Resizing and tensor conversion with numpy, PIL and torch only (no torchvision).

torch is imported only inside :func:`to_tensor_batch`: resizing is shared with the torch-free
runtime of exported models (:mod:`stmae.runtime`), which must give the graph the very same
pixels.

Every image in the project is resized by :func:`resize_image`, so training, evaluation
and inference see identical interpolation; a model evaluated with a different resize
than it was trained with loses accuracy for no visible reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = ["resize_image", "resize_mask", "to_tensor_batch"]

Size = int | tuple[int, int]


def _hw(size: Size) -> tuple[int, int]:
    """Normalise ``size`` to ``(height, width)``; tuples are (H, W) like numpy shapes."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    h, w = int(h), int(w)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def resize_image(img: np.ndarray, size: Size) -> np.ndarray:
    """Resize a uint8 ``(H, W, 3)`` (or ``(H, W)``) image with PIL bilinear filtering.

    PIL's bilinear filter widens its support when shrinking, i.e. it antialiases,
    which keeps fine textures from aliasing into fake anomalies. ``size`` is an int for
    a square output or ``(height, width)``.
    """
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"resize_image expects uint8 (H, W) or (H, W, C), got {img.dtype} {img.shape}")
    h, w = _hw(size)
    if img.shape[:2] == (h, w):
        return img.copy()
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """Resize a bool ``(H, W)`` mask with nearest-neighbour, so it stays strictly binary."""
    if mask.ndim != 2:
        raise ValueError(f"resize_mask expects a 2-D mask, got shape {mask.shape}")
    h, w = _hw(size)
    as_u8 = mask.astype(np.uint8) * 255
    return np.asarray(Image.fromarray(as_u8).resize((w, h), Image.Resampling.NEAREST)) > 127


def to_tensor_batch(images: Sequence[np.ndarray]) -> "torch.Tensor":
    """Stack uint8 ``(H, W, 3)`` images into a float32 ``(N, 3, H, W)`` tensor in ``[0, 1]``.

    No normalisation here: mean/std belong to the backbone that consumes the batch.
    """
    import torch

    if len(images) == 0:
        raise ValueError("to_tensor_batch needs at least one image")
    first = images[0].shape
    for i, img in enumerate(images):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image {i}: expected uint8 (H, W, 3), got {img.dtype} {img.shape}")
        if img.shape != first:
            raise ValueError(f"image {i} has shape {img.shape} but image 0 has {first}; resize with resize_image first")
    batch = torch.from_numpy(np.stack(images))  # (N, H, W, 3) uint8, one copy
    return batch.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
