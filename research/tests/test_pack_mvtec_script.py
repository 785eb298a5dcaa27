"""benchmarks/pack_mvtec.py: the resized copy reads back exactly as stmae sees the original."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from stmae.data import load_mvtec, resize_image, resize_mask

from tests.conftest import load_benchmark

pack_mvtec = load_benchmark("pack_mvtec")


def test_packed_copy_is_identical_after_resizing(tiny_mvtec: Path, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "packed" / "tiny"
    assert pack_mvtec.main([str(tiny_mvtec), str(dst), "--size", "32"]) == 0
    assert "wrote 17 files" in capsys.readouterr().out  # 8 train + 6 test images + 3 masks
    original, packed = load_mvtec(tiny_mvtec), load_mvtec(dst)
    assert [s.name for s in packed.train + packed.test] == [s.name for s in original.train + original.test]
    for a, b in zip(original.train + original.test, packed.train + packed.test):
        assert np.array_equal(resize_image(b.load_image(), 32), resize_image(a.load_image(), 32))
        assert (a.load_mask() is None) == (b.load_mask() is None)
        if a.load_mask() is not None:
            assert np.array_equal(resize_mask(b.load_mask(), 32), resize_mask(a.load_mask(), 32))
    sizes = {Image.open(f).size for f in dst.rglob("*.png")}
    assert sizes == {(32, 32)}
    modes = {Image.open(f).mode for f in (dst / "train" / "good").glob("*.png")}
    assert modes == {"L", "RGB"}  # gray stays gray (smaller), colour stays colour
    assert [p.name for p in dst.parent.iterdir()] == ["tiny"]  # no temporary folder left


def test_existing_destination_is_refused(tiny_mvtec: Path, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    assert pack_mvtec.main([str(tiny_mvtec), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err and not any(dst.iterdir())
