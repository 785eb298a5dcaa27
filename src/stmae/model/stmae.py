"""The Siamese transition masked autoencoder (ST-MAE, Yao, Wang & Yu, arXiv 2211.00349).

Data flow for one image with feature grid F (C x H x W) and a split (A, B):

1. ``patchify``: F is cut into p x p feature patches -> L tokens of C*p*p values, row-major.
2. Siamese encoder: the *same* ViT encoder encodes the tokens of A alone and of B alone
   (both halves go through one batched call; attention never mixes the two sequences).
3. Transition: A's latents are placed at A's positions of a full-length decoder sequence
   whose B positions hold only a learned mask token plus position embedding, and vice
   versa. The decoder's outputs at B's positions are B's reconstruction and those at A's
   positions come from the mirror sequence.
4. ``unpatchify``: predictions are scattered back to their original token index *before*
   the reshape to the grid, so the grid is in the input's spatial order (a public
   re-implementation reshaped the shuffled order, scrambling the map).

Invariant (tested): the reconstruction of a token depends only on the features of the other
half, never on its own. An anomalous patch therefore cannot be copied through to its own
reconstruction, which is what makes the residual an anomaly signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vit import Block, init_weights, sincos_pos_embed


class STMAE(nn.Module):
    """Siamese transition MAE over a (C, grid, grid) feature map.

    Args:
        in_channels: feature channels C.
        grid_size: side of the square feature grid.
        patch_size: side p of a feature patch in grid cells; L = (grid/p)^2 tokens.
        embed_dim, depth, num_heads: the shared (Siamese) encoder.
        decoder_dim, decoder_depth, decoder_heads: the lightweight decoder.
        mlp_ratio: hidden width of the MLPs relative to their dim.
    """

    def __init__(
        self,
        in_channels: int,
        grid_size: int,
        patch_size: int = 2,
        embed_dim: int = 256,
        depth: int = 4,
        num_heads: int = 8,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if grid_size % patch_size:
            raise ValueError(f"grid_size {grid_size} is not a multiple of patch_size {patch_size}")
        self.in_channels = in_channels
        self.grid_size = grid_size
        self.patch_size = patch_size
        self.side = grid_size // patch_size
        self.num_tokens = self.side**2
        self.token_dim = in_channels * patch_size**2

        self.embed = nn.Linear(self.token_dim, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.side, self.side), persistent=False)
        self.encoder = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed(decoder_dim, self.side, self.side), persistent=False
        )
        self.decoder = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, self.token_dim)

        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    # ------------------------------------------------------------------ token layout
    def patchify(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C, G, G) -> (N, L, C*p*p), tokens in row-major patch order."""
        n, c, g, _ = feats.shape
        p, s = self.patch_size, self.side
        x = feats.reshape(n, c, s, p, s, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, s * s, c * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L, C*p*p) in row-major patch order -> (N, C, G, G); inverse of :meth:`patchify`."""
        n = tokens.shape[0]
        p, s, c = self.patch_size, self.side, self.in_channels
        x = tokens.reshape(n, s, s, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, c, s * p, s * p)

    # ------------------------------------------------------------------ forward
    def forward(self, feats: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
        """Reconstruct every token from the other half.

        Args:
            feats: (N, C, G, G) feature grid.
            split: (N, 2, L/2) long token indices; row 0 = half A, row 1 = half B, together a
                permutation of 0..L-1. A (2, L/2) split is shared by the whole batch.
        Returns:
            (N, C, G, G) reconstruction in the input's spatial order.
        """
        tokens = self.patchify(feats)
        n, length, dim = tokens.shape
        if split.dim() == 2:
            split = split.unsqueeze(0).expand(n, -1, -1)
        if split.shape != (n, 2, length // 2):
            raise ValueError(f"split must have shape ({n}, 2, {length // 2}), got {tuple(split.shape)}")
        half_a, half_b = split[:, 0], split[:, 1]
        visible = torch.cat([half_a, half_b], dim=0)  # (2N, L/2): the half each sequence sees
        target = torch.cat([half_b, half_a], dim=0)  # (2N, L/2): the half it reconstructs

        latents = self.encode(tokens.repeat(2, 1, 1), visible)
        pred = self.decode(latents, visible, target)  # (2N, L/2, C*p*p)

        recon = pred.new_zeros(n, length, dim)  # pred's dtype: bf16 under autocast
        recon = recon.scatter(1, _expand(half_b, dim), pred[:n])
        recon = recon.scatter(1, _expand(half_a, dim), pred[n:])
        return self.unpatchify(recon)

    def encode(self, tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Siamese encoder: (B, L, C*p*p) tokens, (B, l) visible indices -> (B, l, E) latents."""
        x = torch.gather(tokens, 1, _expand(visible, tokens.shape[-1]))
        x = self.embed(x) + self.pos_embed[visible]
        for block in self.encoder:
            x = block(x)
        return self.encoder_norm(x)

    def decode(self, latents: torch.Tensor, visible: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Transition + decoder: latents at ``visible`` -> predictions (B, l, C*p*p) at ``target``.

        The target positions are filled with the mask token only, so nothing of the target
        features can reach their own prediction.
        """
        b = latents.shape[0]
        y = self.decoder_embed(latents)
        d = y.shape[-1]
        seq = self.mask_token.to(y.dtype).expand(b, self.num_tokens, d)
        seq = seq.scatter(1, _expand(visible, d), y) + self.decoder_pos_embed
        for block in self.decoder:
            seq = block(seq)
        out = torch.gather(self.decoder_norm(seq), 1, _expand(target, d))
        return self.head(out)


def _expand(index: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, l) token indices -> (B, l, dim) for gather/scatter along the token axis."""
    return index.unsqueeze(-1).expand(-1, -1, dim)


#: Loss weight of the cells below the hard-mining cut (Dinomaly's down-weighting of easy points).
EASY_CELL_WEIGHT = 0.1


def reconstruction_loss(recon: torch.Tensor, feats: torch.Tensor, hard_mining: float = 0.0) -> torch.Tensor:
    """Training loss on the feature grid: mean squared error + (1 - cosine).

    The MSE term matches magnitudes; the cosine term matches the direction of each position's
    feature vector, which is what separates semantic content.

    ``hard_mining`` > 0 (Dinomaly, Guo et al. 2024): the easiest ``hard_mining`` share of
    grid cells in the batch count at :data:`EASY_CELL_WEIGHT` (:func:`hard_mined_mean`).
    With 0 every cell counts fully (the same value as the plain means above).
    """
    if hard_mining <= 0.0:
        mse = (recon - feats).pow(2).mean()
        cos = 1.0 - F.cosine_similarity(recon, feats, dim=1, eps=1e-6).mean()
        return mse + cos
    per_cell = (recon - feats).pow(2).mean(dim=1) + (1.0 - F.cosine_similarity(recon, feats, dim=1, eps=1e-6))
    return hard_mined_mean(per_cell, hard_mining)


def hard_mined_mean(per_cell: torch.Tensor, hard_mining: float) -> torch.Tensor:
    """Mean of a per-cell loss (N, G, G) whose lowest ``hard_mining`` share counts at
    :data:`EASY_CELL_WEIGHT`: training spends itself on the cells it still reconstructs
    badly, not on refining flat background. Its own function so that another loss (a
    training variant, :func:`stmae.train.train_model`'s ``loss``) mines alike."""
    cut = torch.quantile(per_cell.detach().flatten().float(), hard_mining)
    weight = torch.where(per_cell.detach() < cut, EASY_CELL_WEIGHT, 1.0)
    return (per_cell * weight).mean()
