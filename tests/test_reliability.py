"""Reliability guarantees (docs/reliability.md): bad inputs never stop a batch or crash with an
undocumented error, run folders are atomic as a whole and refused when tampered with, and a
fit killed with SIGKILL resumes to the scores of a fit that was never stopped."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import stmae
import stmae.checkpoint as checkpoint
from stmae.checkpoint import RUN_SCHEMA, CheckpointError, load_run
from stmae.cli import app
from stmae.data import DEFAULT_MAX_PIXELS, DataError, UnreadableImageError, decode_image_bytes, read_image
from stmae.data.io import as_rgb, unreadable_reason
from stmae.resume import STATE_FILE

from .conftest import tiny_config, write_png

SRC = Path(__file__).resolve().parents[1] / "src" / "stmae"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 20000) -> bytes:
    """A real decompression bomb: a ``side`` x ``side`` 1-bit palette PNG of zeros (~50 kB)."""
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 3, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"PLTE", b"\0\0\0\xff\xff\xff")
            + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------- decoding
def test_every_kind_of_bad_file_is_one_data_error_naming_it(tmp_path):
    good = encoded(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    lying = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 3000, 3000, 8, 2, 0, 0, 0))
             + png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + png_chunk(b"IEND", b""))
    cases = {
        "empty.png": (b"", "empty file (0 bytes)"),
        "text.png": (b"just some text, not pixels", "not an image"),
        "truncated.png": (good[: len(good) // 2], "truncated or corrupt image data"),
        "corrupt.png": (good[:60] + b"\xff" * 40 + good[100:], "truncated or corrupt image data"),
        "bomb.png": (png_bomb(), "20000x20000 = 400,000,000 pixels, over the limit of 64,000,000"),
        "lying.png": (lying, "truncated or corrupt image data"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        for call in (lambda: read_image(tmp_path / name), lambda: decode_image_bytes(data, name)):
            with pytest.raises(UnreadableImageError) as err:
                call()
            assert reason in err.value.reason and name in str(err.value), (name, err.value)
        assert reason in unreadable_reason(tmp_path / name)
    with pytest.raises(DataError, match=r"missing.png: file not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match=r"is a folder"):
        read_image(tmp_path)
    (tmp_path / "ok.png").write_bytes(good)
    assert read_image(tmp_path / "ok.png").shape == (40, 50, 3) and unreadable_reason(tmp_path / "ok.png") is None


#: Run in a fresh interpreter: refuse the bomb read from stdin and print the growth of the
#: process's peak resident memory (VmHWM) in MiB. PIL decodes into C buffers that tracemalloc
#: does not see (a 64 MP PNG decode: 0.6 MB traced, 61 MB resident), so the measure is the
#: resident peak; VmHWM, not ru_maxrss, which a child inherits from the parent that started it
#: (pytest, often far larger than the bomb) and would hide the decode.
_REFUSE_AND_MEASURE = """
import re, sys
from stmae.data import UnreadableImageError, decode_image_bytes
def peak_kib():
    return int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
bomb = sys.stdin.buffer.read()
before = peak_kib()
try:
    decode_image_bytes(bomb, "bomb.png", max_pixels=None)
except UnreadableImageError:
    pass
else:
    sys.exit("decoded")
print((peak_kib() - before) / 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak resident memory from /proc (Linux)")
def test_pixel_limit_is_checked_from_the_header_before_decoding():
    bomb = png_bomb()
    with pytest.raises(UnreadableImageError, match="over the limit of 1,000"):
        decode_image_bytes(encoded(np.zeros((40, 30), np.uint8)), "a.png", max_pixels=1000)
    # None leaves PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS), still an UnreadableImageError.
    with pytest.raises(UnreadableImageError, match="over the limit of 178,956,970"):
        decode_image_bytes(bomb, "bomb.png", max_pixels=None)
    # ... refused from the header, before decoding: the refusal grows the peak resident memory
    # by under 32 MiB (0 measured), where decoding the 20,000^2 image first (the check moved
    # after img.load(), a mutation) grew it by 383 MiB: one byte a pixel, 400 MB.
    src = str(Path(stmae.__file__).resolve().parents[1])  # this stmae, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _REFUSE_AND_MEASURE], input=bomb, capture_output=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert float(done.stdout) < 32.0, f"refusing the bomb grew the peak resident memory by {float(done.stdout):.0f} MiB"
    assert decode_image_bytes(encoded(np.zeros((40, 30), np.uint8)), "a.png", max_pixels=1200).shape == (40, 30, 3)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's process-global limit is left alone
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_bomb_warning_never_fires_and_pil_modes_all_convert(recwarn):
    # 10000 x 10000 = 100 MP is over PIL's warning limit: Image.open would warn; stmae refuses quietly.
    with pytest.raises(UnreadableImageError, match="10000x10000"):
        decode_image_bytes(png_bomb(10000), "big.png")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    for mode in Image.MODES:
        rgb = as_rgb(Image.new(mode, (5, 3)))
        assert rgb.shape == (3, 5, 3) and rgb.dtype == np.uint8, mode
    assert as_rgb(np.array([[np.nan, 0.5], [np.inf, -1.0]]))[..., 0].tolist() == [[0, 128], [255, 0]]
    with pytest.raises(UnreadableImageError, match=r"<array>: the image is empty \(5x0 pixels\)"):
        as_rgb(np.zeros((0, 5, 3), np.uint8))


# ---------------------------------------------------------------------------- stmae test
@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rel")
    rng = np.random.default_rng(0)
    for i in range(8):
        write_png(root / "data" / "train" / "good" / f"{i:03d}.png", rng.integers(90, 160, (64, 64, 3), dtype=np.uint8))
    for i in range(5):
        write_png(root / "data" / "test" / "good" / f"{i:03d}.png", rng.integers(90, 160, (64, 64, 3), dtype=np.uint8))
    stmae.fit(root / "data", root / "run", tiny_config(), quiet=True)
    return root


def test_stmae_test_skips_bad_files_and_lists_them(fitted_run, tmp_path):
    data, run = fitted_run / "data", fitted_run / "run"
    bad = data / "test" / "good"
    good = (bad / "000.png").read_bytes()
    files = {"empty.png": b"", "text.png": b"hello", "trunc.png": good[: len(good) // 2], "bomb.png": png_bomb()}
    try:
        for name, content in files.items():
            (bad / name).write_bytes(content)
        r = CliRunner().invoke(app, ["test", str(run), str(data), "--out", str(tmp_path / "ev"), "-q"])
        assert r.exit_code == 0, r.output
        assert "5 images scored, 4 skipped" in r.output
        rows = list(csv.DictReader(open(tmp_path / "ev" / "skipped.csv")))
        assert {Path(row["path"]).name: row["reason"].split(" (")[0] for row in rows} == {
            "bomb.png": "20000x20000 = 400,000,000 pixels, over the limit of 64,000,000",
            "empty.png": "empty file",
            "text.png": "not an image",
            "trunc.png": "truncated or corrupt image data",
        }
        results = json.loads((tmp_path / "ev" / "results.json").read_text())
        assert results["n_images"] == 5 and results["n_skipped"] == 4
        assert len(list(csv.DictReader(open(tmp_path / "ev" / "scores.csv")))) == 5
        r = CliRunner().invoke(app, ["test", str(run), str(data), "--out", str(tmp_path / "st"), "--strict", "-q"])
        assert r.exit_code == 2 and "bomb.png" in r.output and "over the limit" in r.output
        r = CliRunner().invoke(app, ["test", str(run), str(data), "-o", str(tmp_path / "mp"), "--max-pixels", "4095", "-q"])
        assert r.exit_code == 2 and "none of the 9 test images could be read" in r.output
        assert "64x64 = 4,096 pixels, over the limit of 4,095" in r.output
    finally:
        for name in files:
            (bad / name).unlink()
    r = CliRunner().invoke(app, ["test", str(run), str(data), "--out", str(tmp_path / "ev"), "-q"])
    assert r.exit_code == 0 and (tmp_path / "ev" / "skipped.csv").read_text() == "path,reason\n"  # no stale list


def test_evaluate_skips_a_sample_whose_mask_is_unreadable(fitted_run, tiny_mvtec):
    from stmae.data import open_dataset
    from stmae.evaluate import evaluate

    mask = tiny_mvtec / "ground_truth" / "spot" / "001_mask.png"
    mask.write_bytes(mask.read_bytes()[:50])
    detector = stmae.load(fitted_run / "run", device="cpu")
    evaluation = evaluate(detector, open_dataset(tiny_mvtec), quiet=True, skip_unreadable=True)
    assert evaluation.skipped == [(str(mask), "truncated or corrupt image data (OSError: image file is truncated)")]
    assert evaluation.metrics["n_images"] == 5 and len(evaluation.records) == 5
    assert "spot/001.png" not in [r["name"] for r in evaluation.records]
    with pytest.raises(DataError, match="001_mask.png"):
        evaluate(detector, open_dataset(tiny_mvtec), quiet=True)


# ---------------------------------------------------------------------------- run folders
def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _refit(run: Path, **overrides) -> None:
    stmae.fit(run.parent / "data", run, tiny_config(**overrides), quiet=True)


def test_overwrite_interrupted_anywhere_leaves_the_old_run(fitted_run, tmp_path, monkeypatch):
    run = _copy_run(fitted_run / "run", tmp_path / "run")
    (run / "test").mkdir()
    (run / "test" / "results.json").write_text("{}")  # a report inside the run folder survives refits
    (tmp_path / "data").symlink_to(fitted_run / "data")
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    # Killed while writing the new files, then just before the swap: the old run, complete.
    for target in ("_write_run_files", "_swap_into_place"):
        with monkeypatch.context() as m:
            m.setattr(checkpoint, target, boom)
            with pytest.raises(KeyboardInterrupt):
                _refit(run, **{"train.seed": 1})
        assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before, target
        assert load_run(run).meta["seed"] == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # no staging folder left
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    _refit(run, **{"train.seed": 1})
    assert torch.equal(torch.get_rng_state(), rng_before)  # fit's seeding does not leak out
    assert load_run(run).meta["seed"] == 1 and (run / "test" / "results.json").read_text() == "{}"

    # Without an atomic exchange (not Linux): a crash between the two renames leaves the old
    # run complete beside the target, and load_run says where.
    renames, real_rename = [], os.rename

    def second_rename_fails(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    monkeypatch.setattr(checkpoint.os, "rename", second_rename_fails)
    with pytest.raises(KeyboardInterrupt):
        _refit(run, **{"train.seed": 2})
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"previous complete run in .*\.run\.[0-9a-f]+\.previous: rename it"):
        load_run(run)
    os.rename(renames[0][1], run)
    assert load_run(run).meta["seed"] == 1


def test_mixed_or_tampered_run_folders_are_refused(fitted_run, tmp_path):
    other = stmae.fit(fitted_run / "data", tmp_path / "other", tiny_config(**{"train.seed": 3}), quiet=True).run_dir
    run = _copy_run(fitted_run / "run", tmp_path / "run")
    meta = json.loads((run / "meta.json").read_text())
    assert meta["run_schema"] == RUN_SCHEMA and re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"])
    (run / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())  # new weights, old meta
    with pytest.raises(CheckpointError, match=r"model.safetensors: does not match .*meta.json"):
        load_run(run)
    run = _copy_run(fitted_run / "run", tmp_path / "run2")
    tampered = {
        "unknown run format run_schema=99": {**meta, "run_schema": 99},
        r"unknown run format run_schema='1'": {**meta, "run_schema": "1"},
        "required key 'calibration' is missing": {k: v for k, v in meta.items() if k != "calibration"},
        "required key 'weights_sha256' is missing": {k: v for k, v in meta.items() if k != "weights_sha256"},
        r"key 'calibration' is 'high', expected dict or null": {**meta, "calibration": "high"},
        "the calibration holds a non-finite threshold": {**meta, "calibration": {**meta["calibration"], "image_threshold": float("nan")}},
        "key 'calibration' is not a calibration record": {**meta, "calibration": {"rule": "max"}},
        r"key 'n_train' is True, expected int": {**meta, "n_train": True},
        "expected a JSON object, found list": [meta],
    }
    for message, content in tampered.items():
        (run / "meta.json").write_text(json.dumps(content))
        with pytest.raises(CheckpointError, match=r"run2/meta.json: " + message):
            load_run(run)
    (run / "meta.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(CheckpointError, match="meta.json: unreadable"):
        load_run(run)
    # A run written before run_schema existed (no schema, no hash) still loads.
    (run / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("run_schema", "weights_sha256")}))
    assert load_run(run).meta["calibration"] == meta["calibration"]


def test_fit_max_pixels_reaches_the_loaders(fitted_run, tmp_path):
    out = str(tmp_path / "r")
    r = CliRunner().invoke(app, ["fit", str(fitted_run / "data"), "-o", out, "--max-pixels", "4095", "-q"])
    assert r.exit_code == 2 and "000.png: 64x64 = 4,096 pixels, over the limit of 4,095" in r.output
    r = CliRunner().invoke(app, ["fit", str(fitted_run / "data"), "-o", out, "--max-pixels", "4095", "--skip-unreadable", "-q"])
    assert r.exit_code == 2 and "no training images" in r.output and "(13 unreadable files were skipped)" in r.output


def test_library_code_changes_no_process_global_state_and_loads_safely():
    globals_ = re.compile(r"os\.umask\(|setdefaulttimeout\(|set_num_threads\(|filterwarnings\(|simplefilter\("
                          r"|MAX_IMAGE_PIXELS\s*=|LOAD_TRUNCATED_IMAGES\s*=|setrecursionlimit\(")
    offenders, loads = [], []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        offenders += [f"{path.name}: {m.group(0)}" for m in globals_.finditer(text)]
        loads += [(path.name, call) for call in re.findall(r"torch\.load\([^)]*\)", text)]
    assert offenders == []
    assert loads and all("weights_only=True" in call for _, call in loads), loads
    assert not re.search(r"import pickle|pickle\.loads?\(|np\.load\(|torch\.load\(", (SRC / "checkpoint.py").read_text())


# ---------------------------------------------------------------------------- SIGKILL + resume
EPOCHS = 20  # headroom: a poller starved on 2 busy cores may see epoch 2 late (CI once saw 6 of 6)


def _stmae(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("stmae")), *args]


def _wait_for_saved_epoch(state: Path, epoch: int, proc: subprocess.Popen, timeout: float = 60.0) -> float:
    """Wait until ``state`` holds epoch ``epoch`` or later; return the save's mtime.

    The times come from the file (written by the fit itself), not from when this poller
    happened to look: on a loaded 2-core box the poller can be starved for whole epochs,
    and a wall-clock measure taken here then overshoots the end of the fit.
    """
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            st = state.stat()
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_ino, st.st_mtime_ns) != seen:
            seen = (st.st_ino, st.st_mtime_ns)
            try:
                if torch.load(state, weights_only=True)["epoch"] >= epoch:
                    return st.st_mtime
            except (FileNotFoundError, RuntimeError, EOFError):
                seen = None  # replaced while read: look again
        assert proc.poll() is None, "the fit ended before it could be killed"
        time.sleep(0.002)
    raise AssertionError(f"no training state for epoch {epoch} was saved")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_fit_killed_mid_epoch_resumes_to_the_uninterrupted_scores(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(14):
        write_png(tmp_path / "data" / "train" / "good" / f"{i:03d}.png", rng.integers(80, 170, (64, 64, 3), dtype=np.uint8))
    probe = tmp_path / "probe.png"
    write_png(probe, rng.integers(80, 170, (64, 64, 3), dtype=np.uint8))
    cfg = tmp_path / "cfg.yaml"
    tiny_config(**{"train.epochs": EPOCHS, "train.batch_size": 2, "train.checkpoint_seconds": 0}).save(cfg)
    fit = lambda out, *extra: _stmae("fit", str(tmp_path / "data"), "--out", str(out), "--config", str(cfg), "-q", *extra)

    # The uninterrupted reference runs alongside (same settings, same thread count).
    whole = subprocess.Popen(fit(tmp_path / "whole"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    proc = subprocess.Popen(fit(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        one = _wait_for_saved_epoch(run / STATE_FILE, 1, proc)
        two = _wait_for_saved_epoch(run / STATE_FILE, 2, proc)  # the epoch's length is known
        time.sleep(max(0.0, two + (two - one) / 2 - time.time()))  # half-way through epoch 3
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "meta.json").exists()  # nothing looks like a finished run
    epoch = torch.load(run / STATE_FILE, weights_only=True)["epoch"]
    assert 2 <= epoch < EPOCHS

    resumed = subprocess.run(fit(run, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert whole.wait(timeout=300) == 0, whole.communicate()[1]
    assert f"resumed the saved training at epoch {epoch} of {EPOCHS}" in resumed.stdout
    assert not (run / STATE_FILE).exists() and not [p for p in run.iterdir() if p.name.startswith(".")]
    a, b = (json.loads((d / "meta.json").read_text()) for d in (tmp_path / "whole", run))
    assert np.allclose(a["losses"], b["losses"], rtol=0, atol=1e-5)
    assert np.allclose(a["calibration_scores"]["all"], b["calibration_scores"]["all"], rtol=0, atol=1e-5)
    scores = [stmae.load(d, device="cpu").predict(probe)[0].score for d in (tmp_path / "whole", run)]
    assert abs(scores[0] - scores[1]) <= 1e-5
