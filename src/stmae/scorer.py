"""The one scorer base: ``predict`` / ``iter_predict`` and thresholds, implemented once.

Why a base class, torch-free: the torch :class:`~stmae.infer.Detector` and an exported
model's runtime (:class:`~stmae.runtime.ExportedModel`, onnxruntime or OpenVINO) differ only
in how a batch of resized uint8 images becomes maps and scores (:meth:`Scorer.score_uint8`).
Everything else (expanding inputs, decoding and skipping, streaming, thresholds, normalised
scores, full-resolution maps) is here, so the CLI, the batch writer (:mod:`stmae.batch`) and
the service (:mod:`stmae.serve`) take any :class:`Scorer` and treat every engine alike.

Thresholds: the :class:`~stmae.thresholds.Calibration` is their only holder. Assigning
``scorer.threshold`` sets an *override* on top of it (``None`` turns labels off);
``del scorer.threshold`` goes back to the calibrated value. A per-call ``threshold=`` is an
override for that call only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Iterable, Iterator

import numpy as np

from .geometry import Geometry, score_split
from .prediction import Prediction, Skipped
from .streaming import stream_predictions
from .thresholds import Calibration

_CALIBRATED = object()  # "no override": the threshold comes from the calibration


def check_threshold(value: Any, where: str = "threshold") -> float | None:
    """``value`` as a float, or None; ValueError for NaN, infinities and non-numbers.

    A NaN threshold would label every image good (every comparison with NaN is false).
    """
    if value is None:
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(t):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return t


class Scorer(ABC):
    """Images in, :class:`~stmae.prediction.Prediction` out, on some engine.

    Subclasses set ``calibration`` and ``meta`` and implement :meth:`score_uint8`,
    :attr:`image_size` and :attr:`batch_size`.
    """

    #: The held-out good images' thresholds and centre (None: an uncalibrated model).
    calibration: Calibration | None = None
    #: What the model records about itself (meta.json or the export's metadata).
    meta: dict[str, Any]
    #: Which engine scores: ``torch``, ``onnxruntime`` or ``openvino``.
    engine: str = "torch"
    _threshold: Any = _CALIBRATED

    # ------------------------------------------------------------------ to implement
    @property
    @abstractmethod
    def image_size(self) -> int:
        """The model input side S."""

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Default images per engine call."""

    @abstractmethod
    def score_uint8(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, S, S, 3) RGB at the model size -> (maps (N, S, S), scores (N,)), float32 numpy."""

    # ------------------------------------------------------------------ geometry
    @property
    def geometry(self) -> Geometry:
        """How an image becomes model inputs and their maps one map (:mod:`stmae.geometry`)."""
        return Geometry(size=self.image_size)

    def score_images(self, images: Iterable[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """Decoded uint8 (H, W, 3) images of any size -> (one map per image, scores (N,)).

        The maps are at the geometry's map size (S x S for ``resize``; the scaled image's own
        shape when tiled). Tiles go through :meth:`score_uint8` in batches of :attr:`batch_size`.
        """
        geometry = self.geometry
        return score_split(self.score_uint8, geometry, [geometry.split(x) for x in images], self.batch_size)

    # ------------------------------------------------------------------ thresholds
    @property
    def threshold(self) -> float | None:
        """The image threshold labels use: the override if one is set, else the calibration's."""
        if self._threshold is not _CALIBRATED:
            return self._threshold
        return None if self.calibration is None else self.calibration.image_threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._threshold = check_threshold(value)

    @threshold.deleter
    def threshold(self) -> None:
        self._threshold = _CALIBRATED

    @property
    def pixel_threshold(self) -> float | None:
        """The threshold for map pixels (:meth:`Prediction.mask`): the calibration's, else the image threshold."""
        if self.calibration is not None:
            return self.calibration.pixel_threshold
        return self.threshold

    # ------------------------------------------------------------------ predict
    def predict(
        self,
        images: Any,
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
        images: Any | Iterable[Any],
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
        chosen = self.threshold if threshold is None else check_threshold(threshold)
        return stream_predictions(
            images, self.score_uint8, geometry=self.geometry,
            batch_size=batch_size or self.batch_size, threshold=chosen,
            pixel_threshold=self.pixel_threshold, calibration=self.calibration, full_resolution=full_resolution,
            on_error=on_error, max_pixels=max_pixels, keep_images=keep_images, quiet=quiet,
        )


__all__ = ["Scorer", "check_threshold"]
