"""Inference: the :class:`Detector` turns images into anomaly maps, scores and labels.

A Detector is a :class:`~stmae.scorer.Scorer` (``predict``, ``iter_predict``, thresholds:
shared with the exported runtimes) over one fitted scoring module,
:class:`stmae.pipeline.MapPipeline`, which holds every fitted tensor and the calibration.
The Detector keeps no copy of any of them: ``detector.memory``, ``detector.stats``,
``detector.calibration`` ... are the pipeline's own parts, so a change to one, in place or
by assignment, is what the next score reads.

Settings: the predict-time ones (``config.infer``: K pairs, residual, blend, smoothing,
score, batch size, precision) may be changed on a loaded detector and take effect on the
next call. The fit-time ones (the backbone, features, model and training sections, and
``infer``'s bank size, calibration rule and held-out banking) describe how the fitted state
was made; :meth:`stmae.config.Config.lock` makes changing them raise ConfigError.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch

from .build import build_extractor, build_model
from .checkpoint import load_run
from .config import PREDICT_TIME_SECTION, Config, ConfigError
from .data import to_tensor_batch
from .device import resolve_device
from .features import FeatureExtractor, FeatureStats
from .geometry import Geometry
from .model import STMAE, PatchMemory, ResidualStats
from .pipeline import MapPipeline
from .prediction import Prediction, Skipped
from .scorer import Scorer
from .thresholds import Calibration

ImageInput = Any  # a path, folder, PIL image, numpy array or torch tensor (see stmae.inputs)


class Detector(Scorer):
    """A trained ST-MAE ready to score images.

    Build with :meth:`load` from a run folder, or from fitted parts (``stmae.fit`` does).
    The parts passed in are copied, never modified; afterwards they live in
    :attr:`pipeline`, once.
    """

    engine = "torch"

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
        self.meta = dict(meta or {})
        config = copy.deepcopy(config).lock()
        parts = copy.deepcopy((extractor, model, stats, residual_stats, memory))
        #: The fitted scoring module: every fitted tensor and the calibration, in one place.
        self.pipeline = MapPipeline(
            parts[0], parts[1], parts[2], config, memory=parts[4], residual_stats=parts[3],
            calibration=calibration if calibration is not None else calibration_from_meta(self.meta),
            check=False,  # research code fills parts in afterwards; every score checks (MapPipeline.check)
        ).to(self.device)
        if threshold is not None:
            self.threshold = threshold

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
            residual_stats=run.residual_stats, memory=run.memory, calibration=run.calibration,
        )

    # ------------------------------------------------------------------ the fitted parts
    @property
    def config(self) -> Config:
        """The run's settings (shared with :attr:`pipeline`; fit-time sections locked)."""
        return self.pipeline.config

    @config.setter
    def config(self, value: Config) -> None:
        """Another config with the same fit-time settings (ConfigError otherwise)."""
        if value is self.pipeline.config:
            return
        mine, theirs = self.pipeline.config.to_dict(), value.to_dict()
        for section in mine:
            for key in mine[section]:
                if section != PREDICT_TIME_SECTION and mine[section][key] != theirs[section][key]:
                    raise ConfigError(
                        f"{section}.{key} is a fit-time setting, fixed when the model was fitted; fit again "
                        "(stmae fit) to change it"
                    )
        self.pipeline.config = copy.deepcopy(value).lock()

    @property
    def extractor(self) -> FeatureExtractor:
        return self.pipeline.extractor

    @property
    def model(self) -> STMAE:
        return self.pipeline.model  # type: ignore[return-value]

    @property
    def stats(self) -> FeatureStats:
        return self.pipeline.feature_stats

    @property
    def memory(self) -> PatchMemory | None:
        return self.pipeline.memory

    @memory.setter
    def memory(self, value: PatchMemory | None) -> None:
        self.pipeline.memory = None if value is None else value.to(self.device)

    @property
    def residual_stats(self) -> ResidualStats | None:
        return self.pipeline.residual_stats

    @residual_stats.setter
    def residual_stats(self, value: ResidualStats | None) -> None:
        self.pipeline.residual_stats = None if value is None else value.to(self.device)

    @property
    def calibration(self) -> Calibration | None:  # type: ignore[override]
        return self.pipeline.calibration

    @calibration.setter
    def calibration(self, value: Calibration | None) -> None:
        self.pipeline.calibration = value

    @property
    def image_size(self) -> int:
        return int(self.config.features.image_size)

    @property
    def batch_size(self) -> int:
        return int(self.config.infer.batch_size)

    @property
    def geometry(self) -> Geometry:
        """The run's input geometry (``features.geometry``; :mod:`stmae.geometry`)."""
        return Geometry.from_features(self.config.features)

    @property
    def splits(self) -> torch.Tensor:
        """The K fixed test-time split pairs (K, 2, L/2)."""
        return self.pipeline.splits

    def score_uint8(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, S, S, 3) -> (maps (N, S, S), scores (N,)) as numpy: the engine step of streaming."""
        with torch.inference_mode():
            maps, scores = self.pipeline(to_tensor_batch(list(batch)).to(self.device))
        return maps.cpu().numpy(), scores.cpu().numpy()


def calibration_from_meta(meta: dict[str, Any]) -> Calibration | None:
    """The calibration a run's ``meta.json`` holds (None: uncalibrated)."""
    stored = meta.get("calibration")
    return Calibration.from_dict(stored) if stored else None


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
    "load",
]
