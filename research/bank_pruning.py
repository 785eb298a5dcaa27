"""Could an exact search skip most of the bank? Cluster bounds on real Magnetic Tile features.

Why: after the backbone, the bank search is the largest cost of a CPU predict, and it is
already exact bf16 arithmetic (``stmae.model.memory.BankSearch``) bounded by memory traffic:
it forms every (patch, bank row) product. The one exact way to form fewer is to group the
bank into clusters (centre c, radius r) and skip a cluster whenever the triangle inequality
proves it holds no row nearer than the patch's nearest distance d: ``|q - c| - r > d``.
This script measures how many rows such a search would still have to touch *at best* (with
the true d known in advance, which no search has), for k-means clusterings of several sizes.
If that share is near 1, cluster pruning cannot make the exact search cheaper here.

Data: the default preset's bank (the kNN yardstick's coreset of 200 good training images,
``stmae_research.knn``, the same features and ratio) and every patch of 32 test
images spread evenly over the test split (good images and every defect type). Distances in
float64.

Run: ``python research/bank_pruning.py [--data DIR] [--clusters 80,320,1280] [--threads 2]``.
Writes ``research/results/bank_pruning.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

from stmae_research import knn  # noqa: E402

from stmae import provenance  # noqa: E402
from stmae.config import preset  # noqa: E402
from stmae.data import load_mvtec, resize_image, to_tensor_batch  # noqa: E402
from stmae.fileio import atomic_write_json  # noqa: E402
from stmae.pipeline import MapPipeline  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile"


def kmeans(x: torch.Tensor, k: int, iterations: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means (float64) from k-means++ seeds -> cluster index per row; an empty
    cluster keeps its centre. k-means++ so that a poor clustering cannot be what keeps rows in."""
    g = torch.Generator().manual_seed(seed)
    picks = [int(torch.randint(x.shape[0], (1,), generator=g))]
    d2 = ((x - x[picks[0]]) ** 2).sum(dim=1)
    for _ in range(k - 1):
        picks.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=g)))
        d2 = torch.minimum(d2, ((x - x[picks[-1]]) ** 2).sum(dim=1))
    centres = x[picks].clone()
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return torch.cdist(x, centres).argmin(dim=1)


def kept_clusters(
    queries: torch.Tensor, bank: torch.Tensor, assign: torch.Tensor, nearest: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, k) bool: the clusters that ``|q - c| - r > d`` cannot rule out; and each cluster's
    radius r (k,)."""
    k = int(assign.max()) + 1
    counts = torch.bincount(assign, minlength=k).double()
    centres = torch.zeros(k, bank.shape[1], dtype=bank.dtype).index_add_(0, assign, bank) / counts.clamp_min(1).unsqueeze(1)
    radius = torch.zeros(k, dtype=bank.dtype).scatter_reduce_(0, assign, (bank - centres[assign]).norm(dim=1), "amax")
    lower = torch.cdist(queries, centres) - radius  # no row of the cluster is nearer than this
    return lower <= nearest.unsqueeze(1), radius


def rows_left(queries: torch.Tensor, bank: torch.Tensor, assign: torch.Tensor, nearest: torch.Tensor) -> dict[str, float]:
    """Share of bank rows in clusters that ``|q - c| - r > d`` cannot rule out, per query."""
    kept, radius = kept_clusters(queries, bank, assign, nearest)
    counts = torch.bincount(assign, minlength=kept.shape[1]).double()
    share = (kept.double() * counts).sum(dim=1) / bank.shape[0]
    return {
        "clusters": kept.shape[1],
        "radius_median": float(radius.median()),
        "rows_left_mean": float(share.mean()),
        "rows_left_p10": float(share.quantile(0.1)),
        "rows_left_min": float(share.min()),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Magnetic Tile in the MVTec layout")
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--test", type=int, default=32, help="test images (default 32, spread over the split)")
    p.add_argument("--clusters", default="80,320,1280")
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bank_pruning.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    cfg = preset("default")
    ds = load_mvtec(args.data)
    train = [ds.train[i] for i in knn.subsample_indices(len(ds.train), args.train, seed=0)]
    bank = knn.fit_bank(train, cfg, coreset_ratio=cfg.fit.bank_coreset, device=torch.device("cpu"))
    pipe = MapPipeline.knn(bank.extractor, bank.stats, bank.bank, cfg)
    picks = np.linspace(0, len(ds.test) - 1, args.test).round().astype(int)
    images = [resize_image(ds.test[i].load_image(), cfg.features.image_size) for i in picks]
    with torch.inference_mode():
        feats = pipe.features(to_tensor_batch(images))
    queries = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).double()
    rows = bank.bank.double()
    nearest = torch.cdist(queries, rows).amin(dim=1)
    results: dict[str, Any] = {
        "experiment": "bank_pruning",
        "bank_rows": int(rows.shape[0]),
        "channels": int(rows.shape[1]),
        "queries": int(queries.shape[0]),
        "nearest_distance_median": float(nearest.median()),
        "clusterings": [],
    }
    for k in (int(c) for c in args.clusters.split(",")):
        row = rows_left(queries, rows, kmeans(rows, k, args.iterations, seed=0), nearest)
        results["clusterings"].append(row)
        print(f"{k} clusters: radius median {row['radius_median']:.2f} (nearest distance median "
              f"{results['nearest_distance_median']:.2f}); rows left {row['rows_left_mean']:.3f} on average, "
              f"{row['rows_left_min']:.3f} at least", flush=True)
    results["provenance"] = provenance.collect("cpu", started=started)
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
