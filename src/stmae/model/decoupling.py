"""Feature decoupling: split the feature patches into two disjoint halves of equal size.

A split is a long tensor ``(..., 2, L/2)`` of token indices: row 0 is half A, row 1 is
half B, and together they are a permutation of ``0..L-1``. Training draws a fresh split per
image and step (the paper's random decoupling, which acts as the main regulariser); testing
uses K fixed splits drawn from a seed so that the same image always gets the same score.

``block`` > 1 assigns square blocks of ``block x block`` tokens to a half together instead of
single tokens. Why: with a per-token split, half of every token's neighbours are visible, and
a defect that spans several tokens (a crack, a shading change) is reconstructed from visible
tokens that show the same defect. The 3x3 local mean of the features also reaches one grid
cell into each neighbour. Blocks put the nearest visible context of a block's inner tokens
further away, so less of an extended defect leaks into its own reconstruction. On Magnetic
Tile validation (painted and long interior cracks) blocks did not help, so the default is 1.
"""

from __future__ import annotations


import torch

from ..config import check_block


def random_splits(
    batch: int,
    num_tokens: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    block: int = 1,
) -> torch.Tensor:
    """One random disjoint split per image.

    ``num_tokens`` tokens are a square ``side x side`` grid in row-major order when
    ``block`` > 1. Returns a long tensor (batch, 2, num_tokens // 2) on ``device``.
    """
    _check_even(num_tokens)
    if block == 1:
        noise = torch.rand(batch, num_tokens, generator=generator)
        return noise.argsort(dim=1).view(batch, 2, num_tokens // 2).to(device)
    side, per_side = check_block(num_tokens, block)
    num_blocks = per_side**2
    order = torch.rand(batch, num_blocks, generator=generator).argsort(dim=1)  # (batch, blocks)
    corner = (order // per_side) * (block * side) + (order % per_side) * block  # first token of each block
    offsets = (torch.arange(block)[:, None] * side + torch.arange(block)[None, :]).flatten()
    tokens = corner[..., None] + offsets  # (batch, blocks, block*block)
    return tokens.view(batch, 2, num_tokens // 2).to(device)


def complementary_splits(num_tokens: int, num_pairs: int, seed: int = 0, block: int = 1) -> torch.Tensor:
    """K fixed split pairs for inference.

    Each pair reconstructs every token exactly once (A from B, B from A), so averaging over
    the K pairs gives every position K reconstructions from K different contexts.
    Returns a long tensor (num_pairs, 2, num_tokens // 2); deterministic in ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    return random_splits(num_pairs, num_tokens, generator=gen, block=block)


def _check_even(num_tokens: int) -> None:
    if num_tokens < 2 or num_tokens % 2:
        raise ValueError(f"need an even number of tokens >= 2 to split in halves, got {num_tokens}")
