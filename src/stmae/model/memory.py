"""Memory of good patches: a coreset of training patch features next to the residual.

Why: on Magnetic Tile the residual of a good patch stays noisy where the tile's own fine
texture cannot be predicted from the other half of the image, and faint defects at the
image border drown in that noise (README, "Probing the crack gap"). The distance of a patch
to its nearest *stored* good patch (PatchCore's score) does not have that noise, but it has
blind spots of its own. On all three Magnetic Tile validation sets, at two schedules, the
sum of the two maps beat both alone (``benchmarks/probe_memory.py``), so the industrial
presets score with

    map = (1 - memory) * residual / median_residual + memory * distance / median_distance

on the grid, before upsampling and smoothing. The medians come from the held-out good
images of ``fit``, so the two terms are on one scale without any defect example.
``infer.memory = 0`` is the paper's pure residual; nothing here touches the reconstruction,
so the transition stays leakage-free (the distance of a patch depends only on the patch
itself and the training images).

The bank is PatchCore's greedy k-center coreset (Roth et al. 2022) of the standardised
training patch features; the same code is the kNN yardstick's in ``benchmarks/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

#: Dimension of the random projection used only to *select* the coreset (PatchCore uses
#: ~128): k-center greedy is a long sequential loop over all patches, and distances in 128
#: dims are cheaper than in 176 while approximately preserving which patch is farthest.
PROJECTION_DIM = 128
#: Upper bound on elements of one (query patches x bank) distance block (~128 MB float32).
DISTANCE_BLOCK = 1 << 25


def patch_rows(feats: torch.Tensor) -> torch.Tensor:
    """(N, C, G, G) feature grids -> (N * G * G, C) patch rows (image-major, row-major)."""
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


def sparse_random_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """A (in_dim, out_dim) very sparse random projection matrix (Li, Hastie & Church 2006).

    Entries are +-sqrt(s / out_dim) with probability 1 / (2 s) each and 0 otherwise, with
    s = sqrt(in_dim): the family scikit-learn's ``SparseRandomProjection`` (and thus
    anomalib's PatchCore) draws from. Squared distances are preserved in expectation. It is
    stored dense because at 176 x 128 a sparse format would only be slower.
    """
    s = math.sqrt(in_dim)
    u = torch.rand(in_dim, out_dim, generator=generator)
    value = math.sqrt(s / out_dim)
    zeros = torch.zeros(in_dim, out_dim)
    return torch.where(u < 1 / (2 * s), value, torch.where(u < 1 / s, -value, zeros))


@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor,
    count: int,
    *,
    seed: int = 42,
    projection_dim: int = PROJECTION_DIM,
    quiet: bool = True,
) -> torch.Tensor:
    """Indices of ``count`` rows of ``features`` (M, C) chosen by greedy k-center selection.

    Start from a random row, then repeatedly add the row farthest from everything chosen so
    far. Unlike a random subset this keeps rare normal patterns (which would otherwise become
    false positives) while dropping near-duplicates of common ones. Distances for the
    selection are computed after a seeded sparse random projection to ``projection_dim``
    dims (skipped when C is already that small). Deterministic for a given ``seed``;
    ``min(count, M)`` distinct indices, in selection order.
    """
    m = features.shape[0]
    if count >= m:
        return torch.arange(m)
    if count < 1:
        raise ValueError(f"coreset size must be >= 1, got {count}")
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if x.shape[1] > projection_dim:
        x = x @ sparse_random_projection(x.shape[1], projection_dim, gen).to(x.device)
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product per step instead
    # of materialising x - c, which is what makes ~20k sequential steps affordable on CPU.
    sq_norms = (x * x).sum(dim=1)
    min_dist = torch.full((m,), math.inf, device=x.device)
    selected = torch.empty(count, dtype=torch.long)
    idx = int(torch.randint(m, (1,), generator=gen))
    for i in tqdm(range(count), desc="coreset", unit="pt", disable=quiet, leave=False, mininterval=1.0):
        selected[i] = idx
        dist = sq_norms - 2.0 * (x @ x[idx]) + sq_norms[idx]
        torch.minimum(min_dist, dist, out=min_dist)
        # Mark chosen rows explicitly (-inf survives every later minimum): with duplicate
        # patches (flat regions, repeated images) rounding could otherwise make a chosen row
        # the "farthest" again and return repeated indices.
        min_dist[idx] = -math.inf
        idx = int(torch.argmax(min_dist))
    return selected


@torch.no_grad()
def nearest_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """L2 distance of each query row (Q, C) to its nearest bank row (B, C) -> (Q,).

    ``torch.cdist`` in blocks of queries so the (block x B) distance matrix stays around
    ``DISTANCE_BLOCK`` elements whatever the bank size.
    """
    rows = max(1, DISTANCE_BLOCK // max(1, bank.shape[0]))
    out = torch.empty(queries.shape[0], device=queries.device)
    for start in range(0, queries.shape[0], rows):
        out[start : start + rows] = torch.cdist(queries[start : start + rows], bank).amin(dim=1)
    return out


@dataclass
class PatchMemory:
    """A bank of good patch features and the two medians that put residual and distance on one scale.

    bank: (B, C) standardised patch features of good training images.
    residual_median, distance_median: medians of the residual map and of the distance map
    over the grid positions of held-out good images (:meth:`calibrate`); 1.0 until then.
    """

    bank: torch.Tensor
    residual_median: float = 1.0
    distance_median: float = 1.0

    @classmethod
    def fit(cls, feats: torch.Tensor, ratio: float, seed: int = 42, quiet: bool = True) -> "PatchMemory":
        """Greedy coreset of ``max(1, int(ratio * patches))`` patches of standardised features (N, C, G, G)."""
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        patches = patch_rows(feats.float())
        count = max(1, int(patches.shape[0] * ratio))
        picked = greedy_coreset(patches, count, seed=seed, quiet=quiet).to(patches.device)
        return cls(patches[picked].contiguous())

    @torch.no_grad()
    def distances(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardised features (N, C, G, G) -> distance of each position to its nearest bank patch (N, G, G)."""
        n, _, h, w = feats.shape
        bank = self.bank.to(feats.device, torch.float32)
        return nearest_distances(patch_rows(feats.float()), bank).view(n, h, w)

    def calibrate(self, residual_maps: torch.Tensor, distance_maps: torch.Tensor) -> None:
        """Take the medians from the grid maps of good images (any shape; all positions count)."""
        self.residual_median = _positive_median(residual_maps)
        self.distance_median = _positive_median(distance_maps)

    def blend(self, residual_maps: torch.Tensor, distance_maps: torch.Tensor, share: float) -> torch.Tensor:
        """(1 - share) x residual / its median + share x distance / its median, elementwise."""
        return (1.0 - share) * residual_maps / self.residual_median + share * distance_maps / self.distance_median

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for the run folder's safetensors file."""
        return {
            "memory.bank": self.bank.detach().cpu().contiguous(),
            "memory.medians": torch.tensor([self.residual_median, self.distance_median], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "PatchMemory":
        """Inverse of :meth:`to_tensors`; KeyError when the bank is missing."""
        medians = tensors["memory.medians"].tolist()
        return cls(tensors["memory.bank"], float(medians[0]), float(medians[1]))


def _positive_median(maps: torch.Tensor) -> float:
    """The median, or the mean where the median is 0 (e.g. calibrating on the banked images
    themselves with the whole bank kept), or 1.0 where both are 0."""
    values = maps.float().flatten()
    for value in (float(values.median()), float(values.mean())):
        if math.isfinite(value) and value > 0.0:
            return value
    return 1.0
