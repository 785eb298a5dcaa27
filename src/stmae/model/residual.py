"""Deep feature residual: how far a reconstruction is from the original features, per position.

Two families:

- Fixed functions of (reconstruction, features): ``mse`` (channel-mean squared error),
  ``cos`` (1 - cosine similarity) and ``mse_cos`` (their product).
- ``mahalanobis``: the squared Mahalanobis distance of the residual vector r = x_hat - x
  under a Gaussian fitted to the residuals of good training images
  (:class:`ResidualStats`). Why: some feature directions are never predictable from the
  other half of an image (fine texture, noise-like channels) and dominate a plain MSE even on
  good images, while others are predicted almost perfectly, so a small error there is
  already telling. Whitening the residual with its own normal-image covariance weighs every
  direction by how surprising an error of that size is. It is still a residual of the
  leakage-free reconstruction; the statistics only rescale it. It was the best residual
  alone on one-class data, so the ``lowres`` preset keeps it (docs/research.md, "Choosing
  the defaults").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RESIDUALS


class ResidualStats(nn.Module):
    """Mean (C,) and precision (C, C) of good images' residual vectors.

    Buffers, one part of the fitted scoring module (:class:`stmae.pipeline.MapPipeline`);
    its ``state_dict`` is the run folder's ``residual_stats.*`` tensors.
    """

    mean: torch.Tensor
    precision: torch.Tensor

    def __init__(self, mean: torch.Tensor, precision: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("precision", precision)

    def distance(self, recon: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of ``recon - feats`` (N, C, G, G) -> (N, G, G)."""
        mean = self.mean.to(feats.device, torch.float32).view(1, -1, 1, 1)
        d = (recon.float() - feats.float()) - mean
        pd = torch.einsum("cd,ndhw->nchw", self.precision.to(feats.device, torch.float32), d)
        return (d * pd).sum(dim=1).clamp_min(0.0)


class ResidualAccumulator:
    """Streams residual vectors into float64 sums, so no (images x positions x C) buffer is kept."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64)

    def add(self, recon: torch.Tensor, feats: torch.Tensor) -> None:
        """Add the residual vectors of one batch (N, C, G, G)."""
        r = (recon.float() - feats.float()).transpose(0, 1).reshape(feats.shape[1], -1).double().cpu()
        self.count += r.shape[1]
        self.sum += r.sum(dim=1)
        self.outer += r @ r.T

    def finish(self, shrinkage: float) -> ResidualStats:
        """Shrunk covariance -> precision: (1 - s) * cov + s * mean(diag(cov)) * I, then inverted.

        Shrinkage keeps the inverse stable when few images (or highly correlated channels)
        make the sample covariance nearly singular.
        """
        if self.count < 2:
            raise ValueError("need at least two residual vectors to fit residual statistics")
        mean = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        eye = torch.eye(cov.shape[0], dtype=cov.dtype)
        cov = (1.0 - shrinkage) * cov + shrinkage * cov.diagonal().mean().clamp_min(1e-12) * eye
        precision = torch.linalg.inv(cov)
        return ResidualStats(mean.float(), ((precision + precision.T) / 2).float())


def feature_residual(
    recon: torch.Tensor, feats: torch.Tensor, kind: str = "mse_cos", stats: ResidualStats | None = None
) -> torch.Tensor:
    """Deep feature residual per grid position: (N, C, G, G) x2 -> (N, G, G).

    kind: ``mse``, ``cos``, ``mse_cos`` (high only where magnitude *and* direction
    disagree) or ``mahalanobis`` (needs ``stats``, fitted on good images).
    """
    if kind == "mse":
        return (recon - feats).pow(2).mean(dim=1)
    if kind == "mahalanobis":
        if stats is None:
            raise ValueError("residual 'mahalanobis' needs ResidualStats fitted on good images")
        return stats.distance(recon, feats)
    cos = 1.0 - F.cosine_similarity(recon, feats, dim=1, eps=1e-6)
    if kind == "cos":
        return cos
    if kind == "mse_cos":
        return (recon - feats).pow(2).mean(dim=1) * cos
    raise ValueError(f"unknown residual {kind!r}; use one of {', '.join(RESIDUALS)}")
