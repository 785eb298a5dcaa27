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
    cfg = tiny_config(**{"infer.distance_weight": 0.0})
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


def test_markdown_table():
    md = markdown_table([{"a": "x", "b": 0.12345, "c": None}], ["a", "b", "c"])
    assert md.splitlines() == ["| a | b | c |", "|---|---|---|", "| x | 0.123 | n/a |"]


def test_evaluate_hands_each_scored_image_to_on_image(tiny_mvtec, tmp_path):
    """``on_image`` sees every scored image once, in test order, with the score the records
    hold and a map of the input size; its mask is the image's own."""
    import stmae
    from stmae.data import load_mvtec

    det = stmae.fit(tiny_mvtec, tmp_path / "run", tiny_config(), quiet=True).detector
    ds = load_mvtec(tiny_mvtec)
    seen = []
    ev = stmae.evaluate(det, ds, quiet=True, on_image=lambda i, score, amap, mask: seen.append((i, score, amap, mask)))
    assert [i for i, *_ in seen] == list(range(len(ds.test)))
    assert [score for _, score, _, _ in seen] == [r["score"] for r in ev.records]
    size = det.config.features.image_size
    assert all(amap.shape == (size, size) and mask.shape == (size, size) for _, _, amap, mask in seen)
    assert all(bool(mask.any()) == (ds.test[i].label == 1) for i, _, _, mask in seen)
