"""Detection tests: the residual alone and the memory alone each find visible defects.

Why this set: a test of detection must be able to fail. The obvious set (a bright square on
noise) cannot make it fail: its defect patches are outliers in the standardised features,
so *any* score that grows with the feature norm finds them, even a "reconstruction" of pure
noise (``mse(noise, f)`` grows with ``|f|``). Here the good images are an aligned
checkerboard (black and white cells, a two-pixel jitter, a little pixel noise) and the
defect is a mid-grey square: every one of its features lies *between* the two good
clusters, close to the feature mean. Only a score that knows what belongs there finds it:
the reconstruction from the other half of the image (which predicts black or white), or the
distance to the nearest good patch (no grey patch is stored). The negative controls below
replace the reconstruction, or the memory bank, by random features and check that the very
same assertions then fail.

One small model (64 px, 8 x 8 grid, 16 tokens, 40 epochs; about 3 s on one CPU thread) is
trained once for the module and scored two ways by changing ``infer.distance_weight`` on the
detector: 0 (the residual alone) and 1 (the memory alone). Checked robust over train seeds
0, 1 and 2 (image AUROC 1.0 and every maximum inside its mask, both scorers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import stmae
from stmae.infer import Detector
from stmae.metrics import auroc

from .conftest import tiny_config, write_png

SIZE = 64
CELL = 16  # checkerboard cell, px: one token (patch 2 of an 8 x 8 grid on 64 px) per cell
DEFECT = 20  # side of the grey square, px
N_TRAIN, N_GOOD_TEST, N_DEFECT_TEST = 32, 6, 6
#: On top of ``tiny_config``: a model that learns the checkerboard in ~3 s on one thread.
DETECTION_SETTINGS = {"model.embed_dim": 64, "model.decoder_dim": 64, "train.lr": 1e-3, "train.epochs": 40}


def checkerboard(rng: np.random.Generator) -> np.ndarray:
    """A good image: black (40) and white (210) cells, shifted by 0-2 px, pixel noise sigma 3."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    oy, ox = rng.integers(0, 3, 2)
    board = ((yy + oy) // CELL + (xx + ox) // CELL) % 2
    img = np.clip(40 + 170 * board + rng.normal(0, 3, (SIZE, SIZE)), 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2)


def write_checkerboard_set(root: Path, seed: int = 0) -> Path:
    """An MVTec-style category: good checkerboards; defects are mid-grey squares, masks exact."""
    rng = np.random.default_rng(seed)
    for i in range(N_TRAIN):
        write_png(root / "train" / "good" / f"{i:03d}.png", checkerboard(rng))
    for i in range(N_GOOD_TEST):
        write_png(root / "test" / "good" / f"{i:03d}.png", checkerboard(rng))
    for i in range(N_DEFECT_TEST):
        img, mask = checkerboard(rng), np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(6, SIZE - 6 - DEFECT, 2)
        mask[y : y + DEFECT, x : x + DEFECT] = 255
        grey = np.clip(125 + rng.normal(0, 3, (DEFECT, DEFECT)), 0, 255).astype(np.uint8)
        img[y : y + DEFECT, x : x + DEFECT] = grey[:, :, None]
        write_png(root / "test" / "grey" / f"{i:03d}.png", img)
        write_png(root / "ground_truth" / "grey" / f"{i:03d}_mask.png", mask)
    return root


@dataclass
class Detection:
    image_auroc: float
    max_inside_mask: list[bool]  # per defect image: is the map's maximum on a defect pixel?

    @property
    def passes(self) -> bool:
        """The bar every scorer must clear on this set."""
        return self.image_auroc >= 0.9 and all(self.max_inside_mask)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Detector, Path]:
    root = write_checkerboard_set(tmp_path_factory.mktemp("checkerboard") / "cb")
    # infer.distance_weight 0.5 builds the bank and its medians; each test picks its own share
    cfg = tiny_config(**DETECTION_SETTINGS, **{"infer.distance_weight": 0.5})
    result = stmae.fit(root, tmp_path_factory.mktemp("run") / "run", cfg, quiet=True)
    return result.detector, root


def detection(detector: Detector, root: Path, weight: float) -> Detection:
    """Score the test split with ``infer.distance_weight`` = ``weight``; image AUROC and map maxima."""
    detector.config = detector.config.override({"infer.distance_weight": weight})
    good = sorted((root / "test" / "good").glob("*.png"))
    bad = sorted((root / "test" / "grey").glob("*.png"))
    preds = detector.predict(good + bad)
    image_auroc = auroc([0] * len(good) + [1] * len(bad), [p.score for p in preds])
    inside = []
    for path, pred in zip(bad, preds[len(good):]):
        mask = np.asarray(Image.open(root / "ground_truth" / "grey" / f"{path.stem}_mask.png")) > 0
        inside.append(bool(mask[np.unravel_index(np.argmax(pred.anomaly_map), mask.shape)]))
    return Detection(image_auroc, inside)


@pytest.fixture
def detector(trained):
    det, root = trained
    original = det.config
    yield det, root
    det.config = original


def test_residual_alone_finds_the_defects(detector):
    det, root = detector
    found = detection(det, root, weight=0.0)
    assert found.image_auroc >= 0.9
    assert found.max_inside_mask == [True] * N_DEFECT_TEST


def test_memory_alone_finds_the_defects(detector):
    det, root = detector
    found = detection(det, root, weight=1.0)
    assert found.image_auroc >= 0.9
    assert found.max_inside_mask == [True] * N_DEFECT_TEST


def test_noise_reconstruction_fails_the_residual_check(detector, monkeypatch):
    """Negative control: with random features for a reconstruction the residual check fails."""
    det, root = detector
    generator = torch.Generator().manual_seed(0)
    monkeypatch.setattr(
        det.model, "forward",
        lambda feats, *args, **kwargs: torch.randn(feats.shape, generator=generator).to(feats),
    )
    found = detection(det, root, weight=0.0)
    assert not found.passes, found
    assert found.image_auroc < 0.9


def test_noise_memory_fails_the_memory_check(detector, monkeypatch):
    """Negative control: the memory alone never reads the reconstruction, so its control
    replaces the bank of good patches by random features of the same shape."""
    det, root = detector
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(det.memory.bank.shape, generator=generator).to(det.memory.bank)
    monkeypatch.setattr(det.memory, "bank", noise)
    found = detection(det, root, weight=1.0)
    assert not found.passes, found
    assert found.image_auroc < 0.9


@pytest.mark.slow
def test_hard_mined_training_finds_the_defects_too(tmp_path):
    """``train.hard_mining`` (Dinomaly's down-weighting of easy cells) still learns a residual that detects."""
    root = write_checkerboard_set(tmp_path / "cb")
    cfg = tiny_config(**DETECTION_SETTINGS, **{"infer.distance_weight": 0.0, "train.hard_mining": 0.9})
    result = stmae.fit(root, tmp_path / "run", cfg, quiet=True)
    plain = stmae.fit(root, tmp_path / "plain", cfg.override({"train.hard_mining": 0.0}), quiet=True)
    assert result.losses[-1] < plain.losses[-1]  # easy cells count at 0.1: a smaller loss on the same data
    found = detection(result.detector, root, weight=0.0)
    assert found.passes, found
