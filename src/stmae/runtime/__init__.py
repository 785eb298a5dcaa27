"""Score images with an exported model (ONNX or OpenVINO IR), without torch.

Why a runtime of its own: the machine on a production line should not need torch (gigabytes)
to run a model that is already one graph. This package needs numpy, Pillow and one engine
(onnxruntime or openvino); ``import stmae.runtime`` never imports torch (a test runs it with
torch made unimportable).

It gives the same answers as the torch path because it shares all the code around the graph:
:func:`stmae.streaming.stream_predictions` expands, decodes, resizes, batches, labels and
normalises exactly as :meth:`stmae.Detector.iter_predict` does; only the batch scoring differs.

Usage::

    from stmae.runtime import open_model
    model = open_model("model.onnx")                 # or model.xml, or an exported run folder
    for p in model.predict(["a.png", "b.png"]):
        print(p.score, p.normalized, p.label)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import sha256_file
from ..geometry import Geometry
from ..scorer import Scorer
from ..thresholds import Calibration
from .engines import ENGINES, Engine, EngineError, available, create, read_onnx_metadata

#: Metadata layouts this runtime reads (``format_version`` in the file).
FORMAT_VERSION = 1
#: File names :func:`stmae.export.export_model` writes into a run folder by default.
RUN_MODEL_FILES = {"onnxruntime": ("model.onnx",), "openvino": ("model.xml", "model.onnx")}
#: The run-folder files an export's fingerprint covers (see :func:`run_fingerprint`).
FINGERPRINT_FILES = ("config.yaml", "model.safetensors")
#: Suffixes of files :func:`open_model` accepts.
MODEL_SUFFIXES = (".onnx", ".xml")


class ModelFileError(ValueError):
    """The file is not an stmae export, is from a newer stmae, or no longer matches its run."""


def is_exported_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an exported model file (``.onnx`` or OpenVINO ``.xml``) rather than a run folder."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in MODEL_SUFFIXES


def run_fingerprint(run_dir: str | os.PathLike) -> str:
    """SHA-256 (16 hex digits) of a run's config.yaml and model.safetensors: which fit an export came from."""
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        sha256_file(Path(run_dir) / name, digest)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The JSON written next to an exported model: ``model.onnx`` -> ``model.onnx.json``."""
    p = Path(model_path)
    return p.with_name(p.name + ".json")


class ExportedModel(Scorer):
    """An exported detector on one engine: a :class:`~stmae.scorer.Scorer`, so ``predict``,
    ``iter_predict`` and the thresholds are the Detector's own code.

    Attributes:
        path: the model file; engine: ``onnxruntime`` or ``openvino``.
        meta: the export metadata (docs/export.md), config: the run's config as a dict.
        image_size: the model's input side S; input_layout: ``uint8_nhwc`` or ``float_nchw``.
        calibration: :class:`~stmae.thresholds.Calibration` or None (uncalibrated run).
    """

    def __init__(self, path: Path, engine: Engine, meta: dict[str, Any]) -> None:
        self.path = path
        self._engine = engine
        self.engine = engine.name
        self.meta = meta
        self.config: dict[str, Any] = meta.get("config") or {}
        self._image_size = int(meta["image_size"])
        self.input_layout = str(meta["input_layout"])
        cal = meta.get("calibration")
        self.calibration = Calibration.from_dict(cal) if cal else None
        t = meta.get("threshold")
        if self.calibration is None and t is not None:  # an export without a calibration record
            self.threshold = float(t)

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.path)!r}, engine={self.engine!r}, image_size={self.image_size})"

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def batch_size(self) -> int:
        """Default images per engine call: the run's ``infer.batch_size``."""
        return int((self.config.get("infer") or {}).get("batch_size") or 16)

    @property
    def geometry(self) -> Geometry:
        """The run's input geometry, from the export's config (``resize`` for older exports)."""
        return Geometry.from_config_dict(self.config, self.image_size)

    def score_uint8(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, S, S, 3) images at the model size -> (maps (N, S, S), scores (N,)) float32."""
        batch = np.ascontiguousarray(batch)
        if batch.dtype != np.uint8 or batch.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"score_uint8 expects uint8 ({self.image_size}, {self.image_size}, 3) images, got {batch.dtype} {batch.shape[1:]}"
            )
        if self.input_layout == "float_nchw":
            batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255.0)
        return self._engine.run(batch)

    def score_batch(self, resized: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (S, S, 3) images, already resized -> (maps (N, S, S), scores (N,)) float32."""
        return self.score_uint8(np.stack(resized))


def open_model(path: str | os.PathLike, engine: str | None = None, *, threads: int | None = None) -> ExportedModel:
    """Open an exported model for scoring.

    Args:
        path: an ``.onnx`` file, an OpenVINO ``.xml`` file, or a run folder exported with
            ``stmae export RUN`` (its ``model.onnx`` / ``model.xml``; refused when the run was
            refitted after the export).
        engine: ``onnxruntime`` or ``openvino``; None picks onnxruntime for ``.onnx`` (OpenVINO
            when onnxruntime is not installed) and OpenVINO for ``.xml``.
        threads: CPU threads for the engine (None: the engine's default).

    Raises :class:`ModelFileError` / :class:`~stmae.runtime.engines.EngineError` (ValueErrors)
    with the file and the problem in the message.
    """
    if engine is not None and engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    p = Path(path)
    run_dir = None
    if p.is_dir():
        run_dir = p
        p = _run_model_file(p, engine)
    elif not p.is_file():
        raise ModelFileError(f"{p}: no such model file or run folder")
    if p.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelFileError(f"{p}: not an exported model; expected a .onnx or OpenVINO .xml file (stmae export)")
    name = engine or _default_engine(p)
    eng = create(name, p, threads)
    meta = _metadata(p, eng)
    if run_dir is not None:
        _check_fresh(run_dir, p, meta)
    return ExportedModel(p, eng, meta)


def _default_engine(p: Path) -> str:
    if p.suffix.lower() == ".xml":
        return "openvino"
    if available("onnxruntime") or not available("openvino"):
        return "onnxruntime"
    return "openvino"


def _run_model_file(run_dir: Path, engine: str | None) -> Path:
    names = RUN_MODEL_FILES[engine] if engine else ("model.onnx", "model.xml")
    for name in names:
        if (run_dir / name).is_file():
            return run_dir / name
    how = "--format openvino" if engine == "openvino" else "--format onnx"
    raise ModelFileError(
        f"{run_dir}: no exported model in this run folder (looked for {', '.join(names)}); "
        f"export it first: stmae export {run_dir} {how}"
    )


def _metadata(p: Path, eng: Engine) -> dict[str, Any]:
    """The export metadata: stored in the model file, else its sidecar JSON."""
    meta = eng.stored_metadata()
    if meta is None and p.suffix.lower() == ".onnx" and eng.name != "onnxruntime":
        meta = read_onnx_metadata(p)
    side = sidecar_path(p)
    if meta is None and side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{side}: unreadable metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != "stmae-export":
        raise ModelFileError(f"{p}: no stmae metadata in the file or next to it; it was not written by `stmae export`")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(
            f"{p}: exported by stmae {meta.get('stmae_version')} in metadata format {meta.get('format_version')}; "
            f"this stmae reads format {FORMAT_VERSION}: upgrade stmae"
        )
    return meta


def _check_fresh(run_dir: Path, p: Path, meta: dict[str, Any]) -> None:
    """Refuse an export of an earlier fit than the one now in ``run_dir``."""
    stored = (meta.get("source") or {}).get("fingerprint")
    if stored is None or not all((run_dir / f).is_file() for f in FINGERPRINT_FILES):
        return
    if run_fingerprint(run_dir) != stored:
        raise ModelFileError(
            f"{p} was exported from an earlier fit of {run_dir} (the run's model changed since); "
            f"export it again: stmae export {run_dir}"
        )


__all__ = [
    "ENGINES",
    "EngineError",
    "ExportedModel",
    "ModelFileError",
    "is_exported_model",
    "open_model",
    "run_fingerprint",
    "sidecar_path",
]
