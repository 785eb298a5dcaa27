"""research/probe_memory.py: the guided distance spans snap-to-manifold .. plain kNN; the hybrid's scale."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import RESEARCH, load_benchmark, tiny_config

probe = load_benchmark("probe_memory", RESEARCH)


def test_guided_distance_runs_from_the_snapped_reconstruction_to_the_plain_knn():
    gen = torch.Generator().manual_seed(0)
    bank, queries, recon = torch.randn(50, 4, generator=gen), torch.randn(30, 4, generator=gen), torch.randn(30, 4, generator=gen)
    nearest, guided = probe.guided_distances(queries, recon, bank, (1, 5, 50, 80))
    full = torch.cdist(queries, bank)
    assert torch.allclose(nearest, full.amin(1))
    snapped = bank[torch.cdist(recon, bank).argmin(1)]  # k = 1: the residual against the snapped reconstruction
    assert torch.allclose(guided[1], (queries - snapped).norm(dim=1), atol=1e-5)
    assert torch.allclose(guided[50], nearest) and torch.allclose(guided[80], nearest)
    assert torch.all(guided[1] >= guided[5]) and torch.all(guided[5] >= guided[50])  # more eligible, never farther


def test_guided_distance_depends_on_the_reconstruction_not_on_which_query_it_came_from():
    bank = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    queries = torch.tensor([[9.0, 0.0], [9.0, 0.0]])
    recon = torch.tensor([[1.0, 0.0], [9.5, 0.0]])  # the first reconstruction expects the other pattern
    nearest, guided = probe.guided_distances(queries, recon, bank, (1,))
    assert nearest.tolist() == pytest.approx([1.0, 1.0])
    assert guided[1].tolist() == pytest.approx([9.0, 1.0])
    with pytest.raises(ValueError, match="differ"):
        probe.guided_distances(queries, recon[:1], bank, (1,))


def test_hybrid_puts_both_maps_on_their_median_scale():
    knn_map = torch.tensor([[1.0, 2.0, 3.0]]) * 100
    resid = torch.tensor([[3.0, 2.0, 1.0]])
    assert probe.hybrid(knn_map, resid, 0.0)[0].tolist() == pytest.approx([0.5, 1.0, 1.5])
    assert probe.hybrid(knn_map, resid, 1.0)[0].tolist() == pytest.approx([2.0, 2.0, 2.0])


def test_residual_column_is_the_packages_scoring_and_knn_column_its_yardstick():
    from stmae_research import scoring
    from stmae.features import FeatureStats
    from stmae.infer import Detector, build_extractor, build_model

    cfg = tiny_config(**{"infer.distance_weight": 0.0, "infer.pixel_residual": "same"})  # the probes score the pure residual
    ext = build_extractor(cfg).eval()
    torch.manual_seed(0)
    g = cfg.features.grid_size
    feats = torch.randn(6, ext.out_channels, g, g)
    det = Detector(ext, build_model(cfg, ext.out_channels), FeatureStats.from_features(feats), copy.deepcopy(cfg))
    labels = np.array([0, 0, 0, 1, 1, 1])
    masks = np.zeros((6, cfg.features.image_size, cfg.features.image_size), bool)
    masks[3:, :8, :8] = True
    knn = probe.ab._knn_module()
    bank = knn.patch_rows(det.stats.apply(feats[:3]))
    rows = probe.score_protocol(det, bank, feats, labels, masks, knn)
    assert set(rows) == {"residual", "knn", *(f"guided{k}" for k in probe.GUIDED_K),
                         *(f"hybrid_w{w:g}" for w in probe.HYBRID_W)}
    expected = probe.ab.validation_row(labels, None, masks, *scoring.postprocess(det, scoring.grid_maps(det, det.stats.apply(feats))))
    assert rows["residual"]["image_auroc"] == pytest.approx(expected["image_auroc"])
    dist = knn.nearest_distances(knn.patch_rows(det.stats.apply(feats)), bank).view(6, g, g)
    expected = probe.ab.validation_row(labels, None, masks, *knn.anomaly_maps(dist, cfg))
    assert rows["knn"]["image_auroc"] == pytest.approx(expected["image_auroc"])
    assert rows["knn"]["pixel_auroc"] == pytest.approx(expected["pixel_auroc"])
    assert rows["knn"]["image_auroc"] == 1.0  # the good images are in the bank, the others are not


def test_package_variant_scores_the_fitted_model_with_and_without_its_memory(tiny_mvtec):
    from types import SimpleNamespace

    from stmae.data import load_mvtec
    from stmae.evaluate import mask_at
    from stmae.features import extract_features
    from stmae.infer import build_extractor

    ds = load_mvtec(tiny_mvtec)
    cfg = tiny_config(**{"infer.distance_weight": 0.0, "infer.pixel_residual": "same"})
    feats = extract_features(build_extractor(cfg).eval(), ds.test, 64, quiet=True)
    masks = np.stack([mask_at(s, 64) for s in ds.test])
    tasks = {"p": SimpleNamespace(test=ds.test, masks=masks)}
    row = probe.package_variant(cfg, ds.train, tasks, {"p": feats}, lambda m: None)
    assert set(row["scores"]["p"]) == {"package_memory", "package_residual"}
    assert row["memory"]["bank_patches"] == int(0.1 * 8 * 64)  # 8 training images (1 held out, banked after calibration), grid 8
    cells = row["scores"]["p"]
    # the red squares of tiny_mvtec are found by the fitted model with and without its memory
    assert cells["package_memory"]["image_auroc"] == 1.0 and cells["package_residual"]["image_auroc"] == 1.0
    assert cells["package_memory"]["pixel_auroc"] > 0.99 and cells["package_residual"]["pixel_auroc"] > 0.99
    assert cells["package_memory"]["pixel_auroc"] != cells["package_residual"]["pixel_auroc"]
