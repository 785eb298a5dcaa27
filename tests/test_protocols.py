"""benchmark / oneclass runners on tiny generated data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stmae.data import DataError
from stmae.protocols import benchmark, oneclass
from stmae.report import markdown_table

from .conftest import tiny_config, write_png


def test_benchmark_writes_table_with_mean(tiny_mvtec, tmp_path):
    root = tiny_mvtec.parent  # holds the single category "tiny"
    summary = benchmark(root, tmp_path / "bench", "all", tiny_config(), quiet=True, log=lambda s: None)
    assert [r["category"] for r in summary["rows"]] == ["tiny"]
    assert summary["mean"]["image_auroc"] == pytest.approx(summary["rows"][0]["image_auroc"])
    md = (tmp_path / "bench" / "summary.md").read_text()
    assert "| tiny |" in md and "| mean |" in md
    assert json.loads((tmp_path / "bench" / "summary.json").read_text())["rows"][0]["n_test"] == 6
    assert (tmp_path / "bench" / "tiny" / "test" / "report.html").is_file()
    with pytest.raises(DataError, match="unknown categories"):
        benchmark(root, tmp_path / "b2", "nope", tiny_config(), quiet=True, log=lambda s: None)


def test_oneclass_folder_protocol_rows_per_class(tmp_path):
    rng = np.random.default_rng(0)
    levels = {"dark": 40, "mid": 128, "light": 215}
    for cls, level in levels.items():
        for i in range(10):
            img = np.clip(rng.normal(level, 8, (32, 32)), 0, 255).astype(np.uint8)
            write_png(tmp_path / "classes" / cls / f"{i}.png", img)
    lines: list[str] = []
    # memory 0: the quality bar below is the residual's, not the memory bank's
    cfg = tiny_config(**{"infer.memory": 0.0})
    summary = oneclass("folder", tmp_path / "classes", tmp_path / "out", "all", cfg, quiet=True, log=lines.append)
    assert [r["class"] for r in summary["rows"]] == ["dark", "light", "mid"]
    assert len(lines) == 3
    for row in summary["rows"]:
        assert row["n_test"] == 6  # 20% of 10 images x 3 classes
        assert row["n_train"] + 1 == 8  # 80% of 10, one held out for the threshold
    assert summary["mean"]["image_auroc"] == pytest.approx(np.mean([r["image_auroc"] for r in summary["rows"]]))
    # the classes differ grossly, so even a tiny model's residual separates them
    assert all(r["image_auroc"] >= 0.95 for r in summary["rows"]), summary["rows"]  # 1.0 each when written
    one = oneclass("folder", tmp_path / "classes", tmp_path / "out1", "mid", tiny_config(), quiet=True, log=lambda s: None)
    assert [r["class"] for r in one["rows"]] == ["mid"]


def test_oneclass_scores_each_term_alone_where_the_config_blends(tmp_path):
    """``alone=True``: each class's model is also scored by the residual alone and the memory
    alone; both detect the grossly different classes, and the blend's own AUROC is unchanged
    by scoring them (the detector's share is restored)."""
    rng = np.random.default_rng(1)
    for cls, level in {"dark": 40, "light": 215}.items():
        for i in range(10):
            write_png(tmp_path / "classes" / cls / f"{i}.png", np.clip(rng.normal(level, 8, (32, 32)), 0, 255).astype(np.uint8))
    cfg = tiny_config(**{"infer.memory": 0.5})
    plain = oneclass("folder", tmp_path / "classes", tmp_path / "plain", "all", cfg, quiet=True, log=lambda s: None)
    both = oneclass("folder", tmp_path / "classes", tmp_path / "both", "all", cfg, quiet=True, log=lambda s: None, alone=True)
    for p_row, row in zip(plain["rows"], both["rows"]):
        assert "image_auroc_residual_alone" not in p_row
        assert row["image_auroc"] == pytest.approx(p_row["image_auroc"], abs=1e-12)  # same seeded fit
        assert row["image_auroc_residual_alone"] >= 0.95 and row["image_auroc_memory_alone"] >= 0.95, row
    assert both["mean"]["image_auroc_memory_alone"] == pytest.approx(
        np.mean([r["image_auroc_memory_alone"] for r in both["rows"]]))
    # nothing to separate where the config does not blend
    residual_only = oneclass("folder", tmp_path / "classes", tmp_path / "r", "dark", tiny_config(**{"infer.memory": 0.0}),
                             quiet=True, log=lambda s: None, alone=True)
    assert "image_auroc_memory_alone" not in residual_only["rows"][0]


def test_markdown_table():
    md = markdown_table([{"a": "x", "b": 0.12345, "c": None}], ["a", "b", "c"])
    assert md.splitlines() == ["| a | b | c |", "|---|---|---|", "| x | 0.123 | n/a |"]


def test_evaluate_subsets_equal_evaluating_each_subset_alone(tiny_mvtec, tmp_path):
    """``evaluate(..., subsets=...)`` gives each half the metrics a separate evaluation of that half gives."""
    import dataclasses

    import stmae
    from stmae.data import load_mvtec
    from stmae.protocols import real_defect_indices

    det = stmae.fit(tiny_mvtec, tmp_path / "run", tiny_config(), quiet=True).detector
    ds = load_mvtec(tiny_mvtec)
    halves = real_defect_indices(ds.test, seed=0)
    assert sorted(halves["mt_val"] + halves["mt_test"]) == list(range(len(ds.test)))
    both = stmae.evaluate(det, ds, quiet=True, subsets=halves)
    for name, idx in halves.items():
        alone = stmae.evaluate(det, dataclasses.replace(ds, test=[ds.test[i] for i in idx]), quiet=True)
        for key in ("image_auroc", "pixel_auroc", "aupro", "n_images", "n_good"):
            assert both.subsets[name][key] == pytest.approx(alone.metrics[key], abs=1e-9), (name, key)
