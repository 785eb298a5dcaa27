"""How an image of any size becomes model inputs, and how their maps become one map again.

Why one place: the fit, ``predict`` on every engine (torch and the exported runtimes),
``test`` and the service must cut an image the same way and stitch the same map, or a
model would be scored on inputs it was not fitted on. The geometry is fit-time
(``features.geometry`` and friends, locked on a fitted model) and travels in the run
folder's config and in an export's metadata, so nothing more is said at predict time.
Torch-free: the runtime of an exported model tiles and stitches with this module.

Three geometries, for a model whose input side is S (``features.image_size``):

- ``resize``: the whole image squeezed to S x S (the aspect ratio is lost). One input per
  image; the map is S x S.
- ``aspect``: the image scaled so its shorter side is S, keeping the aspect ratio, then
  cut into S x S tiles along the longer side.
- ``tile``: the image scaled by ``features.scale``, then cut into tiles of side
  ``features.tile`` (0: S), each resized to S x S when the two differ.

Tiles overlap by at least ``features.tile_overlap`` of their side; their positions are spread
evenly so the last one ends at the image's edge (sizes that do not divide evenly need no
padding). A side shorter than one tile is padded by mirroring, and the padding is cropped
off the map again. Tile maps are stitched by a weighted mean whose weights ramp down over
the overlap (no seams); a tiled image's score is the largest of its tiles' scores, i.e. the
maximum of the score map stitched by maximum (the score map and the pixel map may read
different residuals, see :class:`~stmae.pipeline.MapPipeline`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .config import GEOMETRIES
from .data.transforms import resize_image
from .mapops import resize_map

#: uint8 (N, S, S, 3) images at the model size -> (maps (N, S, S), scores (N,)), numpy float32.
ScoreBatch = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class Layout:
    """Where one image's inputs sit: enough to stitch their maps back into the image's map.

    ``shape``: (h, w) of the map (the image after scaling; S x S for ``resize``);
    ``padded``: (h, w) of the canvas the tiles were cut from (``shape`` plus mirrored
    padding where a side is shorter than a tile); ``corners``: (top, left) of each tile on
    that canvas; ``tile``: the tile side on the canvas, in pixels.
    """

    shape: tuple[int, int]
    padded: tuple[int, int]
    corners: tuple[tuple[int, int], ...]
    tile: int

    @property
    def count(self) -> int:
        """How many model inputs the image became."""
        return len(self.corners)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``length`` >= ``tile`` pixels.

    The fewest tiles whose neighbours overlap by at least ``overlap`` x ``tile``, spread
    evenly from 0 to ``length - tile`` (so the last tile ends at the edge).
    """
    if length <= tile:
        return [0]
    stride = max(1, int(math.floor(tile * (1.0 - overlap))))
    n = int(math.ceil((length - tile) / stride)) + 1
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]


@dataclass(frozen=True)
class Geometry:
    """A fitted model's input geometry (module docstring). ``size``: the model input side S."""

    mode: str = "resize"
    size: int = 256
    tile: int = 0  # tile side on the scaled image (0 = size); ``tile`` mode only
    overlap: float = 0.25
    scale: float = 1.0  # ``tile`` mode: the image is scaled by this before tiling

    def __post_init__(self) -> None:
        if self.mode not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.mode!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile overlap must be in [0, 1), got {self.overlap}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_features(cls, features: Any) -> "Geometry":
        """From a :class:`~stmae.config.FeatureConfig` (or anything with its fields)."""
        return cls(
            mode=str(getattr(features, "geometry", "resize")),
            size=int(features.image_size),
            tile=int(getattr(features, "tile", 0) or 0),
            overlap=float(getattr(features, "tile_overlap", 0.25)),
            scale=float(getattr(features, "scale", 1.0)),
        )

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any] | None, size: int) -> "Geometry":
        """From a config as a dict (an export's metadata); ``resize`` for configs from before geometries."""
        features = dict((config or {}).get("features") or {})
        return cls(
            mode=str(features.get("geometry", "resize")),
            size=int(features.get("image_size", size)),
            tile=int(features.get("tile", 0) or 0),
            overlap=float(features.get("tile_overlap", 0.25)),
            scale=float(features.get("scale", 1.0)),
        )

    def to_dict(self) -> dict[str, Any]:
        """What a run's ``meta.json`` records under ``geometry``."""
        return {"mode": self.mode, "size": self.size, "tile": self.tile_side, "overlap": self.overlap,
                "scale": self.scale}

    # ------------------------------------------------------------------ properties
    @property
    def tiled(self) -> bool:
        """True when an image may become several inputs and its map keeps its aspect ratio."""
        return self.mode != "resize"

    @property
    def tile_side(self) -> int:
        """The tile side on the scaled image, in pixels."""
        return (self.tile or self.size) if self.mode == "tile" else self.size

    @property
    def reduce_to(self) -> int | None:
        """The smallest side a decoder may reduce a large JPEG to (None: decode at full size)."""
        return None if self.mode == "tile" else self.size

    # ------------------------------------------------------------------ geometry
    def map_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the map for an image of ``height`` x ``width`` pixels."""
        if self.mode == "resize":
            return (self.size, self.size)
        factor = self.size / min(height, width) if self.mode == "aspect" else self.scale
        return (max(1, int(round(height * factor))), max(1, int(round(width * factor))))

    def layout(self, height: int, width: int) -> Layout:
        """Where the tiles of an image of ``height`` x ``width`` pixels sit."""
        shape = self.map_shape(height, width)
        if self.mode == "resize":
            return Layout(shape, shape, ((0, 0),), self.size)
        t = self.tile_side
        padded = (max(shape[0], t), max(shape[1], t))
        rows = tile_starts(padded[0], t, self.overlap)
        cols = tile_starts(padded[1], t, self.overlap)
        return Layout(shape, padded, tuple((r, c) for r in rows for c in cols), t)

    def split(self, rgb: np.ndarray) -> tuple[np.ndarray, Layout]:
        """uint8 (H, W, 3) image -> (uint8 (T, S, S, 3) model inputs, their :class:`Layout`)."""
        layout = self.layout(int(rgb.shape[0]), int(rgb.shape[1]))
        if self.mode == "resize":
            return resize_image(rgb, self.size)[None], layout
        scaled = resize_image(rgb, layout.shape)
        pad_h, pad_w = layout.padded[0] - layout.shape[0], layout.padded[1] - layout.shape[1]
        if pad_h or pad_w:
            scaled = np.pad(scaled, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
        t = layout.tile
        tiles = [scaled[r : r + t, c : c + t] for r, c in layout.corners]
        if t != self.size:
            tiles = [resize_image(np.ascontiguousarray(x), self.size) for x in tiles]
        return np.stack(tiles), layout

    def stitch(self, maps: np.ndarray, layout: Layout) -> np.ndarray:
        """float (T, S, S) tile maps -> float32 (h, w) map of the image (``layout.shape``)."""
        if maps.shape[0] != layout.count:
            raise ValueError(f"{maps.shape[0]} tile maps for a layout of {layout.count} tiles")
        if self.mode == "resize":
            return np.asarray(maps[0], dtype=np.float32)
        t = layout.tile
        weight = _window(t, self.overlap)
        total = np.zeros(layout.padded, dtype=np.float64)
        norm = np.zeros(layout.padded, dtype=np.float64)
        for m, (r, c) in zip(maps, layout.corners):
            tile_map = np.asarray(m, dtype=np.float32)
            if tile_map.shape != (t, t):
                tile_map = resize_map(tile_map, (t, t))
            total[r : r + t, c : c + t] += weight * tile_map
            norm[r : r + t, c : c + t] += weight
        out = total / norm
        return out[: layout.shape[0], : layout.shape[1]].astype(np.float32)

    def image_score(self, tile_scores: np.ndarray) -> float:
        """One image's score from its tiles' scores: the largest (module docstring)."""
        return float(np.max(tile_scores))


def _window(tile: int, overlap: float) -> np.ndarray:
    """(tile, tile) stitching weights: 1 in the middle, ramping down linearly over the
    overlap towards each edge, never 0 (a pixel covered by one tile keeps its value)."""
    ramp = max(1, int(round(tile * overlap)))
    i = np.arange(tile)
    edge = np.minimum(i + 1, tile - i).astype(np.float64)
    w1 = np.minimum(edge / ramp, 1.0)
    return np.outer(w1, w1)


def score_split(
    score_batch: ScoreBatch,
    geometry: Geometry,
    parts: Sequence[tuple[np.ndarray, Layout]],
    batch_size: int,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Score images already cut by :meth:`Geometry.split`: tiles of all of them go through
    ``score_batch`` in batches of at most ``batch_size``, then each image's maps are
    stitched. Returns (one float32 map per image, float32 scores (N,))."""
    if not parts:
        return [], np.zeros(0, dtype=np.float32)
    tiles = [p[0] for p in parts]
    flat = np.concatenate(tiles) if len(tiles) > 1 else tiles[0]
    out_maps, out_scores = [], []
    for start in range(0, len(flat), max(1, batch_size)):
        m, s = score_batch(np.ascontiguousarray(flat[start : start + batch_size]))
        out_maps.append(np.asarray(m, dtype=np.float32))
        out_scores.append(np.asarray(s, dtype=np.float32).reshape(-1))
    return stitch_all(geometry, np.concatenate(out_maps), np.concatenate(out_scores), [p[1] for p in parts])


def stitch_all(
    geometry: Geometry, maps: np.ndarray, scores: np.ndarray, layouts: Sequence[Layout]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Tile maps (T, S, S) and scores (T,) of consecutive images -> (one map per image,
    scores (N,)), each image taking ``layout.count`` tiles in order."""
    total = sum(layout.count for layout in layouts)
    if total != len(maps) or total != len(scores):
        raise ValueError(f"{len(maps)} tile maps and {len(scores)} scores for layouts of {total} tiles")
    image_maps, image_scores = [], []
    offset = 0
    for layout in layouts:
        n = layout.count
        image_maps.append(geometry.stitch(maps[offset : offset + n], layout))
        image_scores.append(geometry.image_score(scores[offset : offset + n]))
        offset += n
    return image_maps, np.asarray(image_scores, dtype=np.float32)


__all__ = ["GEOMETRIES", "Geometry", "Layout", "ScoreBatch", "score_split", "stitch_all", "tile_starts"]
