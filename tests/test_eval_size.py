"""Pixel metrics at the model input size and at each mask's own size (``eval_size``), and the
bounded-memory subsample of normal pixels (``pixel_budget``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import stmae
from stmae.data import open_dataset
from stmae.evaluate import evaluate
from stmae.metrics import PixelMetricAccumulator, compute_metrics

from .conftest import tiny_config, write_png


def _thin_crack_category(root: Path) -> Path:
    """Good noise textures for training; non-square 150 x 220 test images, half with a
    one-pixel-tall bright crack that a resize to 64 px (nearest) mostly deletes from the mask."""
    rng = np.random.default_rng(3)
    for i in range(8):
        write_png(root / "train" / "good" / f"{i:03d}.png", rng.integers(90, 160, (150, 220, 3), dtype=np.uint8))
    for i in range(3):
        write_png(root / "test" / "good" / f"{i:03d}.png", rng.integers(90, 160, (150, 220, 3), dtype=np.uint8))
        img = rng.integers(90, 160, (150, 220, 3), dtype=np.uint8)
        mask = np.zeros((150, 220), np.uint8)
        row = 40 + 25 * i + 1  # an odd row: nearest resizing to 64 rows keeps about 1 row in 2.3
        mask[row, 30:190] = 255
        img[mask > 0] = 250
        write_png(root / "test" / "crack" / f"{i:03d}.png", img)
        write_png(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture(scope="module")
def crack_run(tmp_path_factory) -> tuple[stmae.Detector, Path]:
    root = _thin_crack_category(tmp_path_factory.mktemp("crack") / "data")
    fitted = stmae.fit(root, root.parent / "run", tiny_config(), quiet=True)
    return fitted.detector, root


def test_native_metrics_equal_a_direct_full_size_computation(crack_run):
    det, root = crack_run
    dataset = open_dataset(root)
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    native = evaluate(det, dataset, quiet=True, eval_size="native", on_image=lambda i, s, m, k: seen.append((m, k)))
    assert native.eval_size == "native" and native.pixel_fraction == 1.0
    assert all(m.shape == (150, 220) and k.shape == (150, 220) for m, k in seen)
    # Direct: predict's own full-resolution maps against the masks as stored, all pixels at once.
    samples = dataset.test
    preds = det.predict([s.path for s in samples], full_resolution=True)
    masks = [s.load_mask() if s.mask_path else np.zeros((150, 220), bool) for s in samples]
    direct = compute_metrics([s.label for s in samples], [p.score for p in preds], np.stack(masks),
                             np.stack([p.anomaly_map for p in preds]))
    for key in ("pixel_auroc", "pixel_ap", "aupro", "image_auroc"):
        # Same resize of the same model-size maps; float32 rounding of the map values at most.
        assert native.metrics[key] == pytest.approx(direct[key], abs=1e-6), key
    # Every crack pixel counts at native size; the model-size masks kept only part of them.
    defect_pixels = sum(int(k.sum()) for _, k in seen)
    assert defect_pixels == 3 * 160
    model = evaluate(det, dataset, quiet=True, on_image=lambda i, s, m, k: seen.append((m, k)))
    assert model.eval_size == "model"
    assert sum(int(k.sum()) for _, k in seen[len(samples):]) < defect_pixels * (64 / 150) * (64 / 220) * 3
    # The detector detects the bright crack at native size: far above chance.
    assert native.metrics["pixel_auroc"] > 0.8


def test_native_metrics_of_noise_maps_are_at_chance(crack_run):
    """Replace the model by noise: the same native protocol gives chance-level pixel AUROC."""
    det, root = crack_run
    dataset = open_dataset(root)
    rng = np.random.default_rng(0)
    acc = PixelMetricAccumulator()
    for s in dataset.test:
        mask = s.load_mask() if s.mask_path else np.zeros((150, 220), bool)
        acc.update(mask, rng.random(mask.shape))
    assert abs(acc.result()["pixel_auroc"] - 0.5) < 0.05


def test_a_pixel_budget_subsamples_normal_pixels_and_keeps_auroc_and_aupro(crack_run):
    det, root = crack_run
    dataset = open_dataset(root)
    exact = evaluate(det, dataset, quiet=True, eval_size="native")
    kept = evaluate(det, dataset, quiet=True, eval_size="native", pixel_budget=6 * 150 * 220 // 4)
    assert kept.pixel_fraction == pytest.approx(0.25)
    for key in ("pixel_auroc", "aupro"):  # unbiased estimates from a quarter of the normal pixels
        assert kept.metrics[key] == pytest.approx(exact.metrics[key], abs=0.02), key
    assert kept.metrics["pixel_ap"] == pytest.approx(exact.metrics["pixel_ap"], rel=0.15)
    assert kept.metrics["image_auroc"] == exact.metrics["image_auroc"]  # image metrics are untouched
    with pytest.raises(ValueError, match="eval_size must be one of"):
        evaluate(det, dataset, quiet=True, eval_size="full")


def test_accumulator_subsample_keeps_every_defect_pixel_and_rescales_false_positives():
    rng = np.random.default_rng(1)
    masks = np.zeros((20, 60, 60), bool)
    masks[:, 10:14, 5:50] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    exact, half = PixelMetricAccumulator(), PixelMetricAccumulator(normal_fraction=0.5, seed=3)
    for m, a in zip(masks, maps):
        exact.update(m, a)
        half.update(m, a)
    data = half._collect()
    assert int((data.region_ids > 0).sum()) == int(masks.sum())  # every defect pixel kept
    assert abs(int(data.region_sizes[0]) - 0.5 * int((~masks).sum())) < 0.02 * (~masks).sum()
    e, h = exact.result(), half.result()
    assert h["pixel_auroc"] == pytest.approx(e["pixel_auroc"], abs=0.005)
    assert h["aupro"] == pytest.approx(e["aupro"], abs=0.01)
    # AP counts false positives: rescaled, it matches; unscaled it would be clearly higher.
    assert h["pixel_ap"] == pytest.approx(e["pixel_ap"], rel=0.02)
    with pytest.raises(ValueError, match="normal_fraction"):
        PixelMetricAccumulator(normal_fraction=0.0)


@pytest.mark.slow
def test_cli_test_eval_size_native_writes_what_it_measured(crack_run, tmp_path):
    from .test_cli import run

    det, root = crack_run
    run_dir = root.parent / "run"
    r = run("test", str(run_dir), str(root), "--out", str(tmp_path / "eval"), "--eval-size", "native",
            "--pixel-budget", str(6 * 150 * 220 // 2), "-q")
    assert r.returncode == 0, r.stderr
    import json

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["eval_size"] == "native" and results["pixel_fraction"] == pytest.approx(0.5)
    assert "of the normal pixels (--pixel-budget)" in r.stdout
    r = run("test", str(run_dir), str(root), "--out", str(tmp_path / "bad"), "--eval-size", "full", "-q")
    assert r.returncode == 2 and "--eval-size" in r.stderr and "native" in r.stderr
