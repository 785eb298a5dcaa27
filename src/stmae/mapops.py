"""Map post-processing in numpy alone, equal to the torch path.

Why: heat maps and full-resolution maps are made from a model-size map after scoring, by
the torch Detector and by the torch-free runtime of an exported model. Both call
:func:`resize_map`, which reproduces ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` (tested against it), so a map looks the same whichever engine made it.

The same resize and the Gaussian smoothing, written as matrices (:func:`resize_operator`,
:func:`blur_operator`), turn the whole model-size post-processing into two small matrix
products (``stmae.pipeline.postprocess``).
"""

from __future__ import annotations

import numpy as np


def _axis(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and weights of hi for one axis, as torch computes them."""
    # torch computes scale = in / out in float32, then scale * (i + 0.5) - 0.5 as one fused
    # multiply-add (exact, rounded once to float32), and the weight in float32. Doing the same
    # keeps maps within 2e-6 of F.interpolate at 1000 px instead of 3e-4 (tests/test_export.py).
    scale = np.float64(np.float32(in_size / out_size))
    src = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    lo = np.floor(src).astype(np.int64)
    lo = np.minimum(lo, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float (H, W) map to ``size`` = (height, width), as torch does it."""
    h, w = int(size[0]), int(size[1])
    m = np.asarray(amap, dtype=np.float32)
    if m.shape == (h, w):
        return m.copy()
    y0, y1, wy = _axis(h, m.shape[0])
    x0, x1, wx = _axis(w, m.shape[1])
    top = m[y0][:, x0] * (1 - wx) + m[y0][:, x1] * wx
    bottom = m[y1][:, x0] * (1 - wx) + m[y1][:, x1] * wx
    return (top * (1 - wy)[:, None] + bottom * wy[:, None]).astype(np.float32)


def resize_operator(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of the bilinear resize along one axis (:func:`_axis`)."""
    lo, hi, w = _axis(out_size, in_size)
    op = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(op, (rows, lo), 1.0 - w.astype(np.float64))
    np.add.at(op, (rows, hi), w.astype(np.float64))
    return op


def blur_radius(sigma: float) -> int:
    """Kernel radius of the map's Gaussian smoothing: 4 sigma, rounded, at least 1."""
    return max(1, int(4.0 * sigma + 0.5))


def blur_operator(size: int, sigma: float, reflect: bool = True) -> np.ndarray:
    """(size, size) float64 matrix of the 1-D Gaussian smoothing of ``stmae.pipeline.gaussian_blur``:
    kernel radius :func:`blur_radius`, border ``reflect`` (mirror without repeating the edge) or replicate."""
    if sigma <= 0:
        return np.eye(size)
    radius = blur_radius(sigma)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    op = np.zeros((size, size))
    for i in range(size):
        src = i + offsets
        if reflect:
            src = np.abs(src)
            src = np.where(src > size - 1, 2 * (size - 1) - src, src)
        src = np.clip(src, 0, size - 1)
        np.add.at(op[i], src, kernel)
    return op


__all__ = ["blur_operator", "blur_radius", "resize_map", "resize_operator"]
