"""Fitting what scoring needs besides the transformer: residual statistics, the memory bank
and the calibration, into the fitted scoring module (:class:`~stmae.pipeline.MapPipeline`).

Why separate from :mod:`stmae.train`: research scripts refit these parts on cached features
without training, and they must use exactly the code ``fit`` uses. Why on the pipeline and
not on a :class:`~stmae.infer.Detector`: fitting fills in the fitted module, and the
inference object is made from it afterwards; this module never imports :mod:`stmae.infer`.
Every statistic is measured through the pipeline's own stages, so it describes exactly the
residuals and maps that will be scored.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .geometry import Geometry, Layout, stitch_all
from .model import PatchMemory, ResidualAccumulator, ResidualStats
from .model.memory import coreset_bank
from .pipeline import MapPipeline
from .thresholds import MIN_CALIBRATION_IMAGES, Calibration, calibrate


def _device(pipe: MapPipeline) -> torch.device:
    return pipe.feature_stats.mean.device


def _residual_pipeline(pipe: MapPipeline, plain: bool = False) -> MapPipeline:
    """A pipeline over the same parts (shared, not copied) that scores without the memory.

    ``plain`` (or Mahalanobis without statistics yet) swaps the residual for ``mse``: for
    reconstructions, which do not depend on it.
    """
    cfg = copy.deepcopy(pipe.config).unlock()
    kind = cfg.infer.residual
    if plain or (kind == "mahalanobis" and pipe.residual_stats is None):
        kind = "mse"
    cfg.infer = dataclasses.replace(cfg.infer, residual=kind, distance_weight=0.0)
    stats = pipe.residual_stats if kind == "mahalanobis" else None
    return MapPipeline(pipe.extractor, pipe.model, pipe.feature_stats, cfg, None, stats)


@torch.no_grad()
def fit_residual_stats(pipe: MapPipeline, feats: torch.Tensor, quiet: bool = True) -> ResidualStats:
    """Mahalanobis residual statistics from raw features of good images, over the same K split pairs as scoring."""
    plain = _residual_pipeline(pipe, plain=True)
    acc = ResidualAccumulator(feats.shape[1])
    chunks = torch.split(feats, pipe.infer.batch_size)
    for chunk in tqdm(chunks, desc="residual stats", unit="batch", disable=quiet, leave=False):
        acc.add(*plain.reconstructions(plain.standardize(chunk.to(_device(pipe)))))
    return acc.finish(pipe.config.fit.shrinkage).to(_device(pipe))


@torch.no_grad()
def fit_memory(
    pipe: MapPipeline, train_feats: torch.Tensor, calib_feats: torch.Tensor, seed: int = 42, quiet: bool = True
) -> PatchMemory:
    """The memory bank from raw features of good training images, its blend statistics from
    good calibration images.

    The scales of the pixel map's residual (``infer.pixel_residual``) come from the same images.
    The coreset ratio is ``fit.bank_coreset``; selection runs on the pipeline's device.
    """
    res = _residual_pipeline(pipe)
    memory = PatchMemory(_bank(pipe, train_feats, seed, quiet))
    residuals, pixel_residuals, distances = [], [], []
    for chunk in torch.split(calib_feats, pipe.infer.batch_size):
        c = res.standardize(chunk.to(_device(pipe)))
        score, pixel = res.residuals(c)
        residuals.append(score)
        pixel_residuals.append(pixel)
        distances.append(memory.distances(c))
    # The pixel map's residual gets its own scale where it is another residual (infer.pixel_residual).
    infer = pipe.infer
    own_pixel = infer.pixel_residual not in ("same", infer.residual)
    memory.calibrate(torch.cat(residuals), torch.cat(distances), torch.cat(pixel_residuals) if own_pixel else None)
    return memory


def _bank(pipe: MapPipeline, raw_feats: torch.Tensor, seed: int, quiet: bool) -> torch.Tensor:
    """The coreset bank (ratio ``fit.bank_coreset``) of raw features, standardised, on the pipeline's device."""
    x = pipe.standardize(raw_feats.to(_device(pipe)))
    return coreset_bank(x, pipe.config.fit.bank_coreset, seed=seed, quiet=quiet)


@torch.no_grad()
def bank_held_out_images(
    pipe: MapPipeline, train_feats: torch.Tensor, held_out_feats: torch.Tensor, seed: int = 42, quiet: bool = True
) -> PatchMemory:
    """Rebuild the memory bank over the training *and* the held-out good images, after calibration.

    Why: the held-out images are good images like any other, and PatchCore banks every one
    it is given (docs/research.md, "Round 2, step 3"). The blend's
    medians and quantile ranges, and the thresholds set from the held-out scores, stay those
    measured while the images were unseen: a good image scores at most as high against the
    larger bank, so the thresholds err towards fewer false alarms.
    """
    memory = pipe.memory
    if memory is None:
        raise ValueError("the pipeline has no memory bank to extend")
    memory.bank = _bank(pipe, torch.cat([train_feats, held_out_feats]), seed, quiet)
    return memory


def score_cached_images(
    pipe: MapPipeline, feats: torch.Tensor, layouts: Sequence[Layout] | None = None
) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """Raw cached features -> (maps, image scores) as numpy, per image: with ``layouts``
    (one per image, :mod:`stmae.geometry`) the tiles' maps are stitched and their scores
    combined exactly as ``predict`` does; without, one feature grid is one image."""
    maps, scores = pipe.score_cached(feats)
    if layouts is None:
        return maps.numpy(), scores.numpy()
    return stitch_all(Geometry.from_features(pipe.config.features), maps.numpy(), scores.numpy(), layouts)


def pixel_values(maps: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Every pixel of ``maps`` (one array, or maps of different sizes) as one flat float32 array."""
    if isinstance(maps, np.ndarray):
        return maps.astype(np.float32, copy=False).ravel()
    return np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])


def calibrate_pipeline(
    pipe: MapPipeline,
    calib_feats: torch.Tensor,
    rule: str = "max",
    *,
    min_images: int = MIN_CALIBRATION_IMAGES,
    layouts: Sequence[Layout] | None = None,
) -> tuple[Calibration, np.ndarray]:
    """Score held-out good images' raw features and set the pipeline's calibration from them.

    ``layouts``: the images' tile layouts when the run tiles (:func:`score_cached_images`).
    Returns the calibration and the image scores it rests on.
    """
    maps, scores = score_cached_images(pipe, calib_feats, layouts)
    cal = calibrate(scores, pixel_values(maps), rule, min_images=min_images, seed=pipe.config.train.seed)
    pipe.calibration = cal
    return cal, scores


@dataclass
class ScoringFit:
    """What :func:`fit_scoring` measured, for the run's ``meta.json``."""

    calibration: Calibration
    calibration_scores: np.ndarray
    bank_patches_at_calibration: int | None
    held_out_images_banked: int


def fit_scoring(
    pipe: MapPipeline,
    train_feats: torch.Tensor,
    held_out_feats: torch.Tensor | None,
    *,
    train_layouts: Sequence[Layout] | None = None,
    held_out_layouts: Sequence[Layout] | None = None,
    quiet: bool = True,
) -> ScoringFit:
    """Fit everything after the transformer into ``pipe``, in order: the residual statistics
    (Mahalanobis), the memory bank and its blend statistics, the calibration, then (with
    ``fit.bank_held_out``) the held-out images banked too.

    ``held_out_feats``: raw features of the held-out good images (None or empty: the
    training images calibrate). ``*_layouts``: one tile layout per image when the run
    tiles, so the calibration scores whole images (:mod:`stmae.geometry`); the bank and the
    blend statistics are per patch and need none. The one routine ``stmae fit`` and the
    research scripts use.
    """
    infer, fit, seed = pipe.config.infer, pipe.config.fit, pipe.config.train.seed
    held_out = held_out_feats is not None and len(held_out_feats) > 0
    calib_feats = held_out_feats if held_out else train_feats
    if infer.residual == "mahalanobis":
        pipe.residual_stats = fit_residual_stats(pipe, train_feats, quiet=quiet)
    if infer.distance_weight > 0:
        pipe.memory = fit_memory(pipe, train_feats, calib_feats, seed=seed, quiet=quiet).to(_device(pipe))
    calib_layouts = held_out_layouts if held_out else train_layouts
    cal, scores = calibrate_pipeline(
        pipe, calib_feats, fit.threshold_rule, min_images=fit.min_calibration, layouts=calib_layouts
    )
    at_calibration = None if pipe.memory is None else int(pipe.memory.bank.shape[0])
    banked = 0
    if pipe.memory is not None and fit.bank_held_out and held_out:
        # Scored while unseen above; now the held-out good images join the bank like any other.
        bank_held_out_images(pipe, train_feats, held_out_feats, seed=seed, quiet=quiet)  # type: ignore[arg-type]
        banked = int(len(held_out_feats))  # type: ignore[arg-type]
    return ScoringFit(cal, scores, at_calibration, banked)


__all__ = [
    "ScoringFit", "bank_held_out_images", "calibrate_pipeline", "fit_memory", "fit_residual_stats", "fit_scoring",
    "pixel_values", "score_cached_images",
]
