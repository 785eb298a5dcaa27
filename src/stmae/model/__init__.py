"""The Siamese transition masked autoencoder and its parts."""

from .decoupling import complementary_splits, random_splits
from .stmae import STMAE, feature_residual, reconstruction_loss

__all__ = ["STMAE", "complementary_splits", "random_splits", "feature_residual", "reconstruction_loss"]
