"""Export a fitted detector as one ONNX (or OpenVINO IR) graph: images in, maps and scores out.

Why one graph with everything inside: a production line runs C++, C# or a Python without
torch. Every step of the map recipe has to travel, or the exported model scores differently
from the run it came from (anomalib's users met models that label everything abnormal once
normalisation was lost on the way). The graph therefore holds the input scaling, the backbone
and its normalisation, the feature grid with local mean and standardisation, the K fixed split
pairs (constants), the transformer, the residual (Mahalanobis included), the memory-bank
search written as matrix products (``cdist`` does not export), the blend, upsampling,
smoothing and the image score: the map recipe of :mod:`stmae.pipeline`, traced.

What stays *data*: the image threshold and the normalisation centre are graph inputs
(``threshold``, ``center``) whose ONNX initializers hold the stored values, so a caller that
leaves them out gets the run's calibration and one that feeds them overrides it; nothing
about a decision is baked into the weights. The whole calibration, the run's config, image
size, input layout, opset, stmae version and provenance travel as ONNX ``metadata_props``
(OpenVINO: ``rt_info``) and in a sidecar ``<model file>.json``.

Exporter: the TorchScript-based ``torch.onnx.export(dynamo=False)``. The dynamo exporter of
torch 2.13 needs ``onnxscript``, which is not a dependency; the TorchScript exporter traces the
pipeline at a fixed image size and a symbolic batch axis and needs nothing else.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import __version__
from .fileio import atomic_write_json
from .geometry import Geometry
from .thresholds import normalize
from .runtime import FORMAT_VERSION, run_fingerprint, sidecar_path

#: Formats :func:`export_model` writes.
FORMATS = ("onnx", "openvino")
#: Input layouts: uint8 images as a camera hands them over, or float NCHW in [0, 1].
LAYOUTS = ("uint8_nhwc", "float_nchw")
#: ONNX opset of the exported graph (LayerNormalization needs 17).
DEFAULT_OPSET = 17
#: Graph input and output names (documented in docs/export.md).
INPUT_NAMES = ("images", "threshold", "center")
OUTPUT_NAMES = ("anomaly_map", "score", "normalized")
#: Above this many bytes of weights the ONNX file keeps them in ``<file>.data`` (protobuf caps a file at 2 GB).
EXTERNAL_DATA_BYTES = 1_500_000_000

Format = Literal["onnx", "openvino"]
Layout = Literal["uint8_nhwc", "float_nchw"]


class ExportError(ValueError):
    """The detector cannot be exported as asked (bad format, layout, path or an exporter failure)."""


class ExportGraph(nn.Module):
    """The module that is traced: (images, threshold, center) -> (anomaly_map, score, normalized).

    ``images`` is uint8 (N, S, S, 3) RGB or float32 (N, 3, S, S) in [0, 1] at the model input
    size S; ``threshold`` and ``center`` are float32 (1,). The normalised score is
    :func:`stmae.thresholds.normalize` in float32: 0.5 at the threshold, 0 at the centre,
    clipped to [0, 1].
    """

    def __init__(self, pipeline: nn.Module, layout: Layout) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.layout = layout

    def forward(
        self, images: torch.Tensor, threshold: torch.Tensor, center: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.layout == "uint8_nhwc":
            x = images.permute(0, 3, 1, 2).float() / 255.0  # = stmae.data.to_tensor_batch
        else:
            x = images.float()
        maps, scores = self.pipeline(x)
        return maps, scores, normalize(scores, threshold, center, xp=torch)


# --------------------------------------------------------------------------- public API
def export_model(
    detector_or_run_dir: Any,
    out_path: str | os.PathLike | None = None,
    format: Format = "onnx",
    *,
    opset: int = DEFAULT_OPSET,
    input: Layout = "uint8_nhwc",
    backbone_weights: str | None = None,
) -> Path:
    """Export a run folder (or a loaded :class:`~stmae.infer.Detector`) as one graph.

    Args:
        detector_or_run_dir: a run folder written by ``stmae fit``, or a Detector.
        out_path: the ``.onnx`` file, or the OpenVINO ``.xml`` (its ``.bin`` goes next to it).
            Default: ``model.onnx`` / ``model.xml`` inside the run folder, where
            ``stmae.runtime.open_model(run_dir, engine=...)`` looks for it.
        format: ``onnx`` or ``openvino`` (converted from the ONNX graph by ``openvino.convert_model``).
        opset: ONNX opset (>= 17).
        input: ``uint8_nhwc`` (N, S, S, 3) uint8 RGB, or ``float_nchw`` (N, 3, S, S) float32 in [0, 1].
        backbone_weights: override the run's backbone weights file (as for ``Detector.load``).

    Returns the path written. Files appear complete or not at all (temp files, then rename).
    Raises :class:`ExportError` (a ValueError) for a bad format, layout, opset or path.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if input not in LAYOUTS:
        raise ExportError(f"unknown input layout {input!r}; use one of {', '.join(LAYOUTS)}")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: the graph needs LayerNormalization (opset >= 17)")
    detector, run_dir = _detector(detector_or_run_dir, backbone_weights)
    suffix = ".onnx" if format == "onnx" else ".xml"
    if out_path is None:
        if run_dir is None:
            raise ExportError("out_path is required when exporting a Detector object (no run folder to write into)")
        out = run_dir / f"model{suffix}"
    else:
        out = Path(out_path)
    if out.suffix.lower() != suffix:
        raise ExportError(f"{out}: format {format} writes a {suffix} file; give a path ending in {suffix}")
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give the {suffix} file to write")

    meta = _jsonable(export_metadata(detector, run_dir, opset=opset, layout=input, fmt=format))
    graph = ExportGraph(_cpu_pipeline(detector), input).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}.export.", dir=out.parent) as tmp:
        onnx_tmp = Path(tmp) / "model.onnx"
        model = _to_onnx(graph, meta, onnx_tmp, opset)
        if format == "onnx":
            _save_onnx(model, meta, out, Path(tmp))
        else:
            _save_openvino(onnx_tmp, meta, out, Path(tmp))
    atomic_write_json(sidecar_path(out), meta)
    return out


def export_metadata(
    detector: Any, run_dir: Path | None, *, opset: int, layout: Layout, fmt: Format
) -> dict[str, Any]:
    """Everything a caller of the graph needs besides the graph (see docs/export.md)."""
    from .checkpoint import CONFIG_FILE, WEIGHTS_FILE
    from .provenance import collect

    cfg = detector.config
    size = int(cfg.features.image_size)
    calibration = _calibration(detector)
    threshold = detector.threshold if detector.threshold is not None else None
    shape = [None, size, size, 3] if layout == "uint8_nhwc" else [None, 3, size, size]
    source: dict[str, Any] = {"run_dir": str(run_dir) if run_dir is not None else None}
    if run_dir is not None:
        source["fingerprint"] = run_fingerprint(run_dir)
        source["files"] = [CONFIG_FILE, WEIGHTS_FILE]
    return {
        "format": "stmae-export",
        "format_version": FORMAT_VERSION,
        "engine_format": fmt,
        "stmae_version": __version__,
        "opset": opset,
        "image_size": size,
        "input_layout": layout,
        "inputs": {
            "images": {
                "dtype": "uint8" if layout == "uint8_nhwc" else "float32",
                "shape": shape,
                "range": [0, 255] if layout == "uint8_nhwc" else [0.0, 1.0],
                "color": "RGB",
            },
            "threshold": {"dtype": "float32", "shape": [1], "default": threshold},
            "center": {"dtype": "float32", "shape": [1], "default": calibration["center"] if calibration else None},
        },
        "outputs": {
            "anomaly_map": {"dtype": "float32", "shape": [None, size, size]},
            "score": {"dtype": "float32", "shape": [None]},
            "normalized": {"dtype": "float32", "shape": [None], "range": [0.0, 1.0]},
        },
        "threshold": threshold,
        "pixel_threshold": detector.pixel_threshold,
        "calibration": calibration,
        "resize": "PIL bilinear (antialiased) to image_size x image_size, RGB",
        # How an image becomes the graph's inputs (stmae.geometry; also under config.features):
        # for a tiled run the graph scores a batch of tiles, and the caller stitches their maps.
        "geometry": Geometry.from_features(cfg.features).to_dict(),
        "config": cfg.to_dict(),
        "run_meta": _jsonable(detector.meta),
        "source": source,
        "provenance": collect("cpu"),
        "exporter": f"torch.onnx.export (TorchScript) torch {torch.__version__}",
    }


# --------------------------------------------------------------------------- helpers
def _detector(obj: Any, backbone_weights: str | None) -> tuple[Any, Path | None]:
    from .infer import Detector

    if isinstance(obj, Detector):
        return obj, None
    if isinstance(obj, (str, os.PathLike)):
        run = Path(obj)
        return Detector.load(run, device="cpu", backbone_weights=backbone_weights), run
    raise ExportError(f"export needs a run folder or a Detector, got {type(obj).__name__}")


def _calibration(detector: Any) -> dict[str, Any] | None:
    """The detector's calibration as a dict (None for a run without one)."""
    cal = getattr(detector, "calibration", None)
    if cal is not None:
        return cal.to_dict()
    stored = (detector.meta or {}).get("calibration")
    return dict(stored) if stored else None


def _jsonable(obj: Any) -> Any:
    """Plain JSON values (NaN -> null: strict parsers in C++/C# reject NaN tokens)."""
    from .fileio import _nan_to_none

    return json.loads(json.dumps(_nan_to_none(obj), default=str))


def _cpu_pipeline(detector: Any) -> nn.Module:
    """The detector's map pipeline on the CPU in float32 (a copy when it lives elsewhere).

    ``infer.precision = bf16`` (CPU autocast) is a speed option of the torch path; the graph is
    traced in float32 so every engine and device can run it, and parity is measured in fp32.
    """
    pipeline = detector.pipeline
    if any(t.device.type != "cpu" for t in list(pipeline.parameters()) + list(pipeline.buffers())):
        pipeline = copy.deepcopy(pipeline).cpu()
    if pipeline.infer.precision != "fp32":
        pipeline = copy.copy(pipeline)  # shares the fitted parts; only its settings differ
        pipeline.config = copy.deepcopy(pipeline.config)
        pipeline.config.infer.precision = "fp32"
    pipeline.splits  # derived and cached now: computed inside the trace, its generator would not export
    return pipeline.eval()


def _to_onnx(graph: ExportGraph, meta: dict[str, Any], path: Path, opset: int) -> Any:
    """Trace ``graph`` into ``path``; returns the checked ONNX model with defaults and metadata."""
    import onnx

    size = meta["image_size"]
    if graph.layout == "uint8_nhwc":
        dummy = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    else:
        dummy = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    args = (dummy, torch.ones(1), torch.zeros(1))
    axes = {"images": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}, "normalized": {0: "batch"}}
    try:
        # record=True keeps the tracer's notes about Python ints (the image size is fixed on
        # purpose) off the console without touching the process's warning filters
        with warnings.catch_warnings(record=True), torch.no_grad():
            torch.onnx.export(
                graph, args, str(path), dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES), dynamic_axes=axes, do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; say what failed
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {type(exc).__name__}: {exc}") from exc
    model = onnx.load(str(path))
    _declare_output_shapes(model, meta["image_size"])
    _add_defaults(model, meta)
    _set_metadata(model, meta)
    return model


def _declare_output_shapes(model: Any, size: int) -> None:
    """State the outputs' shapes exactly ((batch, S, S), (batch,), (batch,)): the tracer's
    shape inference leaves odd symbolic names behind a ``squeeze``, which would mislead a
    caller that sizes its buffers from the graph."""
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        wanted = ["batch", size, size] if out.name == "anomaly_map" else ["batch"]
        del dims[:]
        for value in wanted:
            d = dims.add()
            if isinstance(value, str):
                d.dim_param = value
            else:
                d.dim_value = value


def _add_defaults(model: Any, meta: dict[str, Any]) -> None:
    """Give ``threshold`` and ``center`` initializers: optional inputs whose default is the stored value.

    An uncalibrated run stores NaN: the label then needs a threshold from the caller, and the
    normalised score is NaN.
    """
    from onnx import numpy_helper

    for name in ("threshold", "center"):
        value = meta["inputs"][name]["default"]
        arr = np.array([np.nan if value is None else value], dtype=np.float32)
        model.graph.initializer.append(numpy_helper.from_array(arr, name))


def _set_metadata(model: Any, meta: dict[str, Any]) -> None:
    """metadata_props: the whole metadata as JSON under ``stmae``, plus flat keys a C++ caller can read directly."""
    flat = {
        "stmae": json.dumps(meta, allow_nan=False),
        "stmae_version": meta["stmae_version"],
        "image_size": str(meta["image_size"]),
        "input_layout": meta["input_layout"],
        "opset": str(meta["opset"]),
        "threshold": "" if meta["threshold"] is None else repr(float(meta["threshold"])),
        "pixel_threshold": "" if meta["pixel_threshold"] is None else repr(float(meta["pixel_threshold"])),
        "center": "" if meta["calibration"] is None else repr(float(meta["calibration"]["center"])),
    }
    del model.metadata_props[:]
    for key, value in flat.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "stmae"
    model.producer_version = meta["stmae_version"]
    model.doc_string = "stmae anomaly detector: images -> anomaly_map, score, normalized (docs/export.md)"


def _save_onnx(model: Any, meta: dict[str, Any], out: Path, tmp: Path) -> None:
    """Check and write the ONNX file (and ``<name>.data`` for a large model) by rename."""
    import onnx

    onnx.checker.check_model(model)
    external = model.ByteSize() > EXTERNAL_DATA_BYTES
    staged = tmp / out.name
    data_name = out.name + ".data"
    if external:
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        onnx.checker.check_model(str(staged))
        os.replace(tmp / data_name, out.parent / data_name)
    else:
        onnx.save_model(model, str(staged))
        (out.parent / data_name).unlink(missing_ok=True)  # a stale one from an earlier large export
    os.chmod(staged, 0o644)
    os.replace(staged, out)


def _save_openvino(onnx_path: Path, meta: dict[str, Any], out: Path, tmp: Path) -> None:
    """Convert the traced ONNX graph to OpenVINO IR (fp32) and move .bin, then .xml into place."""
    import onnx

    try:
        import openvino as ov
    except ImportError as exc:
        raise ExportError("--format openvino needs the openvino package: pip install openvino") from exc
    # Convert the graph *without* the threshold/center defaults: IR has no optional inputs,
    # so they stay plain inputs the runtime always feeds.
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    ov_model = ov.convert_model(str(onnx_path))
    ov_model.set_rt_info(json.dumps(meta, allow_nan=False), ["stmae", "meta"])
    staged = tmp / out.name
    ov.save_model(ov_model, str(staged), compress_to_fp16=False)
    bin_staged = staged.with_suffix(".bin")
    for f in (bin_staged, staged):
        os.chmod(f, 0o644)
    os.replace(bin_staged, out.with_suffix(".bin"))
    os.replace(staged, out)


__all__ = ["ExportError", "ExportGraph", "FORMATS", "LAYOUTS", "DEFAULT_OPSET", "export_model", "export_metadata", "run_fingerprint", "sidecar_path"]
