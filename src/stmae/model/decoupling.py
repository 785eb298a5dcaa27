"""Feature decoupling: split the feature patches into two disjoint halves of equal size.

A split is a long tensor ``(..., 2, L/2)`` of token indices: row 0 is half A, row 1 is
half B, and together they are a permutation of ``0..L-1``. Training draws a fresh split per
image and step (the paper's random decoupling, which acts as the main regulariser); testing
uses K fixed splits drawn from a seed so that the same image always gets the same score.

Both draw through one :data:`SplitDrawer` (by default :func:`random_splits`, per token as
the paper), so a study of other splits (research's block splits, docs/research.md) swaps in
its drawer for training (:func:`stmae.train.train_model`) and testing
(:attr:`stmae.pipeline.MapPipeline.draw_splits`) alike.
"""

from __future__ import annotations

from typing import Callable

import torch

#: Draws ``batch`` random splits of ``num_tokens`` tokens, (batch, 2, num_tokens // 2) on
#: ``device``, from ``generator``: called as ``draw(batch, num_tokens, generator, device)``.
SplitDrawer = Callable[[int, int, "torch.Generator | None", "torch.device | str"], torch.Tensor]


def random_splits(
    batch: int,
    num_tokens: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One random disjoint split per image: a long tensor (batch, 2, num_tokens // 2) on ``device``."""
    _check_even(num_tokens)
    noise = torch.rand(batch, num_tokens, generator=generator)
    return noise.argsort(dim=1).view(batch, 2, num_tokens // 2).to(device)


def complementary_splits(
    num_tokens: int, num_pairs: int, seed: int = 0, draw: SplitDrawer = random_splits
) -> torch.Tensor:
    """K fixed split pairs for inference, drawn by ``draw`` from a generator seeded with ``seed``.

    Each pair reconstructs every token exactly once (A from B, B from A), so averaging over
    the K pairs gives every position K reconstructions from K different contexts.
    Returns a long tensor (num_pairs, 2, num_tokens // 2) on the CPU; deterministic in
    ``seed`` and independent of the global generator.
    """
    gen = torch.Generator().manual_seed(seed)
    return draw(num_pairs, num_tokens, gen, "cpu")


def _check_even(num_tokens: int) -> None:
    if num_tokens < 2 or num_tokens % 2:
        raise ValueError(f"need an even number of tokens >= 2 to split in halves, got {num_tokens}")
