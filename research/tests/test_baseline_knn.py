"""The kNN yardstick (stmae_research.knn): coreset, exact-match behaviour, maps.

The module lives outside the package (benchmarks/ is not importable), so it is loaded
from its file. Data is a tiny generated MVTec-style folder of 64 x 64 noise textures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stmae.config import Config
from stmae.data import load_mvtec


SQUARE = (slice(20, 36), slice(24, 40))  # the defect: rows 20-35, columns 24-39


from stmae_research import knn  # noqa: E402


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _noise(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(90, 160, (64, 64, 3), dtype=np.uint8)


@pytest.fixture
def spot_data(tmp_path: Path) -> Path:
    """6 train/good textures; test/good = an exact copy of train 000 + a fresh texture;
    test/spot = 2 textures with a bright square and matching masks."""
    rng = np.random.default_rng(0)
    root = tmp_path / "spots"
    train = [_noise(rng) for _ in range(6)]
    for i, img in enumerate(train):
        _png(root / "train" / "good" / f"{i:03d}.png", img)
    _png(root / "test" / "good" / "000.png", train[0])
    _png(root / "test" / "good" / "001.png", _noise(rng))
    for i in range(2):
        img = _noise(rng)
        mask = np.zeros((64, 64), np.uint8)
        mask[SQUARE] = 255
        img[mask > 0] = 250
        _png(root / "test" / "spot" / f"{i:03d}.png", img)
        _png(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return root


def _config() -> Config:
    return knn.make_config(image_size=64, grid_size=16, aggregate=3).override({"infer.sigma": 1.0}).validate()


def test_greedy_coreset_count_distinct_and_deterministic() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(250, 176, generator=gen)  # > PROJECTION_DIM channels: projection used
    feats = torch.cat([feats, feats])  # exact duplicates: indices must still be distinct
    picked = knn.greedy_coreset(feats, 300, seed=3)
    assert picked.shape == (300,)
    assert len(set(picked.tolist())) == 300
    assert torch.equal(picked, knn.greedy_coreset(feats, 300, seed=3))
    assert torch.equal(knn.greedy_coreset(feats, 600), torch.arange(500))
    assert knn.greedy_coreset(feats, 1).shape == (1,)


def test_greedy_coreset_keeps_rare_patterns() -> None:
    """Farthest-first keeps the 20 rare far-away points that a random 10 % would mostly drop."""
    gen = torch.Generator().manual_seed(0)
    common = 0.01 * torch.randn(480, 176, generator=gen)
    rare = 10.0 * torch.eye(176)[:20]
    feats = torch.cat([common, rare])
    picked = set(knn.greedy_coreset(feats, 50, seed=0).tolist())
    assert set(range(480, 500)) <= picked


def test_duplicate_scores_zero_and_spot_map_peaks_in_mask(spot_data: Path) -> None:
    ds = load_mvtec(spot_data)
    cfg = _config()
    bank = knn.fit_bank(ds.train, cfg, coreset_ratio=1.0)
    assert bank.bank.shape[0] == bank.n_train_patches == 6 * 16 * 16
    maps, scores = bank.score(ds.test)
    names = [s.name for s in ds.test]
    dup, fresh, spots = names.index("good/000.png"), names.index("good/001.png"), [2, 3]
    assert [ds.test[i].defect_type for i in spots] == ["spot", "spot"]
    assert maps.shape == (4, 64, 64)
    assert scores[dup] < 5e-3 * scores[spots].min()  # ~0: float32 rounding in cdist only
    assert scores[fresh] < scores[spots].min()
    for i in spots:
        peak = np.unravel_index(int(maps[i].argmax()), (64, 64))
        assert SQUARE[0].start <= peak[0] < SQUARE[0].stop and SQUARE[1].start <= peak[1] < SQUARE[1].stop

    # The full evaluation on a 50 % coreset: requested bank size, perfect separation.
    result = knn.knn_baseline(ds.train, ds.test, cfg, coreset_ratio=0.5, seed=1)
    assert result["bank_size"] == 6 * 16 * 16 // 2
    assert result["image_auroc"] == 1.0
    assert result["pixel_auroc"] > 0.9
    assert result["n_good"] == 2 and result["n_anomalous"] == 2
    assert set(result["per_type"]) == {"good", "spot"}
