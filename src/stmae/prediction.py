"""What scoring one image returns, on every engine (torch, onnxruntime, OpenVINO, the service).

Why torch-free: the runtime that serves an exported model has numpy and Pillow only, and it
must hand back the very same objects (and so write the same CSV rows) as the torch path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Prediction:
    """Result for one image.

    score: raw image anomaly score (higher = more anomalous).
    normalized: the score mapped to [0, 1] with the threshold at 0.5 (:mod:`stmae.thresholds`);
        None when the run has no calibration.
    label: 1 if ``score > threshold`` (anomalous), else 0; -1 when no threshold is known.
    anomaly_map: float32 (H, W): at the model's input size, or at the image's own size when
        full resolution was asked for.
    threshold: the image threshold the label used.
    pixel_threshold: the threshold for map pixels (:meth:`mask`).
    path: the file scored, when the input was a path.
    image: the decoded uint8 RGB image, only when the caller asked to keep it (heat-map panels).
    """

    score: float
    label: int
    anomaly_map: np.ndarray
    threshold: float | None
    path: str | None = None
    normalized: float | None = None
    pixel_threshold: float | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)

    def mask(self) -> np.ndarray:
        """Boolean (H, W) defect mask: map pixels above the pixel threshold."""
        if self.pixel_threshold is None:
            raise ValueError("no pixel threshold is known for this prediction (uncalibrated run)")
        return self.anomaly_map > self.pixel_threshold

    def row(self) -> dict[str, Any]:
        """The CSV/JSON row every engine writes for this image."""
        return {
            "path": self.path,
            "score": self.score,
            "normalized": self.normalized,
            "label": self.label,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class Skipped:
    """An input that could not be scored (unreadable, undecodable, too large ...), and why."""

    item: str
    reason: str


__all__ = ["Prediction", "Skipped"]
