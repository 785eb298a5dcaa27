"""The two engines that run an exported graph: onnxruntime and OpenVINO, behind one small interface.

Each engine loads a file, reports the stmae metadata stored in it, and maps a batch of images
(already resized to the model's input size, in the graph's input layout) to
``(anomaly_map (N, S, S), score (N,))`` as float32 numpy arrays. Thresholds and the normalised
score are applied by the caller (:mod:`stmae.runtime`) with :mod:`stmae.thresholds`, the same
code as the torch path, so an override works the same on every engine.

OpenVINO runs in float32 (``INFERENCE_PRECISION_HINT``): on CPUs with bf16 support its
default would be bf16, which moves maps too far for the parity the exports promise
(docs/research.md, "Figures behind the code").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

#: Engine names, in the order ``engine=None`` tries them for an ``.onnx`` file.
ENGINES = ("onnxruntime", "openvino")


class EngineError(ValueError):
    """The engine is not installed, or cannot load the file."""


class Engine:
    """Common interface: ``name``, ``stored_metadata()`` and ``run(images)``."""

    name = ""

    def stored_metadata(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class OnnxRuntimeEngine(Engine):
    """onnxruntime's CPU execution provider (or the providers given)."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError("engine onnxruntime is not installed: pip install onnxruntime") from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3  # threshold/center are initializers *and* inputs on purpose
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from None
        self._input = self.session.get_inputs()[0].name

    def stored_metadata(self) -> dict[str, Any] | None:
        text = self.session.get_modelmeta().custom_metadata_map.get("stmae")
        return json.loads(text) if text else None

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(["anomaly_map", "score"], {self._input: images})
        return maps, scores


class OpenVinoEngine(Engine):
    """OpenVINO on the CPU in float32; reads ``.xml`` IR or the ``.onnx`` file directly."""

    name = "openvino"

    def __init__(self, path: Path, threads: int | None = None, device: str = "CPU") -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise EngineError("engine openvino is not installed: pip install openvino") from exc
        core = ov.Core()
        try:
            self.model = core.read_model(str(path))
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            self.compiled = core.compile_model(self.model, device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            raise EngineError(f"{path}: OpenVINO cannot load it ({type(exc).__name__}: {exc})") from None
        self.request = self.compiled.create_infer_request()
        names = [port.get_any_name() for port in self.compiled.inputs]
        # IR keeps threshold/center as plain inputs (no defaults in IR); an ONNX file read
        # directly folds them into constants. Feed them when present: they only drive the
        # graph's own `normalized` output, which this runtime does not use.
        self._extra = {n: np.zeros(1, np.float32) for n in names if n in ("threshold", "center")}
        self._input = next(n for n in names if n not in self._extra)
        self._outputs = {name: self._port(name) for name in ("anomaly_map", "score")}

    def _port(self, name: str) -> Any:
        for port in self.compiled.outputs:
            if name in port.get_names():
                return port
        raise EngineError(f"the OpenVINO model has no output named {name!r}; is it an stmae export?")

    def stored_metadata(self) -> dict[str, Any] | None:
        if self.model.has_rt_info(["stmae", "meta"]):
            return json.loads(str(self.model.get_rt_info(["stmae", "meta"]).astype(str)))
        return None

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer({self._input: images, **self._extra})
        return (
            np.array(result[self._outputs["anomaly_map"]], dtype=np.float32),
            np.array(result[self._outputs["score"]], dtype=np.float32),
        )


def create(name: str, path: Path, threads: int | None = None) -> Engine:
    """The engine ``name`` on ``path``."""
    if name == "onnxruntime":
        if path.suffix.lower() != ".onnx":
            raise EngineError(f"{path}: onnxruntime runs .onnx files; use engine openvino for OpenVINO IR (.xml)")
        return OnnxRuntimeEngine(path, threads)
    if name == "openvino":
        return OpenVinoEngine(path, threads)
    raise EngineError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")


def available(name: str) -> bool:
    """Whether the engine's package can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``stmae`` metadata_props entry of an ONNX file, with whichever ONNX package is installed."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == "stmae":
            return json.loads(prop.value)
    return None


__all__ = ["ENGINES", "Engine", "EngineError", "OnnxRuntimeEngine", "OpenVinoEngine", "available", "create"]
