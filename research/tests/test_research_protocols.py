"""stmae_research.protocols: real-defect halves, metrics of parts of a split, each term alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import stmae
from stmae.data import load_mvtec
from stmae.protocols import oneclass
from stmae_research.protocols import each_term_alone, evaluate_with_subsets, real_defect_indices, split_real_defects
from tests.conftest import tiny_config, write_png


def test_halves_split_every_defect_type_and_cover_the_split(tiny_mvtec):
    ds = load_mvtec(tiny_mvtec)
    halves = real_defect_indices(ds.test, seed=0)
    assert sorted(halves["mt_val"] + halves["mt_test"]) == list(range(len(ds.test)))
    assert set(halves["mt_val"]).isdisjoint(halves["mt_test"])
    for t in {s.defect_type for s in ds.test}:
        n = sum(s.defect_type == t for s in ds.test)
        assert sum(ds.test[i].defect_type == t for i in halves["mt_val"]) == (n + 1) // 2
    parts = split_real_defects(ds.test, seed=0)
    assert [s.name for s in parts["mt_test"]] == [ds.test[i].name for i in halves["mt_test"]]
    assert real_defect_indices(ds.test, seed=1) != halves or len(ds.test) < 4


def test_subset_metrics_equal_evaluating_each_subset_alone(tiny_mvtec, tmp_path):
    """One pass gives each half the metrics a separate evaluation of that half gives."""
    det = stmae.fit(tiny_mvtec, tmp_path / "run", tiny_config(), quiet=True).detector
    ds = load_mvtec(tiny_mvtec)
    halves = real_defect_indices(ds.test, seed=0)
    whole, parts = evaluate_with_subsets(det, ds, halves, quiet=True)
    assert whole.metrics == stmae.evaluate(det, ds, quiet=True).metrics
    for name, idx in halves.items():
        alone = stmae.evaluate(det, dataclasses.replace(ds, test=[ds.test[i] for i in idx]), quiet=True)
        for key in ("image_auroc", "pixel_auroc", "aupro", "n_images", "n_good"):
            assert parts[name][key] == pytest.approx(alone.metrics[key], abs=1e-9), (name, key)


def test_each_term_alone_adds_columns_where_the_config_blends(tmp_path):
    """Each class's model is also scored by the residual alone and the memory alone; both
    detect the grossly different classes, and the blend's own AUROC is unchanged by scoring
    them (the detector's share is restored)."""
    rng = np.random.default_rng(1)
    for cls, level in {"dark": 40, "light": 215}.items():
        for i in range(10):
            write_png(tmp_path / "classes" / cls / f"{i}.png", np.clip(rng.normal(level, 8, (32, 32)), 0, 255).astype(np.uint8))
    cfg = tiny_config(**{"infer.distance_weight": 0.5})
    quiet = {"quiet": True, "log": lambda s: None}
    plain = oneclass("folder", tmp_path / "classes", tmp_path / "plain", "all", cfg, **quiet)
    both = oneclass("folder", tmp_path / "classes", tmp_path / "both", "all", cfg, columns=each_term_alone, **quiet)
    for p_row, row in zip(plain["rows"], both["rows"]):
        assert "image_auroc_residual_alone" not in p_row
        assert row["image_auroc"] == pytest.approx(p_row["image_auroc"], abs=1e-12)  # same seeded fit
        assert row["image_auroc_residual_alone"] >= 0.95 and row["image_auroc_memory_alone"] >= 0.95, row
    assert both["mean"]["image_auroc_memory_alone"] == pytest.approx(
        np.mean([r["image_auroc_memory_alone"] for r in both["rows"]]))
    assert "image_auroc_memory_alone" in (tmp_path / "both" / "summary.md").read_text()
    # nothing to separate where the config does not blend
    residual_only = oneclass("folder", tmp_path / "classes", tmp_path / "r", "dark", tiny_config(**{"infer.distance_weight": 0.0}),
                             columns=each_term_alone, **quiet)
    assert "image_auroc_memory_alone" not in residual_only["rows"][0]
