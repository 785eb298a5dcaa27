"""What the service scores with: one object, loaded once, whatever the engine.

The app needs four things from a model: ``predict(list of uint8 RGB arrays, threshold=...)
-> list[Prediction]`` (with ``normalized`` filled in), ``threshold``, ``calibration`` and
``meta``. The torch :class:`stmae.Detector` and the torch-free runtime of an exported model
(``stmae.runtime.open_model``) both offer that (or ``iter_predict``); :func:`as_served`
adapts the variants so the app has one code path, and :func:`load_model` picks the engine
from what the path holds.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ..prediction import Prediction, Skipped
from ..thresholds import Calibration
from .decode import UploadError


@runtime_checkable
class ServedModel(Protocol):
    """The interface the app uses (see the module docstring)."""

    meta: dict[str, Any]

    @property
    def threshold(self) -> float | None: ...

    @property
    def calibration(self) -> Calibration | None: ...

    def predict(self, images: Sequence[np.ndarray], *, threshold: float | None = None) -> list[Prediction]: ...


def calibration_from_meta(meta: dict[str, Any]) -> Calibration | None:
    """``meta["calibration"]``, or for older runs the ``max`` rule rebuilt from their scores."""
    if meta.get("calibration"):
        return Calibration.from_dict(meta["calibration"])
    if meta.get("threshold") is None:
        return None
    scores = (meta.get("calibration_scores") or {}).get("all") or [meta["threshold"]]
    t = float(meta["threshold"])
    return Calibration("max", t, t, float(np.median(scores)), len(scores))


class _Adapter:
    """Common attributes of the adapters: the wrapped model's threshold, meta, config, size."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.meta: dict[str, Any] = dict(getattr(model, "meta", None) or {})
        cal = getattr(model, "calibration", None)
        self.calibration: Calibration | None = cal if cal is not None else calibration_from_meta(self.meta)
        self.config = getattr(model, "config", None)
        self.engine = getattr(model, "engine", "torch")

    @property
    def threshold(self) -> float | None:
        t = getattr(self.model, "threshold", None)
        if t is None and self.calibration is not None:
            return self.calibration.image_threshold
        return t

    @property
    def image_size(self) -> int | None:
        size = getattr(self.model, "image_size", None)
        if size is None and self.config is not None:
            size = self.config.features.image_size
        return size if size is not None else self.meta.get("image_size")

    def _finish(self, pred: Any, threshold: float | None) -> Prediction:
        """A :class:`stmae.prediction.Prediction` with label, threshold and normalised score."""
        t = self.threshold if threshold is None else threshold
        cal = self.calibration
        return Prediction(
            score=float(pred.score),
            label=-1 if t is None else int(pred.score > t),
            anomaly_map=np.asarray(pred.anomaly_map, dtype=np.float32),
            threshold=None if t is None else float(t),
            normalized=None if cal is None else float(cal.normalized(pred.score, t)),
            pixel_threshold=None if cal is None else cal.pixel_threshold,
        )


class LegacyDetector(_Adapter):
    """The torch Detector whose ``predict`` has no ``threshold`` (before the pipeline refactor).

    Scores come from the detector unchanged; label, threshold and the normalised score are
    computed here with :mod:`stmae.thresholds`, exactly as the refactored Detector does.
    """

    def predict(self, images: Sequence[np.ndarray], *, threshold: float | None = None) -> list[Prediction]:
        return [self._finish(p, threshold) for p in self.model.predict(list(images))]


class StreamingModel(_Adapter):
    """A model offering only ``iter_predict`` (Prediction | Skipped items), e.g. an exported one."""

    def predict(self, images: Sequence[np.ndarray], *, threshold: float | None = None) -> list[Prediction]:
        out: list[Prediction] = []
        for i, item in enumerate(self.model.iter_predict(list(images), threshold=threshold)):
            if isinstance(item, Skipped):
                raise UploadError(422, f"image {i}: {item.reason}")
            out.append(item if item.normalized is not None or self.calibration is None else self._finish(item, threshold))
        return out


def _takes_threshold(func: Any) -> bool:
    try:
        return "threshold" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def as_served(model: Any) -> Any:
    """``model`` itself when it already speaks :class:`ServedModel`, else the fitting adapter."""
    predict = getattr(model, "predict", None)
    if predict is not None and _takes_threshold(predict) and hasattr(model, "calibration"):
        return model
    if predict is None and hasattr(model, "iter_predict"):
        return StreamingModel(model)
    if predict is not None:
        return LegacyDetector(model)
    raise TypeError(f"{type(model).__name__} has neither predict() nor iter_predict(): it cannot be served")


def _exported(path: Path) -> Any | None:
    """``stmae.runtime.open_model(path)`` when the runtime exists and ``path`` is an exported model."""
    try:
        from .. import runtime  # type: ignore[attr-defined]
    except ImportError:
        return None
    is_exported = getattr(runtime, "is_exported_model", None)
    opener = getattr(runtime, "open_model", None)
    if is_exported is None or opener is None or not is_exported(path):
        return None
    return opener(path)


def load_model(path: str | os.PathLike, *, device: str = "auto") -> Any:
    """Load a run folder (``stmae fit``) or an exported model once, ready to serve.

    Raises FileNotFoundError for a missing path and the loaders' own errors
    (:class:`stmae.checkpoint.CheckpointError`, ...) for a folder that is neither.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run folder or exported model")
    exported = _exported(p)
    if exported is not None:
        return as_served(exported)
    from ..infer import Detector

    return as_served(Detector.load(p, device=device))


def model_info(model: Any) -> dict[str, Any]:
    """What ``GET /info`` says about the model: metadata, thresholds, input size, engine.

    The training data location and the held-out file names stay out: they are paths on the
    machine that trained the model, of no use to a client.
    """
    meta = dict(getattr(model, "meta", None) or {})
    cal = getattr(model, "calibration", None)
    config = getattr(model, "config", None)
    image_size = getattr(model, "image_size", None)
    if image_size is None:
        image_size = config.features.image_size if config is not None else meta.get("image_size")
    keep = ("stmae_version", "created", "backbone", "grid_size", "feature_channels", "input", "seed", "n_train",
            "n_val", "epochs", "final_loss", "device", "memory", "threshold_source")
    return {
        "engine": getattr(model, "engine", "torch"),
        "image_size": image_size,
        "threshold": getattr(model, "threshold", None),
        "calibration": None if cal is None else cal.to_dict(),
        "meta": {k: meta[k] for k in keep if k in meta},
        "config": config.to_dict() if config is not None and hasattr(config, "to_dict") else meta.get("config"),
    }


__all__ = ["LegacyDetector", "ServedModel", "StreamingModel", "as_served", "calibration_from_meta", "load_model",
           "model_info"]
