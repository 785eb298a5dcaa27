"""The inference pipeline: fast path = reference path, streaming, inputs, thresholds, bad files."""

from __future__ import annotations

import copy
import json
import csv
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import stmae
from stmae.batch import predict_to_folder
from stmae.data import DataError, to_tensor_batch
from stmae.model import feature_residual
from stmae.prediction import Prediction, Skipped
from stmae.thresholds import Calibration, ThresholdWarning, calibrate, normalize, parse_rule, threshold_from

from .conftest import make_tiny_category, tiny_config, write_png


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_category(tmp_path_factory.mktemp("predict") / "tiny", n_train=10, seed=1, masks=False)


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    stmae.fit(tiny_data, out, tiny_config(**{"train.epochs": 3, "fit.held_out": 0.3}), quiet=True)
    return out


def reference_grid_maps(det: stmae.Detector, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe written the slow, obvious way: one transformer call per split pair and per
    residual kind. Returns (pixel maps, score maps) on the grid."""
    cfg = det.config.infer
    pixel_kind = cfg.residual if cfg.pixel_residual == "same" else cfg.pixel_residual
    pixel_blend = cfg.blend if cfg.pixel_blend == "same" else cfg.pixel_blend
    x = det.stats.apply(feats)
    residuals = {}
    with torch.no_grad():
        for kind in {cfg.residual, pixel_kind}:
            total = torch.zeros(x.shape[0], x.shape[2], x.shape[3])
            for split in det.splits:
                total += feature_residual(det.model(x, split), x, kind, det.residual_stats)
            residuals[kind] = total / len(det.splits)
    if cfg.distance_weight <= 0:
        return residuals[pixel_kind], residuals[cfg.residual]
    dist = torch.cdist(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), det.memory.bank).amin(1).view_as(x[:, 0])
    mem = det.memory

    def blended(residual: torch.Tensor, mode: str, own: bool) -> torch.Tensor:
        median, (r0, r1) = (mem.pixel_residual_median, mem.pixel_residual_range) if own else (mem.residual_median, mem.residual_range)
        if mode == "median":
            return (1 - cfg.distance_weight) * residual / median + cfg.distance_weight * dist / mem.distance_median
        (d0, d1) = mem.distance_range
        r = (residual - r0) / (r1 - r0)
        if mode == "gated":
            r = r.clamp_min(0.0)
        return (1 - cfg.distance_weight) * r + cfg.distance_weight * (dist - d0) / (d1 - d0)

    score = blended(residuals[cfg.residual], cfg.blend, False)
    if cfg.distance_weight >= 1:
        return score, score
    return blended(residuals[pixel_kind], pixel_blend, pixel_kind != cfg.residual), score


@pytest.mark.parametrize(
    "memory,pairs,residual,blend,bf16_search,pixel",
    [(0.8, 2, "mse_cos", "median", False, "same"), (0.8, 1, "mse_cos", "quantile", False, "same"),
     (0.0, 3, "mse_cos", "median", False, "same"), (1.0, 2, "mse_cos", "median", False, "same"),
     (0.0, 2, "mahalanobis", "median", False, "same"), (0.8, 1, "mse_cos", "quantile", True, "same"),
     (1.0, 1, "mse_cos", "median", True, "same"),
     # the pixel map on its own residual and blend (the default): gated score, quantile map
     (0.8, 2, "mse_cos", "gated", False, "mse/quantile"), (0.8, 1, "mse_cos", "gated", True, "mse/quantile"),
     (0.8, 1, "mse_cos", "quantile", False, "mse/median"), (0.0, 2, "mahalanobis", "median", False, "mse/same")],
)
def test_fast_path_equals_reference_path(monkeypatch, run_dir, tiny_data, memory, pairs, residual, blend, bf16_search, pixel):
    from stmae.model import memory as memory_module

    # The bf16 bank search on whatever CPU runs the tests (it is exact everywhere, fast with AMX);
    # otherwise the float32 search, also on an AMX machine.
    monkeypatch.setattr(memory_module, "bf16_matmul_is_fast", lambda: bf16_search)
    monkeypatch.setattr(memory_module, "SEARCH_MIN_BANK", 1)
    det = stmae.load(run_dir, device="cpu")
    det.config.infer.distance_weight, det.config.infer.num_pairs, det.config.infer.residual = memory, pairs, residual
    det.config.infer.blend = blend
    det.config.infer.pixel_residual, det.config.infer.pixel_blend = (pixel + "/same").split("/")[:2]
    if residual == "mahalanobis":
        from stmae.features import extract_features
        from stmae.data import open_dataset

        from stmae.fitting import fit_residual_stats

        det.residual_stats = fit_residual_stats(det.pipeline, extract_features(det.extractor, open_dataset(tiny_data).train, 64, quiet=True))
    images = to_tensor_batch([np.asarray(Image.open(p).convert("RGB")) for p in sorted((tiny_data / "test").rglob("*.png"))])
    feats = det.extractor(images)
    assert images.shape[0] > stmae.features.BACKBONE_CHUNK  # the backbone ran in chunks...
    torch.testing.assert_close(feats, det.extractor._features(images), rtol=0, atol=1e-5)  # ...as one call would
    fast_pixel, fast_score = det.pipeline.grid_pair(det.stats.apply(feats))
    ref_pixel, ref_score = reference_grid_maps(det, feats)
    torch.testing.assert_close(fast_pixel, ref_pixel, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast_score, ref_score, rtol=0, atol=1e-5)
    if pixel != "same" and memory < 1:  # two maps, and the pixel one is its own
        assert (fast_pixel - fast_score).abs().max() > 1e-3
    assert det.splits.shape[0] == pairs  # the pipeline follows a changed setting
    if memory > 0:  # the maps above came from the search asked for
        search = det.memory._bank_search[1]
        assert (search is not None) == bf16_search
        assert not bf16_search or (search._misses == 0 and not search.gave_up)  # bf16 ruled rows out itself


def test_detector_copies_what_it_is_given(run_dir):
    det = stmae.load(run_dir, device="cpu")
    cfg = copy.deepcopy(det.config)
    first = stmae.Detector(det.extractor, det.model, det.stats, cfg, memory=det.memory)
    first.config.infer.num_pairs = 5
    assert cfg.infer.num_pairs == 2 and first.extractor is not det.extractor and first.model is not det.model
    assert first.splits.shape[0] == 5


def test_inputs_of_every_kind_score_alike(run_dir, tiny_data):
    det = stmae.load(run_dir, device="cpu")
    path = sorted((tiny_data / "test" / "spot").glob("*.png"))[0]
    arr = np.array(Image.open(path))
    reference = det.predict(path)[0].score
    batch = np.stack([arr, arr])
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    preds = det.predict([arr, batch, tensor, torch.from_numpy(arr).permute(2, 0, 1).contiguous(), Image.open(path)])
    assert len(preds) == 1 + 2 + 2 + 1 + 1
    assert [p.score for p in preds] == pytest.approx([reference] * 7, rel=1e-5)
    folder = det.predict(tiny_data / "test")
    assert len(folder) == 6 and all(p.path for p in folder)
    with pytest.raises(DataError, match="no such file"):
        det.predict(tiny_data / "missing.png")
    with pytest.raises(DataError, match="not an image"):
        det.predict([object()])


def test_thresholds_and_normalised_scores(run_dir, tiny_data):
    det = stmae.load(run_dir, device="cpu")
    cal = det.calibration
    assert cal is not None and cal.rule == "max" and cal.n_images == 3
    assert det.threshold == cal.image_threshold
    preds = det.predict(tiny_data / "test")
    spot = [p for p in preds if "spot" in p.path]
    good = [p for p in preds if "good" in p.path]
    assert min(p.score for p in spot) > max(p.score for p in good)  # the detector detects
    assert all(p.label == 1 for p in spot)
    for p in preds:
        assert p.normalized == pytest.approx(float(normalize(p.score, cal.image_threshold, cal.center)))
        assert (p.normalized > 0.5) == (p.label == 1)
    # an override relabels, and moves 0.5 with it
    high = max(p.score for p in preds) + 1.0
    relabelled = det.predict(tiny_data / "test", threshold=high)
    assert all(p.label == 0 and p.normalized < 0.5 for p in relabelled)
    # pixel masks use the pixel threshold
    assert spot[0].mask().dtype == bool and spot[0].mask().shape == (64, 64)
    assert spot[0].mask()[20:34, 24:40].mean() > spot[0].mask().mean()


def test_threshold_rules():
    good = np.arange(1, 101, dtype=float)
    assert threshold_from(good, "max") == 100
    assert threshold_from(good, "quantile:0.5") == pytest.approx(50.5)
    assert threshold_from(good, "fpr:0.1") == pytest.approx(np.quantile(good, 0.9))
    assert parse_rule("FPR:0.01") == ("fpr", pytest.approx(0.99))
    for bad in ("median", "quantile:0", "fpr:1", "quantile:x"):
        with pytest.raises(ValueError, match="threshold rule"):
            parse_rule(bad)
    cal = calibrate(good, np.tile(good[:, None, None], (1, 2, 2)), "fpr:0.1")
    assert (np.array([cal.normalized(s) for s in good]) > 0.5).mean() == pytest.approx(0.1)
    assert cal.normalized(cal.center) == 0.0 and cal.normalized(cal.image_threshold) == 0.5
    assert Calibration.from_dict(cal.to_dict()) == cal
    with pytest.warns(ThresholdWarning, match="3 held-out good image"):
        calibrate([1.0, 2.0, 3.0])


def test_fit_threshold_rule_and_warning(tiny_data, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = stmae.fit(
            tiny_data, tmp_path / "q", tiny_config(**{"fit.threshold_rule": "quantile:0.5", "fit.min_calibration": 10, "fit.held_out": 0.3}),
            quiet=True,
        )
    assert any(issubclass(w.category, ThresholdWarning) for w in caught)
    cal = fitted.meta["calibration"]
    scores = fitted.meta["calibration_scores"]["all"]
    assert cal["rule"] == "quantile:0.5" and cal["image_threshold"] == pytest.approx(float(np.quantile(scores, 0.5)))
    assert cal["image_threshold"] < max(scores)


def mixed_folder(root: Path, good_source: Path) -> Path:
    """5 good images plus the four bad files of the reliability issue."""
    folder = root / "mixed"
    folder.mkdir()
    for i, p in enumerate(sorted(good_source.rglob("*.png"))[:5]):
        (folder / f"good_{i}.png").write_bytes(p.read_bytes())
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    data = (folder / "good_0.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("P", (20000, 20000)).save(folder / "bomb.png")  # 400 Mpx, a few kB on disk
    return folder


def test_a_batch_survives_bad_files(run_dir, tiny_data, tmp_path):
    det = stmae.load(run_dir, device="cpu")
    folder = mixed_folder(tmp_path, tiny_data / "test")
    results = list(det.iter_predict(folder))
    scored = [r for r in results if isinstance(r, Prediction)]
    skipped = {Path(r.item).name: r.reason for r in results if isinstance(r, Skipped)}
    assert len(scored) == 5 and set(skipped) == {"empty.png", "text.png", "truncated.png", "bomb.png"}
    assert all(reason for reason in skipped.values())
    with pytest.raises(DataError):
        list(det.iter_predict(folder, on_error="raise"))

    summary = predict_to_folder(det, [folder], tmp_path / "out")
    assert summary.scored == 5 and len(summary.skipped) == 4
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [r["path"] for r in rows] == [str(p) for p in sorted(folder.glob("good_*.png"))]
    assert all((tmp_path / "out" / r["heatmap"]).is_file() for r in rows)
    assert len(list(csv.DictReader(open(tmp_path / "out" / "skipped.csv")))) == 4
    assert not (tmp_path / "out" / "predictions.csv.partial").exists()


@pytest.mark.slow
def test_cli_predict_skips_bad_files_and_strict_stops(run_dir, tiny_data, tmp_path):
    folder = mixed_folder(tmp_path, tiny_data / "test")
    exe = Path(sys.executable).with_name("stmae")
    r = subprocess.run([str(exe), "predict", str(run_dir), str(folder), "--out", str(tmp_path / "p"), "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "5 images scored" in r.stdout and "4 skipped" in r.stdout
    assert r.stderr.count("skipped ") == 4 and "bomb.png" in r.stderr
    rows = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    assert len(rows) == 5 and set(rows[0]) == {"path", "score", "normalized", "label", "threshold", "heatmap"}
    r = subprocess.run([str(exe), "predict", str(run_dir), str(folder), "--out", str(tmp_path / "s"), "--strict", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_streaming_2000_images_keeps_memory_flat(run_dir, tmp_path, monkeypatch):
    det = stmae.load(run_dir, device="cpu")
    rng = np.random.default_rng(0)
    folder = tmp_path / "many"
    for i in range(2000):
        write_png(folder / f"{i // 100:02d}" / f"{i:04d}.png", rng.integers(90, 160, (16, 16, 3), dtype=np.uint8))
    import stmae.streaming as streaming

    decoded = {"n": 0}
    real = streaming.load_rgb

    def counting(item, max_pixels=None, reduce_to=None):
        decoded["n"] += 1
        return real(item, max_pixels, reduce_to)

    monkeypatch.setattr(streaming, "load_rgb", counting)
    bs = 16
    yielded, most_ahead = 0, 0
    rss_start = None
    for pred in det.iter_predict(folder, batch_size=bs):
        yielded += 1
        assert pred.path == str(folder / f"{(yielded - 1) // 100:02d}" / f"{yielded - 1:04d}.png")  # in input order
        most_ahead = max(most_ahead, decoded["n"] - yielded)
        if yielded == 200:
            rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert yielded == 2000
    assert most_ahead <= 2 * bs  # at most the batch being yielded and the one decoded ahead
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_start) / 1024
    assert grown_mb < 50, f"peak memory grew by {grown_mb:.0f} MB while streaming"


def test_fit_accepts_what_predict_accepts(tiny_data, tmp_path):
    files = sorted((tiny_data / "train" / "good").glob("*.png"))[::2]  # the 64 x 64 RGB ones
    arrays = np.stack([np.array(Image.open(f).convert("RGB")) for f in files])
    cfg = tiny_config(**{"train.epochs": 1})
    by_paths = stmae.fit([str(f) for f in files], tmp_path / "a", cfg, quiet=True)
    by_batch = stmae.fit(arrays, tmp_path / "b", cfg, quiet=True)
    by_tensor = stmae.fit(torch.from_numpy(arrays).permute(0, 3, 1, 2), tmp_path / "c", cfg, quiet=True)
    assert by_paths.meta["n_train"] + by_paths.meta["n_val"] == len(files)
    # the same pixels train the same model, whichever way they came in
    assert by_batch.meta["losses"] == pytest.approx(by_paths.meta["losses"], rel=1e-5)
    assert by_tensor.meta["losses"] == pytest.approx(by_batch.meta["losses"], rel=1e-6)
    with pytest.raises(DataError, match="<array 0\\[1\\]>|array"):
        stmae.fit(np.zeros((3, 8, 8, 3), dtype=np.int64), tmp_path / "d", cfg, quiet=True)


@pytest.mark.slow
def test_cli_fit_threshold_rule(tiny_data, tmp_path):
    exe = Path(sys.executable).with_name("stmae")
    cfg = tmp_path / "tiny.yaml"
    tiny_config(**{"train.epochs": 1, "fit.held_out": 0.3}).save(cfg)
    r = subprocess.run([str(exe), "fit", str(tiny_data), "--out", str(tmp_path / "r"), "--config", str(cfg),
                        "--threshold-rule", "fpr:0.5", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["calibration"]["rule"] == "fpr:0.5"
    assert meta["calibration"]["image_threshold"] == pytest.approx(float(np.quantile(meta["calibration_scores"]["all"], 0.5)))
    r = subprocess.run([str(exe), "fit", str(tiny_data), "--out", str(tmp_path / "s"), "--config", str(cfg),
                        "--threshold-rule", "median", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "threshold_rule" in r.stderr
