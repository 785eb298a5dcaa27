"""What the service scores with: one object, loaded once, whatever the engine.

The app needs four things from a model: ``predict(list of uint8 RGB arrays, threshold=...)
-> list[Prediction]`` (with ``normalized`` filled in), ``threshold``, ``calibration`` and
``meta``. The torch :class:`stmae.Detector` and the torch-free runtime of an exported model
(``stmae.runtime.open_model``) offer that, or at least ``iter_predict``; :func:`as_served`
adapts the latter so the app has one code path, and :func:`load_model` picks the engine
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


class StreamingModel:
    """A model offering only ``iter_predict`` (Prediction | Skipped items), e.g. an exported one.

    ``predict`` collects the stream; an item the model skipped becomes a 422 naming it.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.meta: dict[str, Any] = dict(getattr(model, "meta", None) or {})
        self.calibration: Calibration | None = getattr(model, "calibration", None)
        self.config = getattr(model, "config", None)
        self.engine = getattr(model, "engine", None) or type(model).__name__
        self.image_size = getattr(model, "image_size", None) or self.meta.get("image_size")

    @property
    def threshold(self) -> float | None:
        return getattr(self.model, "threshold", None)

    def predict(self, images: Sequence[np.ndarray], *, threshold: float | None = None) -> list[Prediction]:
        out: list[Prediction] = []
        for i, item in enumerate(self.model.iter_predict(list(images), threshold=threshold)):
            if isinstance(item, Skipped):
                raise UploadError(422, str(item.reason), index=i)
            out.append(item)
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
    if hasattr(model, "iter_predict"):
        return StreamingModel(model)
    raise TypeError(
        f"{type(model).__name__} cannot be served: it needs predict(images, threshold=...) and .calibration, "
        "or iter_predict(images, threshold=...)"
    )


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
        "engine": getattr(model, "engine", None) or ("torch" if type(model).__name__ == "Detector" else type(model).__name__),
        "image_size": image_size,
        "threshold": getattr(model, "threshold", None),
        "calibration": None if cal is None else cal.to_dict(),
        "meta": {k: meta[k] for k in keep if k in meta},
        "config": config.to_dict() if config is not None and hasattr(config, "to_dict") else meta.get("config"),
    }


__all__ = ["ServedModel", "StreamingModel", "as_served", "load_model", "model_info"]
