"""Speed of the greedy k-center coreset (``stmae.model.memory.greedy_coreset``) against the
textbook loop, and whether both pick the same patches.

Why: the memory bank (``infer.distance_weight``) and the kNN yardstick select 10 % of all training
patches greedily. The textbook loop updates every patch's distance after every pick, a
matrix-vector product per step bound by memory bandwidth: about an hour for the ~700k
patches of Magnetic Tile's full train split on a 2-core CPU. The package keeps a short
candidate list exact and updates the rest in batched matrix products (see the function's
docstring); this script measures the gain and checks that the selection is the same set of
patches.

Data: synthetic clustered features (``--sizes`` rows, 176 channels like Lite0's stride
4/8/16 stack, 50 Gaussian clusters, fixed seed); real patch rows: ``--mvtec DIR`` builds the
kNN yardstick's bank input from an MVTec-layout category (``--train-limit`` seeded training
images, default 200 as in the 200-image protocol of docs/results.md; the default preset's features,
standardised), ``--features file.pt`` loads an (M, C) tensor saved with ``torch.save``.
Real inputs are timed after the synthetic sizes. Each input is timed ``--repeats`` times
per method (median reported) in one process; the textbook loop is skipped above
``--textbook-max`` rows.

Run: ``python benchmarks/coreset_speed.py [--sizes 20000,100000] [--mvtec
DATA/magnetic_tile/magnetic_tile] [--ratio 0.1] [--repeats 3] [--threads 2]``;
writes ``benchmarks/results/coreset_speed.json``. With ``--mvtec`` on Magnetic Tile:
about 25 minutes on a 2-core CPU, most of it the textbook loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from stmae import provenance
from stmae.fileio import atomic_write_json
from stmae.model.memory import PROJECTION_DIM, greedy_coreset, sparse_random_projection

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "coreset_speed.json"
SEED = 0
CHANNELS = 176
CLUSTERS = 50


@torch.no_grad()
def textbook_coreset(features: torch.Tensor, count: int, seed: int = 42) -> torch.Tensor:
    """The reference: after each pick, update every row's distance to the chosen set
    (one matrix-vector product per step). Same projection, seed and start row as
    :func:`greedy_coreset`, so in exact arithmetic both return the same indices."""
    m = features.shape[0]
    if count >= m:
        return torch.arange(m)
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if x.shape[1] > PROJECTION_DIM:
        x = x @ sparse_random_projection(x.shape[1], PROJECTION_DIM, gen)
    sq_norms = (x * x).sum(dim=1)
    min_dist = torch.full((m,), math.inf)
    selected = torch.empty(count, dtype=torch.long)
    idx = int(torch.randint(m, (1,), generator=gen))
    for i in range(count):
        selected[i] = idx
        torch.minimum(min_dist, sq_norms - 2.0 * (x @ x[idx]) + sq_norms[idx], out=min_dist)
        min_dist[idx] = -math.inf
        idx = int(torch.argmax(min_dist))
    return selected


def clustered_features(rows: int, seed: int = SEED) -> torch.Tensor:
    """(rows, 176) float32: 50 Gaussian clusters of unit spread, centres 3 apart on average."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(CLUSTERS, CHANNELS, generator=gen)
    labels = torch.randint(CLUSTERS, (rows,), generator=gen)
    return centres[labels] + torch.randn(rows, CHANNELS, generator=gen)


@torch.no_grad()
def mvtec_rows(root: Path, train_limit: int | None, seed: int = 42) -> tuple[torch.Tensor, int]:
    """The kNN yardstick's coreset input for an MVTec-layout category: standardised patch
    rows (images x grid positions, channels) of ``train_limit`` seeded training images,
    and the number of images."""
    from stmae_research import knn as baseline_knn

    from stmae.data import load_mvtec
    from stmae.model.memory import patch_rows
    from stmae.train import make_config

    dataset = load_mvtec(root)
    train = [dataset.train[i] for i in baseline_knn.subsample_indices(len(dataset.train), train_limit, seed)]
    _, feats, stats = baseline_knn.training_features(train, make_config("default", {}))
    return patch_rows(stats.apply(feats).float()), len(train)


def _time(fn: Any, repeats: int) -> tuple[list[float], torch.Tensor]:
    times, out = [], torch.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(round(time.perf_counter() - start, 3))
    return times, out


def compare(features: torch.Tensor, ratio: float, repeats: int, textbook_max: int) -> dict[str, Any]:
    """Time both methods on one feature matrix and compare their picks."""
    m = features.shape[0]
    count = max(1, int(m * ratio))
    fast_times, fast = _time(lambda: greedy_coreset(features, count, seed=42), repeats)
    entry: dict[str, Any] = {
        "rows": m,
        "channels": int(features.shape[1]),
        "picks": count,
        "package_times_s": fast_times,
        "package_median_s": statistics.median(fast_times),
    }
    if m > textbook_max:
        entry["textbook"] = f"skipped (more than --textbook-max {textbook_max} rows)"
        return entry
    slow_times, slow = _time(lambda: textbook_coreset(features, count, seed=42), repeats)
    differs = (fast != slow).nonzero()
    entry.update(
        textbook_times_s=slow_times,
        textbook_median_s=statistics.median(slow_times),
        speedup=round(statistics.median(slow_times) / statistics.median(fast_times), 2),
        same_order=bool(differs.numel() == 0),
        first_order_difference=int(differs[0]) if differs.numel() else None,
        same_set=set(fast.tolist()) == set(slow.tolist()),
    )
    return entry


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,100000", help="comma-separated row counts of synthetic features ('' for none)")
    parser.add_argument("--features", type=Path, help="also time an (M, C) tensor saved with torch.save (real patch rows)")
    parser.add_argument("--mvtec", type=Path, help="also time the kNN bank rows of this MVTec-layout category")
    parser.add_argument("--train-limit", type=int, default=200, help="seeded training images for --mvtec (default 200)")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset share (default 0.1, the presets')")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--textbook-max", type=int, default=250_000, help="skip the textbook loop above this many rows")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)

    inputs: list[tuple[str, Any]] = [
        (f"synthetic: {CLUSTERS} Gaussian clusters, {CHANNELS} channels, seed {SEED}", int(size))
        for size in args.sizes.split(",") if size.strip()
    ]
    if args.mvtec is not None:
        rows, images = mvtec_rows(args.mvtec, args.train_limit)
        inputs.append((f"kNN bank rows of {args.mvtec.name}: {images} seeded training images (seed 42), "
                       "default preset features, standardised", rows))
    if args.features is not None:
        feats = torch.load(args.features, map_location="cpu", weights_only=True)
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
            raise SystemExit(f"{args.features}: expected an (M, C) tensor saved with torch.save")
        inputs.append((str(args.features), feats))
    runs = []
    for data, source in inputs:
        feats = clustered_features(source) if isinstance(source, int) else source
        runs.append({"data": data, **compare(feats, args.ratio, args.repeats, args.textbook_max)})
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "what": "greedy k-center coreset: package (candidate list + batched updates) vs textbook loop",
        "ratio": args.ratio,
        "repeats": args.repeats,
        "runs": runs,
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    result["provenance"] = provenance.collect("cpu", started=started)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
