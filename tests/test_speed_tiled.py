"""benchmarks/speed.py's tiled row: it times the tiled path a ``--tile`` run takes, on frames
whose tile counts it reports correctly, and its ratios follow from its own timings."""

from __future__ import annotations

import numpy as np
import pytest

import stmae
from stmae.geometry import Geometry

from .conftest import load_benchmark, tiny_config


def test_tiled_row_counts_tiles_and_derives_its_ratios(tmp_path, monkeypatch):
    speed = load_benchmark("speed")
    rng = np.random.default_rng(0)
    train = [rng.integers(90, 160, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    det = stmae.fit(train, tmp_path / "run", tiny_config(**{"fit.held_out": 0.25}), quiet=True).detector
    monkeypatch.setattr(speed, "TILED_FRAME", (130, 250))
    row = speed.time_tiled(det, train[0], calls=2)
    geometry = Geometry(mode="tile", size=64, overlap=0.25)
    assert [f["tiles"] for f in row["frames"]] == [geometry.layout(*f["shape"]).count for f in row["frames"]]
    assert row["frames"][-1]["shape"] == [130, 250] and row["frames"][0]["tiles"] < row["frames"][-1]["tiles"]
    for f in row["frames"]:
        assert f["ms_per_tile"] == pytest.approx(f["tiled"]["median_ms"] / f["tiles"])
        assert f["megapixels"] == pytest.approx(f["shape"][0] * f["shape"][1] / 1e6, abs=1e-3)
    assert row["tiled_over_squeezed"] == pytest.approx(row["frames"][-1]["tiled"]["median_ms"] / row["squeezed"]["median_ms"])
    assert row["ms_per_tile_spread"] >= 1.0
    assert "tiles" in speed.tiled_summary(row)
