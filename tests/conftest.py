"""Shared fixtures: tiny configs and tiny image folders generated on the fly."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

import stmae
from stmae.config import Config

#: Real data sets for the few tests that need them (skipped without): $STMAE_DATA, else the
#: ``shared/data`` folder beside the checkout.
SHARED_DATA = Path(os.environ.get("STMAE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESEARCH = Path(__file__).resolve().parents[1] / "research"


def load_benchmark(name: str, folder: Path = BENCHMARKS) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (or ``research/<name>.py``: a script folder, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides) -> Config:
    """A model small enough to train in a second on CPU (64 px, 16 tokens)."""
    cfg = Config()
    values = {
        "backbone.layers": "stride4,stride8",
        "features.image_size": 64,
        "features.grid_size": 8,
        "model.patch_size": 2,
        "model.embed_dim": 32,
        "model.depth": 1,
        "model.num_heads": 2,
        "model.decoder_dim": 32,
        "model.decoder_depth": 1,
        "model.decoder_heads": 2,
        "train.epochs": 2,
        "train.batch_size": 4,
        "train.warmup_epochs": 1,
        "train.device": "cpu",
        "infer.num_pairs": 2,
        "infer.sigma": 1.0,
        "fit.min_calibration": 1,  # tiny sets hold out one or two images on purpose
    }
    values.update(overrides)
    return cfg.override(values).validate()


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_tiny_category(root: Path, n_train: int = 8, seed: int = 0, masks: bool = True) -> Path:
    """An MVTec-style category at ``root``: ``n_train`` good train images, 3 good + 3 defective
    test images (a red square) with masks. Noise textures of mixed sizes, some grayscale."""
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        shape = (48 + 4 * i, 64) if i % 2 else (64, 64, 3)
        write_png(root / "train" / "good" / f"{i:03d}.png", rng.integers(90, 160, shape, dtype=np.uint8))
    for i in range(3):
        write_png(root / "test" / "good" / f"{i:03d}.png", rng.integers(90, 160, (64, 64, 3), dtype=np.uint8))
        img = rng.integers(90, 160, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        mask[20:34, 24:40] = 255
        img[mask > 0] = (250, 20, 20)
        write_png(root / "test" / "spot" / f"{i:03d}.png", img)
        if masks:
            write_png(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return root


def fit_noise_run(root: Path) -> tuple[Path, np.random.Generator]:
    """A tiny run fitted on 10 noise textures (4 held out) under ``root``; returns the run folder
    and the generator, which goes on to draw test images from the same noise."""
    rng = np.random.default_rng(0)
    for i in range(10):
        write_png(root / "data" / "train" / "good" / f"{i:03d}.png", rng.integers(90, 160, (64, 64, 3), dtype=np.uint8))
    run = stmae.fit(root / "data", root / "run", tiny_config(**{"fit.held_out": 0.4}), quiet=True).run_dir
    return run, rng


def noise_run_good_and_defect(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """:func:`fit_noise_run` plus a good test image of the same noise and a copy of it with a
    red square (which the run flags)."""
    run, rng = fit_noise_run(root)
    good = rng.integers(90, 160, (64, 64, 3), dtype=np.uint8)
    defect = good.copy()
    defect[20:34, 24:40] = (250, 20, 20)
    return run, good, defect


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    """:func:`make_tiny_category` in a fresh folder: 8 train images, 3 + 3 test images with masks."""
    return make_tiny_category(tmp_path / "tiny")
