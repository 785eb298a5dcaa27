"""What the service scores with: one :class:`~stmae.scorer.Scorer`, loaded once, whatever the engine.

The torch :class:`stmae.Detector` and the torch-free runtime of an exported model
(``stmae.runtime.open_model``) are both Scorers, so the app has one code path;
:func:`load_model` picks the engine from what the path holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..runtime import is_exported_model, open_model
from ..scorer import Scorer


def as_served(model: Any) -> Scorer:
    """``model`` itself; TypeError naming what it is when it is not a :class:`~stmae.scorer.Scorer`."""
    if isinstance(model, Scorer):
        return model
    raise TypeError(
        f"{type(model).__name__} cannot be served: the service scores with a stmae.scorer.Scorer "
        "(a Detector, or an exported model from stmae.runtime.open_model)"
    )


def load_model(path: str | os.PathLike, *, device: str = "auto") -> Scorer:
    """Load a run folder (``stmae fit``) or an exported model once, ready to serve.

    Raises FileNotFoundError for a missing path and the loaders' own errors
    (:class:`stmae.checkpoint.CheckpointError`, ...) for a folder that is neither.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run folder or exported model")
    if is_exported_model(p):
        return open_model(p)
    from ..infer import Detector

    return Detector.load(p, device=device)


def model_info(model: Scorer) -> dict[str, Any]:
    """What ``GET /info`` says about the model: metadata, thresholds, input size, engine.

    The training data location and the held-out file names stay out: they are paths on the
    machine that trained the model, of no use to a client.
    """
    meta = dict(getattr(model, "meta", None) or {})
    cal = getattr(model, "calibration", None)
    config = getattr(model, "config", None)
    image_size = model.image_size
    keep = ("stmae_version", "created", "backbone", "grid_size", "feature_channels", "input", "seed", "n_train",
            "n_val", "epochs", "final_loss", "device", "memory", "threshold_source")
    return {
        "engine": model.engine,
        "image_size": image_size,
        "threshold": getattr(model, "threshold", None),
        "calibration": None if cal is None else cal.to_dict(),
        "meta": {k: meta[k] for k in keep if k in meta},
        "config": config.to_dict() if config is not None and hasattr(config, "to_dict") else meta.get("config"),
    }


__all__ = ["as_served", "load_model", "model_info"]
