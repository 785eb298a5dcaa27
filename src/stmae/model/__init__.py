"""The Siamese transition masked autoencoder and its parts."""

from .decoupling import complementary_splits, random_splits
from .memory import PatchMemory
from .residual import RESIDUALS, ResidualAccumulator, ResidualStats, feature_residual
from .stmae import STMAE, hard_mined_mean, reconstruction_loss

__all__ = [
    "STMAE",
    "PatchMemory",
    "RESIDUALS",
    "ResidualAccumulator",
    "ResidualStats",
    "complementary_splits",
    "random_splits",
    "feature_residual",
    "hard_mined_mean",
    "reconstruction_loss",
]
