"""Inference: the :class:`Detector` turns images into anomaly maps, scores and labels.

The map recipe itself lives in :class:`stmae.pipeline.MapPipeline`; this module only holds a
fitted run's parts, its thresholds (:mod:`stmae.thresholds`) and the streaming front end that
decodes inputs in worker threads while the previous batch is scored (:mod:`stmae.streaming`,
shared with the runtime of exported models).

Why the pipeline is rebuilt lazily: ``detector.config.infer`` (K, the memory share, the
residual...) and ``detector.memory`` may be changed after loading; the pipeline is rebuilt
from them on the next call, so no setting can silently go stale.
"""

from __future__ import annotations

import copy
import os
from dataclasses import astuple
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .build import build_extractor, build_model
from .checkpoint import load_run
from .config import Config
from .data import resize_image, to_tensor_batch
from .device import resolve_device
from .features import FeatureExtractor, FeatureStats
from .model import STMAE, PatchMemory, ResidualStats
from .pipeline import MapPipeline, gaussian_blur, image_scores
from .prediction import Prediction, Skipped
from .streaming import stream_predictions
from .thresholds import Calibration

ImageInput = Any  # a path, folder, PIL image, numpy array or torch tensor (see stmae.inputs)


def calibration_from_meta(meta: dict[str, Any]) -> Calibration | None:
    """The run's calibration: ``meta["calibration"]``, or rebuilt from older runs' fields."""
    if meta.get("calibration"):
        return Calibration.from_dict(meta["calibration"])
    if meta.get("threshold") is None:
        return None
    scores = (meta.get("calibration_scores") or {}).get("all") or [meta["threshold"]]
    t = float(meta["threshold"])
    return Calibration("max", t, t, float(np.median(scores)), len(scores))


class Detector:
    """A trained ST-MAE ready to score images.

    Build with :meth:`load` from a run folder (or from parts right after training). The
    parts passed in are copied, never modified.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        model: STMAE,
        stats: FeatureStats,
        config: Config,
        threshold: float | None = None,
        meta: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        residual_stats: ResidualStats | None = None,
        memory: PatchMemory | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.extractor = copy.deepcopy(extractor).to(self.device).eval()
        self.model = copy.deepcopy(model).to(self.device).eval()
        self.stats = stats
        self.config = copy.deepcopy(config)
        self.meta = dict(meta or {})
        self.residual_stats = residual_stats
        self.memory = memory
        self.calibration = calibration if calibration is not None else calibration_from_meta(self.meta)
        if threshold is None and self.calibration is not None:
            threshold = self.calibration.image_threshold
        #: Image threshold used for labels; set it to override the calibrated one.
        self.threshold: float | None = threshold
        #: Pixel threshold used for masks (:meth:`Prediction.mask`).
        self.pixel_threshold: float | None = self.calibration.pixel_threshold if self.calibration else threshold
        self._pipeline: MapPipeline | None = None
        self._pipeline_key: tuple | None = None

    @classmethod
    def load(
        cls, run_dir: str | os.PathLike, device: str = "auto", backbone_weights: str | None = None
    ) -> "Detector":
        """Load a run folder written by ``stmae fit``.

        ``backbone_weights`` overrides the backbone weights file recorded in the run (for
        backbones whose weights are not packaged, e.g. VGG19 moved to another machine).
        """
        run = load_run(run_dir)
        extractor = build_extractor(run.config, weights=backbone_weights)
        model = build_model(run.config, extractor.out_channels)
        model.load_state_dict(run.model_state, strict=True)
        return cls(
            extractor, model, run.stats, run.config, meta=run.meta, device=resolve_device(device),
            residual_stats=run.residual_stats, memory=run.memory,
        )

    # ------------------------------------------------------------------ the recipe
    @property
    def pipeline(self) -> MapPipeline:
        """The map recipe for the current settings (rebuilt when they change)."""
        c = self.config
        key = (astuple(c.infer), c.features.image_size, c.train.seed, c.model.split_block,
               id(self.memory), id(self.residual_stats), id(self.stats))
        if self._pipeline is None or key != self._pipeline_key:
            self._pipeline = MapPipeline.build(
                self.extractor, self.model, self.stats, c, self.memory, self.residual_stats
            ).to(self.device)
            self._pipeline_key = key
        return self._pipeline

    def rebuild_splits(self) -> None:
        """Kept for callers that changed ``config.infer.num_pairs``: the pipeline now follows by itself."""
        self._pipeline = None

    @property
    def splits(self) -> torch.Tensor:
        """The K fixed test-time split pairs (K, 2, L/2)."""
        return self.pipeline.splits

    def grid_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardised features (N, C, G, G) -> the pixel maps on the grid (N, G, G).

        The image score comes from the score map, which can differ (:meth:`grid_pair`).
        """
        with torch.no_grad():
            return self.pipeline.grid_maps(feats.to(self.device))

    def grid_pair(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features (N, C, G, G) -> (pixel maps, score maps) on the grid
        (:meth:`stmae.pipeline.MapPipeline.grid_pair`)."""
        with torch.no_grad():
            return self.pipeline.grid_pair(feats.to(self.device))

    def residual_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardised features (N, C, G, G) -> mean residual over the K split pairs (N, G, G)."""
        with torch.no_grad():
            return self.pipeline.residual(feats.to(self.device))

    def postprocess(self, grid_maps: torch.Tensor, score_maps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid maps (N, G, G) -> (maps (N, S, S) at the input size, scores (N,)).

        ``score_maps``: the score maps of :meth:`grid_pair`, where the scores come from them.
        """
        if score_maps is None:
            return self.pipeline.postprocess(grid_maps)
        return self.pipeline.postprocess_pair(grid_maps, score_maps)

    def score_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (unstandardised) cached features -> (maps (N, S, S), scores (N,)) on CPU."""
        pipe, maps, scores = self.pipeline, [], []
        with torch.inference_mode():
            for chunk in torch.split(feats, self.config.infer.batch_size):
                m, s = pipe.score_features(chunk.to(self.device))
                maps.append(m.cpu())
                scores.append(s.cpu())
        return torch.cat(maps), torch.cat(scores)

    def score_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, S, S) in [0, 1], already resized -> (maps (N, S, S), scores (N,)) on CPU."""
        with torch.inference_mode():
            maps, scores = self.pipeline(images.to(self.device))
        return maps.cpu(), scores.cpu()

    def score_arrays(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 RGB arrays of any size -> maps at the model input size and scores (CPU)."""
        return self.score_tensor(to_tensor_batch([resize_image(im, self.config.features.image_size) for im in images]))

    # ------------------------------------------------------------------ fitting helpers
    def fit_residual_stats(self, feats: torch.Tensor, quiet: bool = True) -> ResidualStats:
        """Fit (and keep) the Mahalanobis residual statistics (:func:`stmae.fitting.fit_residual_stats`)."""
        from .fitting import fit_residual_stats

        self.residual_stats = fit_residual_stats(self, feats, quiet=quiet)
        return self.residual_stats

    def fit_memory(
        self, train_feats: torch.Tensor, calib_feats: torch.Tensor, seed: int = 42, quiet: bool = True
    ) -> PatchMemory:
        """Build (and keep) the memory bank (:func:`stmae.fitting.fit_memory`)."""
        from .fitting import fit_memory

        self.memory = fit_memory(self, train_feats, calib_feats, seed=seed, quiet=quiet)
        return self.memory

    # ------------------------------------------------------------------ user API
    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        batch_size: int | None = None,
        threshold: float | None = None,
        full_resolution: bool = False,
        quiet: bool = True,
    ) -> list[Prediction]:
        """Score images: paths, folders, PIL images, numpy arrays (one or a batch), tensors.

        Returns one :class:`Prediction` per image. Maps are at the model input size, or at
        each image's own size with ``full_resolution``. ``threshold`` overrides the image
        threshold for these labels. Raises :class:`~stmae.data.DataError` naming the first
        input that cannot be scored (use :meth:`iter_predict` to skip such inputs instead).
        """
        out = self.iter_predict(
            images, batch_size=batch_size, threshold=threshold, full_resolution=full_resolution,
            on_error="raise", quiet=quiet,
        )
        return [p for p in out if isinstance(p, Prediction)]

    def iter_predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        batch_size: int | None = None,
        threshold: float | None = None,
        full_resolution: bool = False,
        on_error: str = "skip",
        max_pixels: int | None = None,
        keep_images: bool = False,
        quiet: bool = True,
    ) -> Iterator[Prediction | Skipped]:
        """Stream predictions, in input order, with memory bounded by two batches.

        Images are decoded and resized in worker threads while the previous batch is scored.
        ``on_error="skip"`` yields a :class:`Skipped` (item, reason) for an input that cannot
        be decoded; ``"raise"`` raises DataError naming it. ``max_pixels`` refuses larger
        images from their header, before decoding. ``keep_images`` attaches the decoded image
        to each prediction (for heat-map panels).
        """
        return stream_predictions(
            images, self._score_uint8, image_size=self.config.features.image_size,
            batch_size=batch_size or self.config.infer.batch_size,
            threshold=self.threshold if threshold is None else float(threshold),
            pixel_threshold=self.pixel_threshold, calibration=self.calibration, full_resolution=full_resolution,
            on_error=on_error, max_pixels=max_pixels, keep_images=keep_images, quiet=quiet,
        )

    def _score_uint8(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, S, S, 3) -> (maps (N, S, S), scores (N,)) as numpy: the engine step of streaming."""
        maps, scores = self.score_tensor(to_tensor_batch(list(batch)))
        return maps.numpy(), scores.numpy()


def load(run_dir: str | os.PathLike, device: str = "auto", backbone_weights: str | None = None) -> Detector:
    """Shortcut for :meth:`Detector.load`."""
    return Detector.load(run_dir, device=device, backbone_weights=backbone_weights)


__all__ = [
    "Detector",
    "Prediction",
    "Skipped",
    "build_extractor",
    "build_model",
    "calibration_from_meta",
    "gaussian_blur",
    "image_scores",
    "load",
]
