"""Input geometry: tiles and aspect-keeping scaling (stmae.geometry) through fit, predict,
test, export and the CLI, and a small-defect set that a squeezed model cannot see."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import stmae
from stmae.train import holdout_split
from stmae.config import ConfigError
from stmae.data import open_dataset
from stmae.evaluate import evaluate
from stmae.geometry import Geometry, tile_starts
from stmae.metrics import auroc, compute_metrics

from .conftest import tiny_config, write_png


# --------------------------------------------------------------------------- the geometry
@pytest.mark.parametrize("length,tile,overlap", [(64, 64, 0.25), (65, 64, 0.25), (301, 64, 0.25), (1000, 64, 0.5),
                                                 (257, 64, 0.0), (129, 32, 0.9)])
def test_tiles_cover_the_side_overlap_enough_and_end_at_the_edge(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    assert starts == sorted(set(starts))
    steps = np.diff(starts)
    # neighbours share at least `overlap` of a tile (rounding of the even spread: one pixel)
    assert (steps <= tile * (1 - overlap) + 1).all() and (steps >= 1).all()
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    # the fewest such tiles: one fewer could not reach the edge
    if len(starts) > 1:
        assert (len(starts) - 2) * max(1, int(tile * (1 - overlap))) + tile < length


def _reference_stitch(maps: np.ndarray, corners, tile: int, overlap: float, shape) -> np.ndarray:
    """Pixel by pixel: the weighted mean of the tiles covering it, weight = ramp(row) x ramp(col),
    ramp(d) = min(1, (distance to the tile's nearer edge + 1) / overlap pixels)."""
    ramp_len = max(1, round(tile * overlap))
    out = np.zeros(shape)
    for y in range(shape[0]):
        for x in range(shape[1]):
            num = den = 0.0
            for m, (r, c) in zip(maps, corners):
                if r <= y < r + tile and c <= x < c + tile:
                    dy, dx = y - r, x - c
                    w = min(1.0, (min(dy, tile - 1 - dy) + 1) / ramp_len) * min(1.0, (min(dx, tile - 1 - dx) + 1) / ramp_len)
                    num += w * m[dy, dx]
                    den += w
            out[y, x] = num / den
    return out


@pytest.mark.parametrize("shape", [(70, 101), (40, 50), (64, 64)])
def test_stitched_maps_equal_a_reference_stitch(shape):
    geo = Geometry(mode="tile", size=32, overlap=0.25)
    rgb = np.zeros((*shape, 3), np.uint8)
    tiles, layout = geo.split(rgb)
    assert tiles.shape[1:] == (32, 32, 3) and len(tiles) == layout.count
    maps = np.random.default_rng(0).random((layout.count, 32, 32)).astype(np.float32)
    got = geo.stitch(maps, layout)
    assert got.shape == shape and got.dtype == np.float32
    ref = _reference_stitch(maps, layout.corners, 32, 0.25, layout.padded)[: shape[0], : shape[1]]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # no seams: identical tile maps of one value stitch to that value everywhere
    np.testing.assert_allclose(geo.stitch(np.full_like(maps, 3.5), layout), 3.5, rtol=1e-6)


@pytest.mark.parametrize("mode,shape,tile,scale", [("tile", (97, 301), 0, 1.0), ("tile", (150, 230), 48, 0.5),
                                                   ("tile", (20, 300), 0, 1.0), ("aspect", (300, 97), 0, 1.0)])
def test_split_then_stitch_gives_back_the_scaled_image(mode, shape, tile, scale):
    """Each tile's own pixels, stitched, are the image as the geometry scales it: every tile
    is cut from the right place (odd sizes, a side shorter than a tile, resized tiles)."""
    geo = Geometry(mode=mode, size=32, tile=tile, scale=scale)
    if geo.tile_side == geo.size:  # tiles cut as they are: any image, compared exactly
        rgb = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    else:  # resized tiles: a smooth image, which bilinear resampling there and back keeps
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        smooth = 128 + 100 * np.sin(xx / 11.0) * np.cos(yy / 13.0)
        rgb = np.repeat(smooth[..., None], 3, axis=2).astype(np.uint8)
    tiles, layout = geo.split(rgb)
    stitched = geo.stitch(tiles[..., 0].astype(np.float32), layout)
    assert stitched.shape == geo.map_shape(*shape)
    if mode == "aspect":
        assert min(stitched.shape) == 32 and stitched.shape[0] / stitched.shape[1] == pytest.approx(300 / 97, rel=0.02)
    from stmae.data import resize_image

    expected = resize_image(rgb, stitched.shape)[..., 0].astype(np.float32)
    err = np.abs(stitched - expected)
    if geo.tile_side == geo.size:
        assert err.max() <= 1e-3
    else:  # a tile cut from the wrong place would be off by tens of grey levels
        assert err.mean() <= 2.0 and err.max() <= 12.0, (err.mean(), err.max())


def test_geometry_settings_are_checked():
    with pytest.raises(ConfigError, match="features.geometry"):
        tiny_config(**{"features.geometry": "crop"}).validate()
    with pytest.raises(ConfigError, match="tile and features.scale apply"):
        tiny_config(**{"features.scale": 0.5}).validate()
    with pytest.raises(ConfigError, match="tile_overlap"):
        tiny_config(**{"features.geometry": "tile", "features.tile_overlap": 0.95}).validate()


# --------------------------------------------------------------------------- a tiled run
def _odd_category(root: Path) -> Path:
    """Noise textures of mixed, odd sizes; test images with a red square (masked)."""
    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = ((150, 230), (97, 301), (64, 64), (40, 120))[i % 4]
        write_png(root / "train" / "good" / f"{i:03d}.png", rng.integers(90, 160, (h, w, 3), dtype=np.uint8))
    for i in range(3):
        write_png(root / "test" / "good" / f"{i:03d}.png", rng.integers(90, 160, (130, 211, 3), dtype=np.uint8))
        img = rng.integers(90, 160, (130, 211, 3), dtype=np.uint8)
        mask = np.zeros((130, 211), np.uint8)
        r, c = 20 + 30 * i, 40 + 50 * i
        mask[r : r + 12, c : c + 14] = 255
        img[mask > 0] = (250, 20, 20)
        write_png(root / "test" / "square" / f"{i:03d}.png", img)
        write_png(root / "ground_truth" / "square" / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> tuple[stmae.FitResult, Path]:
    root = _odd_category(tmp_path_factory.mktemp("tiled") / "data")
    cfg = tiny_config(**{"fit.held_out": 0.25, "features.geometry": "tile", "features.tile_overlap": 0.25})
    return stmae.fit(root, root.parent / "run", cfg, quiet=True), root


def test_tiled_fit_records_its_geometry_and_calibrates_whole_images(tiled):
    fitted, _ = tiled
    meta = fitted.meta
    assert meta["geometry"] == {"mode": "tile", "size": 64, "tile": 64, "overlap": 0.25, "scale": 1.0}
    geo = Geometry.from_features(fitted.detector.config.features)
    layouts = [geo.layout(h, w) for h, w in ((150, 230), (97, 301), (64, 64), (40, 120))]
    assert meta["n_train_tiles"] > meta["n_train"] and meta["n_train"] == 6
    # training images are 000..007 in order, sized by i % 4; the held-out split is the fit's own
    train_idx, _ = holdout_split(8, 0.25, fitted.detector.config.train.seed)
    assert meta["n_train_tiles"] == sum(layouts[i % 4].count for i in train_idx)
    # one calibration score per held-out image, not per tile
    assert len(meta["calibration_scores"]["all"]) == 2 and fitted.detector.calibration.n_images == 2
    # the geometry is fit-time: a loaded model refuses to change it
    det = stmae.load(fitted.run_dir)
    assert det.geometry == geo
    with pytest.raises(ConfigError):
        det.config.set("features.geometry", "resize")


def test_tiled_predict_keeps_each_images_shape_and_finds_the_square(tiled):
    fitted, root = tiled
    det = stmae.load(fitted.run_dir)
    rng = np.random.default_rng(5)
    good = rng.integers(90, 160, (131, 257, 3), dtype=np.uint8)
    bad = good.copy()
    bad[70:82, 180:194] = (250, 20, 20)
    small = rng.integers(90, 160, (30, 45, 3), dtype=np.uint8)  # smaller than one tile
    preds = det.predict([good, bad, small], batch_size=5)  # tiles of several images per engine call
    assert [p.anomaly_map.shape for p in preds] == [(131, 257), (131, 257), (30, 45)]
    # (no claim on the good image's label: a threshold from two held-out images is not a decision)
    assert preds[1].score > 2 * preds[0].score and preds[1].label == 1
    r, c = np.unravel_index(preds[1].anomaly_map.argmax(), preds[1].anomaly_map.shape)
    assert 66 <= r < 86 and 176 <= c < 198
    # one image alone, in other batches, and in a stream: the same map and score
    alone = det.predict([bad], batch_size=1)[0]
    np.testing.assert_allclose(alone.anomaly_map, preds[1].anomaly_map, rtol=1e-5, atol=1e-5 * preds[1].score)
    assert alone.score == pytest.approx(preds[1].score, rel=1e-5)
    full = det.predict([bad], full_resolution=True)[0]
    assert full.anomaly_map.shape == (131, 257)


def test_tiled_test_scores_at_native_size_by_default_and_equals_a_direct_computation(tiled):
    fitted, root = tiled
    det = fitted.detector
    dataset = open_dataset(root)
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    ev = evaluate(det, dataset, quiet=True, on_image=lambda i, s, m, k: seen.append((m, k)))
    assert ev.eval_size == "native" and all(m.shape == (130, 211) == k.shape for m, k in seen)
    samples = dataset.test
    preds = det.predict([s.path for s in samples], full_resolution=True)
    masks = np.stack([s.load_mask() if s.mask_path else np.zeros((130, 211), bool) for s in samples])
    direct = compute_metrics([s.label for s in samples], [p.score for p in preds], masks,
                             np.stack([p.anomaly_map for p in preds]))
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap"):
        assert ev.metrics[key] == pytest.approx(direct[key], abs=1e-6), key
    assert ev.metrics["image_auroc"] == 1.0 and ev.metrics["pixel_auroc"] > 0.9  # it detects
    model = evaluate(det, dataset, quiet=True, eval_size="model")
    assert model.eval_size == "model"  # masks at the map's size: here the same, the map keeps the image's


@pytest.mark.slow
def test_exported_tiled_run_tiles_and_stitches_in_numpy_like_torch(tiled, tmp_path):
    from stmae.export import export_model
    from stmae.runtime import open_model, sidecar_path

    from .test_export import assert_same_predictions

    fitted, root = tiled
    path = export_model(fitted.run_dir, tmp_path / "tiled.onnx")
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["geometry"]["mode"] == "tile"
    model = open_model(path, engine="onnxruntime")
    assert model.geometry == fitted.detector.geometry
    images = sorted((root / "test").rglob("*.png"))
    small = np.random.default_rng(2).integers(90, 160, (30, 45, 3), dtype=np.uint8)
    ref = fitted.detector.predict([*images, small], full_resolution=True)
    got = model.predict([*images, small], full_resolution=True, batch_size=4)
    assert {p.label for p in ref} == {0, 1}
    assert_same_predictions(ref, got, fitted.detector.threshold)


@pytest.mark.slow
def test_cli_fit_predict_test_with_tiles(tmp_path):
    from .test_cli import run

    root = _odd_category(tmp_path / "data")
    cfg = tmp_path / "tiny.yaml"
    tiny_config(**{"fit.held_out": 0.25}).save(cfg)
    r = run("fit", str(root), "--out", str(tmp_path / "run"), "--config", str(cfg), "--tile", "64",
            "--tile-overlap", "0.3", "-q")
    assert r.returncode == 0, r.stderr
    assert "tiles of 64 px" in r.stdout
    saved = json.loads((tmp_path / "run" / "meta.json").read_text())["geometry"]
    assert saved["mode"] == "tile" and saved["overlap"] == 0.3
    r = run("predict", str(tmp_path / "run"), str(root / "test"), "--out", str(tmp_path / "pred"), "-q")
    assert r.returncode == 0, r.stderr
    r = run("test", str(tmp_path / "run"), str(root), "--out", str(tmp_path / "eval"), "-q")
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["eval_size"] == "native" and results["image_auroc"] == 1.0
    r = run("fit", str(root), "--out", str(tmp_path / "bad"), "--config", str(cfg), "--scale", "0.5", "-q")
    assert r.returncode == 2 and "--tile" in r.stderr


# --------------------------------------------------------------------------- small defects
def _striped(rng: np.random.Generator, h: int, w: int, defect: bool) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    """A texture of horizontal stripes (period 4 px); a defect is a 4-16 px square of vertical
    stripes with the same mean, so a squeeze that averages the stripes away erases it."""
    g = 128 + 50 * (2 * ((np.arange(h) // 2) % 2)[:, None] - 1) + rng.normal(0, 8, (h, w))
    box = None
    if defect:
        s = int(rng.integers(4, 17))
        r, c = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        g[r : r + s, c : c + s] = 128 + 50 * (2 * ((np.arange(s) // 2) % 2)[None, :] - 1) + rng.normal(0, 8, (s, s))
        box = (r, c, s)
    return np.repeat(np.clip(g, 0, 255).astype(np.uint8)[..., None], 3, axis=2), box


@pytest.mark.slow
def test_tiles_find_small_defects_on_a_large_texture_that_a_squeeze_erases(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train = [_striped(rng, 1024, 1024, False)[0] for _ in range(4)]
    test = [_striped(rng, 1024, 1024, i % 2 == 1) for i in range(8)]
    labels = np.array([int(b is not None) for _, b in test])
    common = {"fit.held_out": 0.25, "train.batch_size": 64, "infer.batch_size": 64}
    results = {}
    for name, geometry in (("squeezed", {}), ("tiled", {"features.geometry": "tile"})):
        det = stmae.fit(train, tmp_path / name, tiny_config(**common, **geometry), quiet=True).detector
        preds = det.predict([x for x, _ in test], full_resolution=True)
        results[name] = (auroc(labels, np.array([p.score for p in preds])), preds, det)
    assert results["squeezed"][0] <= 0.75  # near chance: the squeeze averaged the defects away
    assert results["tiled"][0] >= 0.9
    assert _peaks_on_defects(results["tiled"][1], test) == [True] * int(labels.sum())
    # negative control: the same tiling and stitching over a model whose tile maps and scores
    # are noise neither ranks the defects nor puts its peaks on them (the frozen features'
    # own statistics would still find these defects, so the noise replaces the whole engine step)
    det = results["tiled"][2]
    rng_noise = np.random.default_rng(0)
    monkeypatch.setattr(det, "score_uint8", lambda batch: (rng_noise.random(batch.shape[:3], dtype=np.float32),
                                                          rng_noise.random(len(batch), dtype=np.float32)))
    noise = det.predict([x for x, _ in test], full_resolution=True)
    assert [p.anomaly_map.shape for p in noise] == [(1024, 1024)] * len(test)
    noise_auroc = auroc(labels, np.array([p.score for p in noise]))
    assert not (noise_auroc >= 0.9 and all(_peaks_on_defects(noise, test))), noise_auroc


def _peaks_on_defects(preds, test) -> list[bool]:
    """For each defective image: is its map's peak on the defect (4 px of slack)?"""
    inside = []
    for p, (_, box) in zip(preds, test):
        if box is None:
            continue
        r, c = np.unravel_index(p.anomaly_map.argmax(), p.anomaly_map.shape)
        top, left, side = box
        inside.append(bool(top - 4 <= r < top + side + 4 and left - 4 <= c < left + side + 4))
    return inside
