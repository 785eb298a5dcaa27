"""Feature decoupling: split the feature patches into two disjoint halves of equal size.

A split is a long tensor ``(..., 2, L/2)`` of token indices: row 0 is half A, row 1 is
half B, and together they are a permutation of ``0..L-1``. Training draws a fresh split per
image and step (the paper's random decoupling, which acts as the main regulariser); testing
uses K fixed splits drawn from a seed so that the same image always gets the same score.
"""

from __future__ import annotations

import torch


def random_splits(
    batch: int, num_tokens: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One random disjoint split per image.

    Returns a long tensor (batch, 2, num_tokens // 2) on ``device``.
    """
    _check_even(num_tokens)
    noise = torch.rand(batch, num_tokens, generator=generator)
    perm = noise.argsort(dim=1)
    return perm.view(batch, 2, num_tokens // 2).to(device)


def complementary_splits(num_tokens: int, num_pairs: int, seed: int = 0) -> torch.Tensor:
    """K fixed split pairs for inference.

    Each pair reconstructs every token exactly once (A from B, B from A), so averaging over
    the K pairs gives every position K reconstructions from K different contexts.
    Returns a long tensor (num_pairs, 2, num_tokens // 2); deterministic in ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    return random_splits(num_pairs, num_tokens, generator=gen)


def _check_even(num_tokens: int) -> None:
    if num_tokens < 2 or num_tokens % 2:
        raise ValueError(f"need an even number of tokens >= 2 to split in halves, got {num_tokens}")
