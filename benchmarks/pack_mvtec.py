"""Write a copy of an MVTec-layout category with every image and mask already at the model size.

Why: a lent GPU machine takes at most 64 MiB of carried files and Magnetic Tile is ~80 MB.
stmae resizes every image (``resize_image``, PIL bilinear) and every mask (``resize_mask``,
nearest) to ``features.image_size`` before it computes anything, and both functions return
an input that already has that size unchanged. A copy made here with the same two functions
therefore gives the same features, maps and metrics as the original, at a fraction of the
size (the Magnetic Tile images are 200-600 px a side). File names, folders and the order
the loader lists them in are kept, so seeded subsets (the 200-image protocol) pick the same
images.

The copy is written to a temporary folder beside ``DST`` and renamed at the end, so an
interrupted run leaves no half-written dataset.

Run: ``python benchmarks/pack_mvtec.py ../shared/data/magnetic_tile/magnetic_tile
.devdata/magnetic_tile/magnetic_tile --size 256``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from stmae.data import load_mvtec, resize_image, resize_mask
from stmae.data.io import DataError


def _save(array: np.ndarray, path: Path) -> None:
    """PNG, grayscale when the three channels agree (stmae repeats gray to RGB on reading)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3 and (array == array[..., :1]).all():
        array = array[..., 0]
    Image.fromarray(array).save(path, optimize=True)


def pack(src: Path, dst: Path, size: int) -> int:
    """Copy ``src`` (an MVTec-layout category) to ``dst`` at ``size`` x ``size``; returns the file count."""
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination")
    dataset = load_mvtec(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    written: set[Path] = set()
    try:
        for sample in [*dataset.train, *dataset.test]:
            assert sample.path is not None  # loaded from files
            targets = [(sample.path, resize_image(sample.load_image(), size))]
            mask = sample.load_mask()
            if mask is not None:
                assert sample.mask_path is not None
                targets.append((sample.mask_path, resize_mask(mask, size).astype(np.uint8) * 255))
            for source, array in targets:
                out = (tmp / source.relative_to(src)).with_suffix(".png")
                if out in written:  # e.g. 000.bmp and 000.jpg side by side
                    raise DataError(f"{source}: another file already became {out.relative_to(tmp)}")
                _save(array, out)
                written.add(out)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(written)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="MVTec-layout category folder (train/, test/, ground_truth/)")
    p.add_argument("dst", type=Path, help="where the resized copy goes (must not exist)")
    p.add_argument("--size", type=int, default=256, help="features.image_size of the runs that will read it")
    args = p.parse_args(argv)
    try:
        n = pack(args.src, args.dst, args.size)
    except (DataError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(f.stat().st_size for f in args.dst.rglob("*") if f.is_file())
    print(f"wrote {n} files, {total / 2**20:.1f} MiB, to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
