"""Factories: the extractor and the transformer a :class:`~stmae.config.Config` describes.

Why here and not in ``infer``: training, inference, protocols, benchmarks and export all
build the same two modules from a config; none of them should import the inference code
to get them.
"""

from __future__ import annotations

from .backbones import build_backbone
from .config import Config
from .features import FeatureExtractor
from .model import STMAE


def build_model(config: Config, in_channels: int) -> STMAE:
    """The transformer described by ``config.model`` for ``in_channels`` feature channels."""
    m = config.model
    return STMAE(
        in_channels=in_channels,
        grid_size=config.features.grid_size,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        decoder_dim=m.decoder_dim,
        decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads,
        mlp_ratio=m.mlp_ratio,
    )


def build_extractor(config: Config, weights: str | None = None) -> FeatureExtractor:
    """Frozen backbone + grid resizing as described by ``config``."""
    backbone = build_backbone(
        config.backbone.name, layers=config.backbone.layers, weights=weights or config.backbone.weights
    )
    return FeatureExtractor(backbone, config.features.grid_size, config.features.aggregate)


__all__ = ["build_extractor", "build_model"]
