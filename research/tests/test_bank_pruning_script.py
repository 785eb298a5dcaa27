"""research/bank_pruning.py: its share of rows left is right where the answer is known.

docs/inference.md rejects a cluster-pruned exact search because this script finds nearly
every bank row left on real features. That finding is only as good as the bound and the
count, so both are checked on data whose answer is known: well-separated tight clusters
(pruning keeps exactly the patch's own cluster) and structureless data in many dimensions
(pruning keeps nearly everything).
"""

from __future__ import annotations

import torch

from tests.conftest import RESEARCH, load_benchmark

bank_pruning = load_benchmark("bank_pruning", RESEARCH)


def _nearest(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    return torch.cdist(queries, bank).amin(dim=1)


def test_separated_clusters_keep_only_the_patches_own():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16, dtype=torch.float64) * 100.0
    sizes = torch.tensor([10, 20, 30, 40])
    bank = torch.cat([c + 0.1 * torch.randn(int(n), 16, generator=gen, dtype=torch.float64) for c, n in zip(centres, sizes)])
    assign = bank_pruning.kmeans(bank, 4, iterations=10, seed=0)
    assert sorted(torch.bincount(assign).tolist()) == [10, 20, 30, 40]  # k-means found the four groups
    queries = centres[1] + 0.1 * torch.randn(25, 16, generator=gen, dtype=torch.float64)  # beside the 20-row group
    row = bank_pruning.rows_left(queries, bank, assign, _nearest(queries, bank))
    assert row["clusters"] == 4
    assert row["rows_left_mean"] == row["rows_left_min"] == 20 / 100


def test_structureless_data_keeps_nearly_every_row():
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(2000, 64, generator=gen, dtype=torch.float64)
    queries = torch.randn(200, 64, generator=gen, dtype=torch.float64)
    assign = bank_pruning.kmeans(bank, 32, iterations=5, seed=0)
    row = bank_pruning.rows_left(queries, bank, assign, _nearest(queries, bank))
    assert row["rows_left_mean"] > 0.95


def test_the_bound_drops_only_clusters_with_no_nearest_row_and_counts_rows():
    gen = torch.Generator().manual_seed(2)
    bank = torch.randn(600, 8, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, 8, dtype=torch.float64)
    queries = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    assign = bank_pruning.kmeans(bank, 40, iterations=8, seed=0)
    dist = torch.cdist(queries, bank)
    nearest = dist.amin(dim=1)
    kept, _ = bank_pruning.kept_clusters(queries, bank, assign, nearest)
    # Brute force: each query's distance to the nearest row of each cluster.
    per_cluster = torch.full((300, 40), float("inf"), dtype=torch.float64).scatter_reduce_(
        1, assign.expand(300, -1), dist, "amin"
    )
    # A dropped cluster holds no row as near as the nearest: an exact search built on the
    # bound stays exact (a bound that is too tight breaks this).
    assert bool((per_cluster[~kept] > nearest.unsqueeze(1).expand(-1, 40)[~kept]).all())
    assert bool(kept.gather(1, assign[dist.argmin(dim=1)].unsqueeze(1)).all())
    # In 8 dimensions the bound does rule clusters out: 40 % of the (query, cluster) pairs.
    assert 0.35 < 1.0 - kept.double().mean().item() < 0.45
    # rows_left counts rows, not clusters: row by row, the share of the bank in kept clusters.
    by_row = kept.gather(1, assign.expand(300, -1)).double().mean(dim=1)
    row = bank_pruning.rows_left(queries, bank, assign, nearest)
    assert abs(row["rows_left_mean"] - float(by_row.mean())) < 1e-12
    assert row["rows_left_min"] == float(by_row.min())
