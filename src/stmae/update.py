"""Adding good images to a fitted run without retraining the transformer.

Why: a model on a line meets good parts it has not seen (a new batch of material, drifted
lighting) and flags them. A full refit costs the training time and needs every old image
again. The memory of good patches is the part that answers "has a good part looked like
this?", so an update extends it with the new images' patches and re-sets the thresholds;
the transformer, the feature statistics and the blend's scales stay as fitted.

What an update does, in order (:func:`update_scoring`):

1. the new images' features, split by the run's ``fit.held_out`` share (seeded per version)
   into images to bank and images to calibrate on;
2. the bank: a greedy coreset over the old bank's rows and the new patches, of the size a
   refit would give it: the old bank's size plus the run's ``fit.bank_coreset`` share of
   the new patches (the bank grows with the images, never faster than a refit's);
3. the thresholds, by the run's rule, over the old held-out images' scores (as recorded
   when they were unseen) and the new held-out images' scores against the new bank, while
   still unseen; the pixel threshold never falls below the old one, since the old images'
   maps are not stored;
4. with ``fit.bank_held_out``, the new held-out images banked too (the coreset again).

The new version is written as a whole (:func:`stmae.checkpoint.save_run`): the old run
stays loadable until the new one is complete. ``meta.json`` gains ``model_version`` and a
``history`` entry per update (docs/design.md, "Run history").
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .build import build_extractor, build_model
from .checkpoint import load_run, save_run
from .data import AnomalyDataset, Sample
from .device import resolve_device
from .features import extract_sample_features
from .fitting import pixel_values, score_cached_images
from .geometry import Geometry, Layout
from .infer import Detector
from .model.memory import greedy_coreset, patch_rows
from .pipeline import MapPipeline
from .thresholds import Calibration, calibrate
from .train import holdout_split, training_samples


class UpdateError(ValueError):
    """A run cannot be updated as asked; the message says why and what to do."""


@dataclass
class UpdateResult:
    """What :func:`update` wrote: the run folder, the updated detector and its history entry."""

    run_dir: Path
    detector: Detector
    entry: dict[str, Any]


def update(
    run_dir: str | os.PathLike,
    data: str | os.PathLike | AnomalyDataset | Sequence[Sample],
    *,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    backbone_weights: str | None = None,
    quiet: bool = False,
) -> UpdateResult:
    """Add the good images ``data`` to the fitted run ``run_dir`` (no retraining).

    Args:
        run_dir: a run folder written by ``stmae fit`` (or an earlier update) with a memory bank.
        data: the new good images: a folder, an MVTec-style category (its ``train/good``),
            an :class:`AnomalyDataset` or a list of :class:`Sample`.
        out: where to write the new version (default: ``run_dir`` itself, replaced as a whole).
        device, backbone_weights: as for :meth:`Detector.load`.
        quiet: no progress bars.

    Raises:
        UpdateError: the run has no memory bank (``infer.distance_weight`` 0 when fitted).
        CheckpointError, DataError: an unreadable run folder or image, naming it.
    """
    started = time.perf_counter()
    run = load_run(run_dir)
    if run.memory is None:
        raise UpdateError(
            f"{run_dir}: has no memory bank (it was fitted with infer.distance_weight 0), so there is "
            "nothing an update can extend; fit again with a distance weight above 0"
        )
    if run.calibration is None:
        raise UpdateError(f"{run_dir}: has no calibration to update; fit again (stmae fit)")
    cfg = run.config
    dev = resolve_device(device)
    extractor = build_extractor(cfg, weights=backbone_weights)
    model = build_model(cfg, extractor.out_channels)
    model.load_state_dict(run.model_state, strict=True)
    pipe = MapPipeline(
        extractor, model, run.stats, cfg, memory=run.memory, residual_stats=run.residual_stats,
        calibration=run.calibration, check=False,
    ).to(dev)
    samples, source = training_samples(data, minimum=1)
    version = int(run.meta.get("model_version", 1)) + 1
    bank_idx, held_idx = holdout_split(len(samples), cfg.fit.held_out, cfg.train.seed + version)
    geometry = Geometry.from_features(cfg.features)
    cached = extract_sample_features(
        pipe.extractor, samples, geometry, batch_size=cfg.infer.batch_size, device=dev, quiet=quiet
    )
    held = cached.select(held_idx) if len(held_idx) else None
    old_scores = [float(v) for v in (run.meta.get("calibration_scores") or {}).get("all", [])]
    before = run.calibration
    scores, banked_held_out = update_scoring(
        pipe, cached.select(bank_idx).feats, None if held is None else held.feats,
        old_scores, seed=cfg.train.seed, quiet=quiet,
        held_out_layouts=held.layouts if held is not None and geometry.tiled else None,
    )
    after = pipe.calibration
    assert after is not None
    entry = {
        "version": version,
        "kind": "update",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "images_added": len(samples),
        "images_banked": int(len(bank_idx)) + banked_held_out,
        "images_held_out": int(len(held_idx)),
        "held_out_images": [samples[i].name or str(samples[i].path) for i in held_idx],
        "calibration_images": len(scores),
        "image_threshold_before": before.image_threshold,
        "image_threshold_after": after.image_threshold,
        "pixel_threshold_before": before.pixel_threshold,
        "pixel_threshold_after": after.pixel_threshold,
        "bank_patches": int(pipe.memory.bank.shape[0]),  # type: ignore[union-attr]
        "seconds": round(time.perf_counter() - started, 3),
    }
    meta = copy.deepcopy(run.meta)
    meta["model_version"] = version
    meta["history"] = [*meta.get("history", []), entry]
    meta["calibration_scores"] = {
        "min": min(scores), "mean": float(np.mean(scores)), "max": max(scores), "all": scores,
    }
    meta["val_images"] = [*meta.get("val_images", []), *entry["held_out_images"]]
    target = Path(out) if out is not None else Path(run_dir)
    save_run(target, pipe, meta)
    detector = Detector(
        pipe.extractor, pipe.model, pipe.feature_stats, cfg, meta=meta, device=dev,
        residual_stats=pipe.residual_stats, memory=pipe.memory, calibration=after,
    )
    return UpdateResult(run_dir=target, detector=detector, entry=entry)


@torch.no_grad()
def update_scoring(
    pipe: MapPipeline,
    bank_feats: torch.Tensor,
    held_out_feats: torch.Tensor | None,
    old_scores: Sequence[float],
    *,
    seed: int = 42,
    quiet: bool = True,
    held_out_layouts: Sequence[Layout] | None = None,
) -> tuple[list[float], int]:
    """Extend ``pipe``'s bank with raw features of new good images and re-set its calibration
    (steps 2-4 of the module docstring). Returns the calibration scores (old, then new) and
    the number of held-out images banked after calibration. ``held_out_layouts``: one tile
    layout per held-out image when the run tiles (their features are tiles)."""
    memory, old_cal = pipe.memory, pipe.calibration
    if memory is None or old_cal is None:
        raise UpdateError("the pipeline has no memory bank or calibration to update")
    dev, ratio = memory.bank.device, pipe.config.fit.bank_coreset
    grid = bank_feats.shape[2] * bank_feats.shape[3]
    size = int(memory.bank.shape[0]) + int(ratio * len(bank_feats) * grid)
    memory.bank = _coreset(memory.bank, [pipe.standardize(bank_feats.to(dev))], size, seed, quiet)
    new_scores: list[float] = []
    maps = None
    if held_out_feats is not None and len(held_out_feats):
        image_maps, image_scores = score_cached_images(pipe, held_out_feats, held_out_layouts)
        maps, new_scores = pixel_values(image_maps), [float(v) for v in image_scores]
    scores = [*old_scores, *new_scores] or [old_cal.image_threshold]
    fit = pipe.config.fit
    cal = calibrate(np.asarray(scores), maps, fit.threshold_rule, min_images=fit.min_calibration, seed=pipe.config.train.seed)
    pixel = max(old_cal.pixel_threshold, cal.pixel_threshold) if maps is not None else old_cal.pixel_threshold
    pipe.calibration = Calibration(cal.rule, cal.image_threshold, pixel, cal.center, cal.n_images)
    banked = 0
    if fit.bank_held_out and held_out_feats is not None and len(held_out_feats):
        size += int(ratio * len(held_out_feats) * grid)
        memory.bank = _coreset(memory.bank, [pipe.standardize(held_out_feats.to(dev))], size, seed, quiet)
        banked = len(held_out_layouts) if held_out_layouts is not None else int(len(held_out_feats))
    return scores, banked


def _coreset(bank: torch.Tensor, new: list[torch.Tensor], size: int, seed: int, quiet: bool) -> torch.Tensor:
    """A greedy coreset of at most ``size`` rows over the bank's rows and the new standardised features."""
    rows = torch.cat([bank, *(patch_rows(x.float()) for x in new)])
    picked = greedy_coreset(rows, min(size, rows.shape[0]), seed=seed, quiet=quiet).to(rows.device)
    return rows[picked].contiguous()


def update_from_log(
    run_dir: str | os.PathLike,
    log_path: str | os.PathLike,
    *,
    model: str | None = None,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    backbone_weights: str | None = None,
    quiet: bool = False,
) -> UpdateResult:
    """Fold the predictions an operator confirmed good (``POST /feedback`` verdict ``good``)
    in the prediction log ``log_path`` into the run, with :func:`update`.

    ``model``: the log's model name to take them from (default: the run folder's name, as
    ``stmae serve`` logs it). Each confirmation is folded once: the log records the version
    it went into. Confirmed images whose file is gone are left out and listed in the entry.

    Raises:
        UpdateError: no unfolded confirmed-good prediction with an image for that model.
    """
    from .predlog import PredictionLog

    name = model or Path(os.path.realpath(run_dir)).name
    log = PredictionLog(log_path)
    try:
        rows = log.confirmed("good", model=name)
        usable = [r for r in rows if r["image"] and Path(r["image"]).is_file()]
        if not usable:
            raise UpdateError(
                f"{log_path}: no prediction of model {name!r} is confirmed good and not yet folded in"
                + (f" ({len(rows)} confirmed, but their images were not kept or are gone)" if rows else "")
            )
        result = update(run_dir, [r["image"] for r in usable], out=out, device=device,
                        backbone_weights=backbone_weights, quiet=quiet)
        log.mark_folded([r["feedback_id"] for r in usable], result.entry["version"])
    finally:
        log.close()
    result.entry["from_log"] = str(log_path)
    result.entry["left_out"] = [r["source"] for r in rows if r not in usable]
    return result


__all__ = ["UpdateError", "UpdateResult", "update", "update_from_log", "update_scoring"]
