"""research/bank_pruning.py: its share of rows left is right where the answer is known.

docs/inference.md rejects a cluster-pruned exact search because this script finds nearly
every bank row left on real features. That finding is only as good as the bound and the
count, so both are checked on data whose answer is known: well-separated tight clusters
(pruning keeps exactly the patch's own cluster) and structureless data in many dimensions
(pruning keeps nearly everything).
"""

from __future__ import annotations

import torch

from .conftest import RESEARCH, load_benchmark

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


def test_the_bound_never_drops_the_nearest_row():
    gen = torch.Generator().manual_seed(2)
    bank = torch.randn(600, 8, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, 8, dtype=torch.float64)
    queries = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    assign = bank_pruning.kmeans(bank, 40, iterations=8, seed=0)
    nearest = _nearest(queries, bank)
    # A correct bound always keeps the cluster that holds the query's nearest row; one that is
    # too tight (an exact search built on it would be wrong) drops it for some query.
    owner = assign[torch.cdist(queries, bank).argmin(dim=1)]
    counts = torch.bincount(assign, minlength=40).double()
    row = bank_pruning.rows_left(queries, bank, assign, nearest)
    assert row["rows_left_min"] >= float(counts[owner].min()) / bank.shape[0]
    assert 0.0 < row["rows_left_mean"] < 1.0  # low dimensions: pruning does skip rows here
