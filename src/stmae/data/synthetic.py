"""The built-in demo set: real texture photos with drawn defects and exact masks.

Why this set: the demo must run offline, on any machine, with no download and no licence
question. scikit-image ships three real texture photographs (brick, grass, gravel; public
domain / CC0). Good crops come from the top 65% of each photo and test crops from the bottom
35%, so no test pixel was seen in training, while both come from the same surface. Inside the
top band, training crops use the left 75% of the columns and validation crops (which set the
decision threshold) the right 25%: random crops of one region overlap heavily, and a held-out
crop that shares pixels with training crops would score too low and make the threshold too
strict.

Defects are drawn with PIL into a separate mask layer first and then painted through that
mask, so the ground truth is exact by construction. Five types, as on real inspection
lines: scratch, hole, stain, cut, foreign_object.

The set is written in the MVTec AD layout (plus ``validation/`` beside it), so the demo
exercises the same loader that real benchmarks use.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..fileio import atomic_write

TEXTURES = ("brick", "grass", "gravel")
DEFECT_TYPES = ("scratch", "hole", "stain", "cut", "foreign_object")
TRAIN_ROWS = 0.65  # share of each photo's rows reserved for training and validation crops
TRAIN_COLS = 0.75  # inside those rows, training crops use these columns, validation the rest


@dataclass(frozen=True)
class DemoSpec:
    """Size of the generated set (per texture)."""

    crop: int = 128
    train_per_texture: int = 40
    val_per_texture: int = 10
    good_test_per_texture: int = 8
    defects_per_type: int = 2  # per texture and defect type
    seed: int = 0


def texture_photo(name: str) -> np.ndarray:
    """One of scikit-image's texture photos as uint8 (512, 512) grayscale."""
    from skimage import data as skdata

    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; choose from {TEXTURES}")
    return np.asarray(getattr(skdata, name)(), dtype=np.uint8)


def random_crop(
    photo: np.ndarray,
    rows: tuple[int, int],
    size: int,
    rng: np.random.Generator,
    cols: tuple[int, int] | None = None,
) -> np.ndarray:
    """A size x size RGB uint8 crop inside ``rows`` x ``cols`` (each [start, stop)), random flip."""
    cols = cols or (0, photo.shape[1])
    top = int(rng.integers(rows[0], rows[1] - size + 1))
    left = int(rng.integers(cols[0], cols[1] - size + 1))
    crop = photo[top : top + size, left : left + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.repeat(crop[:, :, None], 3, axis=2).copy()


# ---------------------------------------------------------------------- defect painters
# Each painter draws its shape into a blank "L" mask with ImageDraw, then returns the mask
# and the colour to paint; ``paint`` blends that colour into the image through the mask.

def _point(rng: np.random.Generator, size: int, margin: int) -> tuple[float, float]:
    return float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))


def _polyline(rng: np.random.Generator, size: int, length: float, turns: int) -> list[tuple[float, float]]:
    x, y = _point(rng, size, size // 4)
    angle = rng.uniform(0, 2 * np.pi)
    pts = [(x, y)]
    for _ in range(turns):
        angle += rng.normal(0, 0.35)
        x += np.cos(angle) * length / turns
        y += np.sin(angle) * length / turns
        pts.append((float(np.clip(x, 2, size - 3)), float(np.clip(y, 2, size - 3))))
    return pts


def _scratch(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    draw.line(_polyline(rng, size, rng.uniform(0.4, 0.6) * size, 4), fill=255, width=int(rng.integers(3, 5)))
    level = 0.95 if rng.random() < 0.5 else 0.05
    return (level, level, level)


def _hole(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    cx, cy = _point(rng, size, size // 6)
    rx, ry = rng.uniform(0.06, 0.1, size=2) * size
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return (0.03, 0.03, 0.03)


def _stain(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    cx, cy = _point(rng, size, size // 4)
    for _ in range(int(rng.integers(3, 6))):
        ox, oy = rng.normal(0, 0.05 * size, size=2)
        r = rng.uniform(0.06, 0.1) * size
        draw.ellipse([cx + ox - r, cy + oy - r, cx + ox + r, cy + oy + r], fill=255)
    return (0.55, 0.33, 0.12)  # rust brown


def _cut(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    (x0, y0), (x1, y1) = _polyline(rng, size, rng.uniform(0.3, 0.45) * size, 1)
    nx, ny = -(y1 - y0), x1 - x0
    norm = max(1e-6, float(np.hypot(nx, ny)))
    w = rng.uniform(3.0, 5.0)
    nx, ny = nx / norm * w, ny / norm * w
    mid = ((x0 + x1) / 2, (y0 + y1) / 2)
    draw.polygon([(x0, y0), (mid[0] + nx, mid[1] + ny), (x1, y1), (mid[0] - nx, mid[1] - ny)], fill=255)
    return (0.0, 0.0, 0.0)


def _foreign_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    cx, cy = _point(rng, size, size // 6)
    n = int(rng.integers(5, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.06, 0.11, n) * size
    draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)], fill=255)
    palette = [(0.85, 0.15, 0.1), (0.1, 0.35, 0.85), (0.95, 0.8, 0.1), (0.15, 0.7, 0.2)]
    return palette[int(rng.integers(len(palette)))]


PAINTERS: dict[str, Callable[[ImageDraw.ImageDraw, np.random.Generator, int], tuple[float, float, float]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "cut": _cut,
    "foreign_object": _foreign_object,
}


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` into a uint8 (S, S, 3) image.

    Returns (defective image uint8 (S, S, 3), mask bool (S, S)); the mask is exactly the
    painted pixels. Colours are blended (opacity 0.85-0.95) so texture shows through a little.
    """
    size = image.shape[0]
    layer = Image.new("L", (image.shape[1], size), 0)
    colour = PAINTERS[kind](ImageDraw.Draw(layer), rng, size)
    mask = np.asarray(layer) > 127
    out = image.astype(np.float32) / 255.0
    alpha = rng.uniform(0.85, 0.95)
    noise = rng.normal(0, 0.03, size=out.shape).astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * (np.asarray(colour, np.float32) + noise[mask])
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8), mask


def make_demo_dataset(out_dir: str | os.PathLike, spec: DemoSpec = DemoSpec()) -> Path:
    """Write the demo set to ``out_dir/textures`` in the MVTec AD layout and return that path.

    Layout: ``train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>/<n>_mask.png``,
    plus ``validation/good`` (good crops for the threshold, see the module notes).
    Deterministic in ``spec.seed``. An existing ``textures`` folder is replaced.
    """
    root = Path(out_dir) / "textures"
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(spec.seed)
    counters: dict[str, int] = {}

    def save(img: np.ndarray, split: str, kind: str, mask: np.ndarray | None = None) -> None:
        idx = counters[f"{split}/{kind}"] = counters.get(f"{split}/{kind}", -1) + 1
        _save_png(root / split / kind / f"{idx:03d}.png", img)
        if mask is not None:
            _save_png(root / "ground_truth" / kind / f"{idx:03d}_mask.png", mask.astype(np.uint8) * 255)

    for name in TEXTURES:
        photo = texture_photo(name)
        cut = int(photo.shape[0] * TRAIN_ROWS)
        train_rows, test_rows = (0, cut), (cut, photo.shape[0])
        split_col = int(photo.shape[1] * TRAIN_COLS)
        for _ in range(spec.train_per_texture):
            save(random_crop(photo, train_rows, spec.crop, rng, (0, split_col)), "train", "good")
        for _ in range(spec.val_per_texture):
            save(random_crop(photo, train_rows, spec.crop, rng, (split_col, photo.shape[1])), "validation", "good")
        for _ in range(spec.good_test_per_texture):
            save(random_crop(photo, test_rows, spec.crop, rng), "test", "good")
        for kind in DEFECT_TYPES:
            for _ in range(spec.defects_per_type):
                img, mask = draw_defect(random_crop(photo, test_rows, spec.crop, rng), kind, rng)
                save(img, "test", kind, mask)
    return root


def _save_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
