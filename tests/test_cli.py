"""End-to-end: the real `stmae` console script, as a user runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tiny_config


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("stmae")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_cli_fit_predict_test(tiny_mvtec, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    tiny_config().save(cfg)
    r = run("fit", str(tiny_mvtec), "--out", str(tmp_path / "run"), "--config", str(cfg), "--epochs", "3", "-q")
    assert r.returncode == 0, r.stderr
    assert "trained on 7 images (1 held out)" in r.stdout
    # 10 % of 8 images x 8 x 8 cells: the held-out image joins the bank after calibration
    assert "memory: 51 of 512 training patches kept (with the 1 held-out images, banked after calibration)" in r.stdout
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["epochs"] == 3

    r = run("predict", str(tmp_path / "run"), str(tiny_mvtec / "test"), "--out", str(tmp_path / "preds"), "-q")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "preds" / "predictions.csv")))
    assert len(rows) == 6
    assert {"path", "score", "label", "heatmap"} <= set(rows[0])
    assert all((tmp_path / "preds" / row["heatmap"]).is_file() for row in rows)

    r = run("test", str(tmp_path / "run"), str(tiny_mvtec), "--out", str(tmp_path / "eval"), "-q")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    # The red squares are grossly visible: every defect image outscores every good one and
    # the maps cover the squares (train seeds 0, 1, 2 all give AUROC 1, pixel AUROC >= 0.998,
    # AUPRO >= 0.995, and a gap of 3.8-4.4 between the lowest defect and highest good score).
    assert res["image_auroc"] == 1.0 and res["image_ap"] == 1.0 and res["image_f1max"] == 1.0
    assert res["pixel_auroc"] > 0.98 and res["aupro"] > 0.95
    assert res["n_images"] == 6 and set(res["per_type"]) == {"good", "spot"}
    assert (tmp_path / "eval" / "report.html").read_text().count("<img") == 6
    scored = list(csv.DictReader(open(tmp_path / "eval" / "scores.csv")))
    assert len(scored) == 6
    good = [float(r["score"]) for r in scored if r["defect_type"] == "good"]
    spots = [float(r["score"]) for r in scored if r["defect_type"] == "spot"]
    assert len(good) == len(spots) == 3 and min(spots) > max(good) + 1.0
    assert [r["predicted"] for r in scored if r["defect_type"] == "spot"] == ["1"] * 3
    # predict agrees with test on the same images: the defects are labelled anomalous there too
    assert [r["label"] for r in rows if "spot" in r["path"]] == ["1"] * 3



@pytest.mark.slow
def test_cli_residual_ranks_defects_above_good(tmp_path):
    """The paper's residual alone (``--distance-weight 0``), through the CLI, on the checkerboard set
    of ``test_detection.py``, whose grey defects a reconstruction of noise does not find
    (the red squares above are found by any score that grows with the feature norm)."""
    from .test_detection import DETECTION_SETTINGS, write_checkerboard_set

    root = write_checkerboard_set(tmp_path / "cb")
    cfg = tmp_path / "tiny.yaml"
    tiny_config(**DETECTION_SETTINGS).save(cfg)
    r = run("fit", str(root), "--out", str(tmp_path / "run"), "--config", str(cfg), "--distance-weight", "0", "-q")
    assert r.returncode == 0, r.stderr
    r = run("test", str(tmp_path / "run"), str(root), "--out", str(tmp_path / "eval"), "-q")
    assert r.returncode == 0, r.stderr
    scored = list(csv.DictReader(open(tmp_path / "eval" / "scores.csv")))
    good = [float(r["score"]) for r in scored if r["defect_type"] == "good"]
    grey = [float(r["score"]) for r in scored if r["defect_type"] == "grey"]
    assert len(good) == len(grey) == 6 and min(grey) > max(good)
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["image_auroc"] == 1.0

@pytest.mark.slow
def test_cli_distance_weight_option_turns_the_bank_off(tiny_mvtec, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    tiny_config().save(cfg)
    r = run("fit", str(tiny_mvtec), "--out", str(tmp_path / "run"), "--config", str(cfg), "--distance-weight", "0", "-q")
    assert r.returncode == 0, r.stderr
    assert "memory:" not in r.stdout
    assert "distance_weight: 0.0" in (tmp_path / "run" / "config.yaml").read_text()
    r = run("fit", str(tiny_mvtec), "--out", str(tmp_path / "bad"), "--config", str(cfg), "--distance-weight", "2", "-q")
    assert r.returncode == 2 and "infer.distance_weight must be in [0, 1]" in r.stderr


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    r = run("predict", str(tmp_path / "missing_run"), str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    r = run("fit", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_cli_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("stmae ")
    r = run("--help")
    for verb in ("fit", "predict", "test", "demo"):
        assert verb in r.stdout


def test_cli_config_and_preset_conflict(tiny_mvtec, tmp_path):
    cfg = tmp_path / "c.yaml"
    tiny_config().save(cfg)
    r = run("fit", str(tiny_mvtec), "--out", str(tmp_path / "r"), "--config", str(cfg), "--preset", "fast")
    assert r.returncode == 2 and "either --config or --preset" in r.stderr


@pytest.mark.slow
def test_cli_unreadable_file_named_or_skipped(tiny_mvtec, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    tiny_config().save(cfg)
    bad = tiny_mvtec / "train" / "good" / "999.png"
    bad.write_bytes(b"not a png")
    r = run("fit", str(tiny_mvtec), "--out", str(tmp_path / "r1"), "--config", str(cfg), "-q")
    assert r.returncode == 2 and "999.png" in r.stderr
    assert not (tmp_path / "r1" / "meta.json").exists()
    r = run("fit", str(tiny_mvtec), "--out", str(tmp_path / "r2"), "--config", str(cfg), "--skip-unreadable", "-q")
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stderr and "999.png" in r.stderr


@pytest.mark.slow
def test_cli_oneclass_writes_one_detecting_row_per_class(tmp_path):
    import numpy as np

    from .conftest import write_png

    rng = np.random.default_rng(2)
    for cls, level in {"dark": 40, "light": 215}.items():
        for i in range(10):
            write_png(tmp_path / "classes" / cls / f"{i}.png", np.clip(rng.normal(level, 8, (32, 32)), 0, 255).astype(np.uint8))
    cfg = tmp_path / "tiny.yaml"
    tiny_config(**{"infer.distance_weight": 0.5}).save(cfg)
    r = run("oneclass", "folder", str(tmp_path / "classes"), "--normal-class", "dark", "--config", str(cfg),
            "-q", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "out" / "summary.json").read_text())["rows"][0]
    assert row["class"] == "dark"
    assert row["image_auroc"] >= 0.95, row  # the classes differ grossly
    assert "image_auroc" in (tmp_path / "out" / "summary.md").read_text()
