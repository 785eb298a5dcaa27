"""``stmae update``: good images added to a fitted run without retraining the transformer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import stmae
from stmae.checkpoint import load_run
from stmae.data import DataError
from stmae.update import UpdateError

from .conftest import make_tiny_category, tiny_config, write_png


def _stripes(folder: Path, n: int, seed: int) -> list[Path]:
    """Good parts of a new appearance: bright and dark stripes (at a random phase) with a
    little noise, where the training parts are plain noise textures."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        rows = (np.arange(64)[:, None, None] + rng.integers(0, 8)) % 8 < 4
        img = np.where(rows, 200, 110) + rng.integers(-10, 10, (64, 64, 3))
        paths.append(write_png(folder / f"{i:03d}.png", img.astype(np.uint8)))
    return paths


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny default-blend run ("run") and one scored by the memory alone ("memory_run")."""
    root = tmp_path_factory.mktemp("update")
    cat = make_tiny_category(root / "cat", n_train=12)
    stmae.fit(cat, root / "run", tiny_config(), quiet=True)
    stmae.fit(cat, root / "memory_run", tiny_config(**{"infer.distance_weight": 1.0}), quiet=True)
    return root, cat


def test_a_new_good_appearance_is_flagged_before_the_update_and_passes_after(fitted, tmp_path):
    """Scored by the memory alone, the update is all a new appearance needs."""
    root, cat = fitted
    _stripes(tmp_path / "new", 16, seed=1)
    probes = _stripes(tmp_path / "probe", 6, seed=2)
    defects = sorted((cat / "test" / "spot").glob("*.png"))
    before = stmae.load(root / "memory_run", device="cpu")
    assert all(p.label == 1 for p in before.predict(probes))  # the new appearance is a false alarm
    result = stmae.update(root / "memory_run", tmp_path / "new", out=tmp_path / "v2", device="cpu", quiet=True)
    after = result.detector
    assert all(p.label == 0 for p in after.predict(probes))  # unseen images of it now pass
    defect_scores = [p.score for p in after.predict(defects)]
    assert min(defect_scores) > after.threshold  # real defects still score above the new threshold
    # The update changed the bank and the thresholds, never the transformer or the statistics.
    old_run, new_run = load_run(root / "memory_run"), load_run(tmp_path / "v2")
    assert all(torch.equal(old_run.model_state[k], new_run.model_state[k]) for k in old_run.model_state)
    assert torch.equal(old_run.stats.mean, new_run.stats.mean)
    # The bank grows as a refit's would: the old bank plus the run's coreset share of the new patches.
    held = result.entry["images_held_out"]
    grown = int(0.1 * (16 - held) * 8 * 8) + int(0.1 * held * 8 * 8)  # banked, then the held-out ones
    assert new_run.memory.bank.shape[0] == old_run.memory.bank.shape[0] + grown == result.entry["bank_patches"]
    assert not torch.equal(old_run.memory.bank, new_run.memory.bank)
    # What was returned is what was written: the folder loads into the same scores.
    reloaded = stmae.load(tmp_path / "v2", device="cpu")
    assert [p.score for p in reloaded.predict(probes)] == [p.score for p in after.predict(probes)]
    assert reloaded.threshold == after.threshold
    # With out=, the old version is untouched and still loads.
    assert stmae.load(root / "memory_run", device="cpu").threshold == before.threshold


def test_with_the_default_blend_the_update_cuts_the_false_alarm_and_keeps_defects(fitted, tmp_path):
    """The blend's residual comes from the transformer, which an update does not retrain: the
    new appearance's scores fall (its distances now find good patches like it) but need not
    all fall below the threshold; defects stay far above it."""
    root, cat = fitted
    _stripes(tmp_path / "new", 16, seed=1)
    probes = _stripes(tmp_path / "probe", 6, seed=2)
    defects = sorted((cat / "test" / "spot").glob("*.png"))
    before = stmae.load(root / "run", device="cpu")
    after = stmae.update(root / "run", tmp_path / "new", out=tmp_path / "v2", device="cpu", quiet=True).detector
    was = np.array([p.score / before.threshold for p in before.predict(probes)])
    now = np.array([p.score / after.threshold for p in after.predict(probes)])
    assert was.min() > 1 and now.mean() < 0.5 * was.mean()  # score over threshold: at least halved
    assert min(p.score for p in after.predict(defects)) > after.threshold


def test_history_records_each_version(fitted, tmp_path):
    root, _ = fitted
    _stripes(tmp_path / "a", 4, seed=3)
    _stripes(tmp_path / "b", 4, seed=4)
    first = stmae.update(root / "run", tmp_path / "a", out=tmp_path / "run", device="cpu", quiet=True)
    second = stmae.update(tmp_path / "run", tmp_path / "b", device="cpu", quiet=True)  # in place
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["model_version"] == 3 and [h["version"] for h in meta["history"]] == [2, 3]
    entry = meta["history"][-1]
    assert entry == second.entry and entry["images_added"] == 4 and entry["source"] == str(tmp_path / "b")
    assert entry["image_threshold_before"] == first.detector.threshold
    assert entry["image_threshold_after"] == meta["calibration"]["image_threshold"]
    assert entry["calibration_images"] == len(meta["calibration_scores"]["all"])
    assert set(entry["held_out_images"]) <= set(meta["val_images"])


def test_an_update_that_fails_leaves_the_run_as_it_was(fitted, tmp_path):
    root, _ = fitted
    import shutil

    shutil.copytree(root / "run", tmp_path / "run")
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="a.png"):
        stmae.update(tmp_path / "run", [str(tmp_path / "broken" / "a.png")], device="cpu", quiet=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_run_without_a_memory_bank_is_refused(tmp_path):
    cat = make_tiny_category(tmp_path / "cat")
    stmae.fit(cat, tmp_path / "run", tiny_config(**{"infer.distance_weight": 0.0}), quiet=True)
    _stripes(tmp_path / "new", 2, seed=5)
    with pytest.raises(UpdateError, match=r"run: has no memory bank.*distance_weight"):
        stmae.update(tmp_path / "run", tmp_path / "new", device="cpu", quiet=True)


@pytest.mark.slow
def test_cli_update(fitted, tmp_path):
    from .test_cli import run

    root, _ = fitted
    _stripes(tmp_path / "new", 5, seed=6)
    r = run("update", str(root / "run"), str(tmp_path / "new"), "--out", str(tmp_path / "v2"), "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    assert "version 2: 5 good images added" in r.stdout and "threshold" in r.stdout
    assert json.loads((tmp_path / "v2" / "meta.json").read_text())["model_version"] == 2
    r = run("update", str(tmp_path / "missing"), str(tmp_path / "new"), "-q")
    assert r.returncode == 2 and "missing" in r.stderr
    r = run("update", str(tmp_path / "v2"), "-q")  # neither images nor --from-log
    assert r.returncode == 2 and "either new good images or --from-log" in r.stderr
