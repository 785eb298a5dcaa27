"""Copy the Magnetic Tile images that ``benchmarks/speed.py`` reads into a small folder.

Why: a lent GPU machine receives only the checkout (64 MiB at most), not ``../shared/data``.
``speed.py`` reads 200 training images (the seeded subsample of the 200-image protocol) and
the first 32 test images; this copies exactly those, with their masks, into ``DIR`` in the
MVTec layout, and checks that ``speed.py --data DIR`` then reads the same images in the same
order. Put ``DIR`` in a git-ignored folder and name it in the device call's ``carry``.

Run: ``python benchmarks/subset_data.py DIR [--data MT] [--train 200] [--test 32]``
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent

from stmae_research import knn  # noqa: E402
from speed import DEFAULT_DATA  # noqa: E402

from stmae.data import load_mvtec  # noqa: E402


def copy_subset(src: Path, dest: Path, train: int, test: int) -> tuple[int, int]:
    """Copy the chosen images (and masks) from ``src`` into ``dest``; (train, test) copied."""
    ds = load_mvtec(src)
    chosen = [ds.train[i] for i in knn.subsample_indices(len(ds.train), train, seed=0)] + list(ds.test[:test])
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for sample in chosen:
        for path in (sample.path, sample.mask_path):
            if path is None:
                continue
            target = tmp / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    copied = load_mvtec(tmp)
    want = [s.path.relative_to(src) for s in chosen]
    got = [s.path.relative_to(tmp) for s in list(copied.train) + list(copied.test[:test])]
    if want != got:
        raise SystemExit(f"{tmp}: the copy does not read back as the same images in the same order")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return len(copied.train), len(copied.test)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Magnetic Tile in the MVTec layout")
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--test", type=int, default=32)
    args = p.parse_args(argv)
    n_train, n_test = copy_subset(args.data, args.dest, args.train, args.test)
    print(f"wrote {args.dest}: {n_train} training and {n_test} test images")


if __name__ == "__main__":
    main()
