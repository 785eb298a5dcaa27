"""research/probe_mt_edge.py: P-way partitions stay leakage-free; the image views are the dihedral group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stmae_research import scoring
from stmae.model import random_splits

from tests.conftest import RESEARCH, load_benchmark
from tests.test_model import patch_slice, small_model

probe = load_benchmark("probe_mt_edge", RESEARCH)


def test_two_groups_are_the_papers_split():
    m = small_model(1)
    feats = torch.randn(2, 6, 8, 8)
    split = random_splits(2, m.num_tokens, torch.Generator().manual_seed(0))
    assert torch.allclose(probe.forward_groups(m, feats, split), m(feats, split), atol=1e-5)


def test_four_groups_never_see_their_own_group():
    m = small_model(1)
    feats = torch.randn(1, 6, 8, 8)
    groups = random_splits(1, m.num_tokens, torch.Generator().manual_seed(2)).reshape(1, 4, -1)
    base = probe.forward_groups(m, feats, groups)
    token = int(groups[0, 1, 0])
    changed = feats.clone()
    rows, cols = patch_slice(m, token)
    changed[0, :, rows, cols] += 50.0
    out = probe.forward_groups(m, changed, groups)
    for g in range(4):
        moved = [not torch.equal(out[0, :, r, c], base[0, :, r, c]) for r, c in map(lambda t: patch_slice(m, t), groups[0, g].tolist())]
        assert any(moved) == (g != 1)  # its own group is untouched, every other group depends on it


def test_partitioned_wrapper_trains_through_the_package_loop():
    from stmae.config import TrainConfig
    from stmae.train import train_model

    m = small_model(1).train()
    losses = train_model(probe.Partitioned(m, 4), torch.randn(8, 6, 8, 8), TrainConfig(epochs=3, batch_size=4),
                         torch.device("cpu"), quiet=True)
    assert len(losses) == 3 and losses[-1] < losses[0]  # it learns through the wrapper
    with pytest.raises(ValueError, match="equal groups"):
        probe.Partitioned(small_model(1), 3)


def test_views_are_the_eight_distinct_dihedral_images():
    img = np.random.default_rng(0).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    views = [img] + [probe.VIEWS[v](img) for v in probe.AUGMENT["d8"]]
    assert len({v.tobytes() for v in map(np.ascontiguousarray, views)}) == 8
    assert all(sorted(v.ravel()) == sorted(img.ravel()) for v in views)  # pixels move, none change
    assert probe.AUGMENT["flip"] == ("hflip", "vflip", "rot180")


def test_two_halves_mean_column_is_the_packages_own_scoring():
    import copy

    from stmae.features import FeatureStats
    from stmae.infer import Detector, build_extractor, build_model

    from tests.conftest import tiny_config

    cfg = tiny_config(**{"infer.distance_weight": 0.0, "infer.pixel_residual": "same"})  # the probes score the pure residual
    ext = build_extractor(cfg).eval()
    torch.manual_seed(0)
    feats = torch.randn(6, ext.out_channels, cfg.features.grid_size, cfg.features.grid_size)
    det = Detector(ext, build_model(cfg, ext.out_channels), FeatureStats.from_features(feats), copy.deepcopy(cfg))
    labels = np.array([0, 0, 0, 1, 1, 1])
    masks = np.zeros((6, cfg.features.image_size, cfg.features.image_size), bool)
    masks[3:, :8, :8] = True
    rows = probe.score_model(det, feats, labels, masks, {"first": slice(0, 8)})
    assert set(rows) == {"P2/mean", "P2/min", "P2/recon_mean", "P2/mean/first", "P4/mean", "P4/min", "P4/recon_mean"}
    expected = probe.ab.validation_row(labels, None, masks, *scoring.postprocess(det, scoring.grid_maps(det, det.stats.apply(feats))))
    assert rows["P2/mean"]["image_auroc"] == pytest.approx(expected["image_auroc"])
    assert rows["P2/mean"]["pixel_auroc"] == pytest.approx(expected["pixel_auroc"])
