"""research/ablation.py: synthetic validation defects, result merging/rendering, a tiny real run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stmae_research import scoring
from tests.conftest import RESEARCH, SHARED_DATA, load_benchmark

ablation = load_benchmark("ablation", RESEARCH)


def test_synthetic_defect_is_local_seeded_and_masked():
    image = np.full((128, 128, 3), 120, np.uint8)
    a, mask_a, kind_a = ablation.synthetic_defect(image, np.random.default_rng(3))
    b, mask_b, kind_b = ablation.synthetic_defect(image, np.random.default_rng(3))
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b) and kind_a == kind_b
    assert mask_a.shape == (128, 128) and mask_a.dtype == bool and mask_a.any()
    changed = np.abs(a.astype(int) - image).max(axis=2) > 0
    assert changed[mask_a].mean() > 0.9  # the painted region changes ...
    near = torch.nn.functional.max_pool2d(torch.from_numpy(mask_a).float()[None, None], 41, 1, 20)[0, 0].bool()
    assert not changed[~near.numpy()].any()  # ... and nothing 20 px away from it does
    drawn = [ablation.synthetic_defect(image, np.random.default_rng(s)) for s in range(40)]
    assert min(d[1].sum() for d in drawn) < 300 < max(d[1].sum() for d in drawn)  # small and large both occur
    assert {d[2] for d in drawn} == set(ablation.SYNTHETIC_KINDS)
    uneven = [d[1].sum() for d in drawn if d[2] == "uneven"]
    assert min(uneven) > max(d[1].sum() for d in drawn if d[2] in ("dark_blob", "bright_blob"))


def test_long_crack_is_long_thin_faint_seeded_and_inside_the_image():
    image = np.full((256, 256, 3), 200, np.uint8)
    a, mask_a, kind = ablation.long_crack_defect(image, np.random.default_rng(5))
    b, mask_b, _ = ablation.long_crack_defect(image, np.random.default_rng(5))
    assert kind == "long_crack" and np.array_equal(a, b) and np.array_equal(mask_a, mask_b)
    for seed in range(20):
        img, mask, _ = ablation.long_crack_defect(image, np.random.default_rng(seed))
        ys, xs = np.nonzero(mask)
        extent = max(np.ptp(ys), np.ptp(xs))
        assert extent > 0.25 * 256  # long: it spans a quarter of the image or more ...
        assert mask.sum() < 3 * 0.8 * 256  # ... and thin: at most ~2 px wide along its length
        darkening = 1 - img[mask].astype(float).mean() / 200
        assert 0.1 < darkening < 0.45  # faint, never black
        assert ablation.PAINTERS["mt_extended"] is ablation.long_crack_defect


def test_edge_crack_starts_at_an_edge_and_stays_short_and_faint():
    image = np.full((256, 256, 3), 200, np.uint8)
    for seed in range(20):
        img, mask, kind = ablation.edge_crack_defect(image, np.random.default_rng(seed))
        ys, xs = np.nonzero(mask)
        assert kind == "edge_crack" and mask.any()
        assert min(ys.min(), xs.min(), 255 - ys.max(), 255 - xs.max()) <= 2  # touches an edge
        assert max(np.ptp(ys), np.ptp(xs)) < 0.4 * 256  # short
        assert 0.15 < 1 - img[mask].astype(float).mean() / 200 < 0.55  # faint, never black
    assert ablation.PAINTERS["mt_edge"] is ablation.edge_crack_defect


def test_per_type_auroc_scores_each_kind_against_all_good_images():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    types = np.array(["good", "good", "good", "crack", "crack", "uneven", "uneven"])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.25, 0.05])
    per = ablation.per_type_auroc(labels, types, scores)
    assert per == {"crack": pytest.approx(1.0), "uneven": pytest.approx(2 / 6)}
    assert ablation.per_type_auroc(labels, np.array(["good"] * 3 + ["crack"] * 4), scores) == {}
    assert ablation.per_type_auroc(labels, None, scores) == {}


def _row(tasks: dict[str, float]) -> dict:
    return {"per_task": {t: {"scores": {"mse/max": {"image_auroc": v, "per_type": {"crack": v / 2}},
                                        "knn/max": {"image_auroc": 0.9}},
                             "train_seconds": 1.0} for t, v in tasks.items()}}


def test_rows_compare_on_common_tasks_only():
    results = {"protocol": "fmnist", "description": "d",
               "variants": {"base": _row({"0": 0.8, "1": 0.6, "2": 1.0}), "x": _row({"0": 0.9, "2": 0.7})}}
    common, means = ablation.common_means(results)
    assert common == ["0", "2"]
    assert means["base"]["mse/max"]["image_auroc"] == pytest.approx(0.9)
    assert means["x"]["mse/max"]["image_auroc"] == pytest.approx(0.8)
    text = ablation.render(results)
    assert "| base | - | **0.900** | 1 |" in text and "knn/max 0.900" in text
    assert "| base | mse/max | 0.450 |" in text and "| x | mse/max | 0.400 |" in text  # per kind, common tasks


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "mnist_5k").is_dir(), reason="needs ../shared/data/mnist_5k")
def test_tiny_run_writes_and_merges(tmp_path, monkeypatch):
    from stmae import provenance

    clean = {"commit": "a" * 40, "dirty": False, "modified": []}
    monkeypatch.setattr(provenance, "git_state", lambda repo=None: dict(clean))
    out = tmp_path / "abl.json"
    common = ["--protocol", "mnist", "--classes", "1", "--train-limit", "12", "--val", "30", "--epochs", "1",
              "--scoring", "mse/max,mahalanobis/topk", "--out", str(out), "--data", str(SHARED_DATA)]
    ablation.main([*common, "--variants", "base"])
    ablation.main([*common, "--variants", "ema_0.99,aggregate_1,aggregate_3"])  # aggregate_1 = the base: skipped
    data = json.loads(out.read_text())
    assert list(data["variants"]) == ["base", "ema_0.99", "aggregate_3"]
    # the kNN yardstick is re-run where the features change, and only there
    assert "knn/max" not in data["variants"]["ema_0.99"]["per_task"]["1"]["scores"]
    assert "knn/max" in data["variants"]["aggregate_3"]["per_task"]["1"]["scores"]
    scores = data["variants"]["base"]["per_task"]["1"]["scores"]
    assert set(scores) == {"mse/max", "mahalanobis/topk", "knn/max", "knn/topk"}
    # digit 1 against all others is easy even after one epoch (written: 0.990 / 1.0 / 1.0 / 1.0)
    assert scores["knn/max"]["image_auroc"] == 1.0
    assert min(v["image_auroc"] for v in scores.values()) >= 0.95, scores
    assert data["variants"]["ema_0.99"]["knobs"] == {"train.ema": 0.99}  # a research knob, not a setting
    assert "ema" not in data["variants"]["ema_0.99"]["config"]["train"]
    md = out.with_suffix(".md").read_text()
    assert "| ema_0.99 | train.ema=0.99 |" in md
    assert "kNN yardstick (greedy 10 % coreset) on the features of `aggregate_3`: knn/max" in md
    with pytest.raises(SystemExit, match="unknown variant"):
        ablation.main([*common, "--variants", "nope"])
    assert data["setup"] == {"val": 30, "epochs": 1, "train_limit": 12}
    before = out.read_text()
    other_val = [a if a != "30" else "40" for a in common]
    with pytest.raises(SystemExit, match=r"abl\.json: .*val: recorded 30, now 40"):
        ablation.main([*other_val, "--variants", "base"])
    assert out.read_text() == before  # nothing merged, nothing rewritten
    assert data["variants"]["base"]["provenance"]["commit"] == "a" * 40
    # rows made by other code are not merged: another commit, then a dirty tree
    clean["commit"] = "b" * 40
    with pytest.raises(SystemExit, match=r"abl\.json: row 'base' was made at commit aaaaaaaaaa; this run is at commit bbbbbbbbbb"):
        ablation.main([*common, "--variants", "epochs_x2"])
    clean.update(commit="a" * 40, dirty=True, modified=["src/stmae/infer.py"])
    with pytest.raises(SystemExit, match=r"uncommitted changes \(src/stmae/infer.py\)"):
        ablation.main([*common, "--variants", "epochs_x2"])
    assert out.read_text() == before


def test_memory_scoring_variant_blends_with_a_bank_of_the_training_features():
    import copy

    from stmae.features import FeatureStats
    from stmae.infer import Detector, build_extractor, build_model

    from tests.conftest import tiny_config

    cfg = tiny_config(**{"infer.distance_weight": 0.0, "infer.pixel_residual": "same"})
    ext = build_extractor(cfg).eval()
    torch.manual_seed(0)
    g = cfg.features.grid_size
    train, val = torch.randn(4, ext.out_channels, g, g), torch.randn(6, ext.out_channels, g, g)
    val[3:, :, :2, :2] += 3.0
    det = Detector(ext, build_model(cfg, ext.out_channels), FeatureStats.from_features(train), copy.deepcopy(cfg))
    labels = np.array([0, 0, 0, 1, 1, 1])
    rows = ablation.score_variants(det, train, val, labels, None, ["mse_cos/max", "mse_cos/max/memory0.8"])
    assert det.memory is None and det.config.infer.distance_weight == 0.0  # the detector is left as it was
    det.config.infer.distance_weight = 0.8
    from stmae.fitting import fit_memory

    det.memory = fit_memory(det.pipeline, train, train, seed=cfg.train.seed)
    expected = ablation.validation_row(labels, None, None, *scoring.score_features(det, val))
    assert rows["mse_cos/max/memory0.8"]["image_auroc"] == pytest.approx(expected["image_auroc"])
    assert rows["mse_cos/max/memory0.8"]["image_auroc"] == 1.0  # the shifted corner is far from every banked patch


@pytest.mark.skipif(not (SHARED_DATA / "magnetic_tile" / "magnetic_tile").is_dir(),
                    reason="needs ../shared/data/magnetic_tile")
def test_mt_real_validates_on_mt_val_only():
    from stmae.data import load_mvtec
    from stmae_research.protocols import split_real_defects

    ablation.set_data_root(SHARED_DATA)
    [(name, task)] = ablation.mt_real_task(64)
    ds = load_mvtec(SHARED_DATA / "magnetic_tile" / "magnetic_tile")
    halves = split_real_defects(ds.test, seed=0)
    val = {str(s.path) for s in halves["mt_val"]}
    test = {str(s.path) for s in halves["mt_test"]}
    seen = {str(s.path) for s in task.test}
    assert seen == val and not seen & test  # validation is mt_val, and nothing of mt_test
    assert len(task.train) == 200 and not {str(s.path) for s in task.train} & (val | test)
    assert task.masks.shape == (len(task.test), 64, 64)
    labels = np.array([s.label for s in task.test])
    # defect images carry their masks (one 'uneven' mask in the data set is empty), good ones none
    masked = task.masks[labels == 1].reshape(int(labels.sum()), -1).any(axis=1)
    assert masked.sum() >= len(masked) - 1 and labels.sum() > 100
    assert not task.masks[labels == 0].any()
