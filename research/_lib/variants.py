"""The ablation-only training variants: switches no preset sets, kept out of ``stmae``.

Why here: each was tried in ``research/ablation.py`` and lost or tied (docs/research.md,
"Ablation switches"), so the user package does not carry them as settings. They stay
reproducible: a variant names them by their old dotted config keys (``"train.ema": 0.99``),
:meth:`Knobs.split` takes them out of the config overrides, and the functions here build
the same extractor, statistics, training and scoring that the config switches did, through
``stmae``'s own extension points (:func:`stmae.train.train_model`'s ``loss``,
``draw_splits`` and ``after_step``; :attr:`stmae.pipeline.MapPipeline.draw_splits`;
:meth:`stmae.features.FeatureExtractor.grid_features`) instead of copies of its code.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from stmae.build import build_extractor as build_plain_extractor
from stmae.config import Config, ConfigError
from stmae.features import FeatureExtractor, FeatureStats
from stmae.infer import Detector
from stmae.model import STMAE, hard_mined_mean, random_splits, reconstruction_loss
from stmae.model.decoupling import SplitDrawer
from stmae.train import LossFn, train_model


@dataclass(frozen=True)
class Knobs:
    """The research knobs of one training variant; the defaults are the package's recipe.

    ``pad``: grid cells of reflected image added on every side before the backbone and
    cropped off the grid afterwards (:class:`PaddedExtractor`). ``split_block``: tokens split
    into halves in square blocks of ``split_block``\\ :sup:`2` (:class:`BlockSplits`), in
    training and at test time. ``ema``: decay of an average of the weights that replaces the
    trained ones (:class:`WeightAverage`). ``cos_weight``: the loss is MSE + ``cos_weight``
    x (1 - cosine) (:class:`CosWeightedLoss`). ``standardize``: False trains and scores on
    raw features (:func:`feature_stats`).
    """

    pad: int = 0
    split_block: int = 1
    ema: float = 0.0
    cos_weight: float = 1.0
    standardize: bool = True

    #: The dotted key a variant names each knob by: its old config setting.
    KEYS: ClassVar[dict[str, str]] = {
        "features.pad": "pad",
        "model.split_block": "split_block",
        "train.ema": "ema",
        "train.cos_weight": "cos_weight",
        "features.standardize": "standardize",
    }

    @classmethod
    def split(cls, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], "Knobs"]:
        """A variant's overrides -> (the real :class:`~stmae.config.Config` overrides, the knobs)."""
        knobs = {cls.KEYS[k]: v for k, v in overrides.items() if k in cls.KEYS}
        rest = {k: v for k, v in overrides.items() if k not in cls.KEYS}
        types = {f.name: f.type for f in fields(cls)}
        return rest, cls(**{k: _typed(v, types[k], k) for k, v in knobs.items()})

    def changed(self) -> dict[str, Any]:
        """The knobs off their default, by dotted key (what a result row records)."""
        default = Knobs()
        return {key: getattr(self, name) for key, name in self.KEYS.items() if getattr(self, name) != getattr(default, name)}

    def validate(self, cfg: Config) -> "Knobs":
        """ConfigError for knobs ``cfg`` cannot run (the checks the config switches had)."""
        g = cfg.features.grid_size
        if not 0 <= self.pad < g:
            raise ConfigError(f"features.pad must be in [0, grid_size = {g})")
        if self.split_block != 1:
            try:
                check_block((g // cfg.model.patch_size) ** 2, self.split_block)
            except ValueError as exc:
                raise ConfigError(f"model.split_block: {exc}") from None
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError("train.ema must be in [0, 1)")
        return self


def _typed(value: Any, type_name: str, name: str) -> Any:
    """A knob's value as its field's type (``True`` for a bool is not an int here)."""
    kind = {"int": int, "float": float, "bool": bool}[str(type_name)]
    if kind is bool and not isinstance(value, bool) or kind is int and (isinstance(value, bool) or value != int(value)):
        raise ConfigError(f"{name}: cannot use {value!r} as {type_name}")
    return kind(value)


# ------------------------------------------------------------------------------ features
class PaddedExtractor(FeatureExtractor):
    """:class:`~stmae.features.FeatureExtractor` on the image with ``pad`` grid cells of
    reflection added on every side, cropped off the grid afterwards.

    Why it was tried: border cells then see image-like context in the CNN and in the local
    mean instead of zero padding; the grid the transformer sees, and so the map, still covers
    exactly the image.
    """

    def __init__(self, backbone: Any, grid_size: int, aggregate: int = 1, pad: int = 0) -> None:
        super().__init__(backbone, grid_size, aggregate)
        self.pad = pad

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        p = self.pad
        # p cells of the grid are p * H / grid pixels; reflect needs fewer than H.
        ph = round(p * int(images.shape[-2]) / self.grid_size)
        pw = round(p * int(images.shape[-1]) / self.grid_size)
        feats = self.grid_features(F.pad(images, (pw, pw, ph, ph), mode="reflect"), self.grid_size + 2 * p)
        return feats[..., p : p + self.grid_size, p : p + self.grid_size].contiguous()


def build_extractor(cfg: Config, knobs: Knobs) -> FeatureExtractor:
    """The extractor ``cfg`` describes, padded when ``knobs.pad`` > 0."""
    plain = build_plain_extractor(cfg)
    if not knobs.pad:
        return plain
    return PaddedExtractor(plain.backbone, plain.grid_size, plain.aggregate, knobs.pad)


def feature_stats(train_feats: torch.Tensor, knobs: Knobs) -> FeatureStats:
    """The training statistics, or with ``standardize`` off statistics that change nothing
    (mean 0, std 1): the transformer then reconstructs raw features."""
    if knobs.standardize:
        return FeatureStats.from_features(train_feats)
    channels = train_feats.shape[1]
    return FeatureStats(torch.zeros(channels), torch.ones(channels))


# ------------------------------------------------------------------------------ splits
def check_block(num_tokens: int, block: int) -> tuple[int, int]:
    """(token grid side, blocks per side) of a split in ``block`` x ``block`` token blocks;
    ValueError when the tokens cannot split so evenly."""
    side = math.isqrt(num_tokens)
    if block < 1:
        raise ValueError(f"split block must be >= 1, got {block}")
    if side * side != num_tokens or side % block:
        raise ValueError(
            f"a split in {block}x{block} token blocks needs a square token grid whose side is a "
            f"multiple of {block}; got {num_tokens} tokens"
        )
    per_side = side // block
    if per_side**2 % 2:
        raise ValueError(
            f"{per_side}x{per_side} blocks of {block}x{block} tokens cannot be split into two equal "
            "halves; choose a block size that leaves an even number of blocks"
        )
    return side, per_side


@dataclass(frozen=True)
class BlockSplits:
    """A :data:`~stmae.model.decoupling.SplitDrawer` that assigns square blocks of
    ``block`` x ``block`` tokens (row-major square token grid) to a half together.

    Why it was tried: with a per-token split, half of every token's neighbours are visible,
    and a defect spanning several tokens is reconstructed from visible tokens that show the
    same defect. Blocks put the nearest visible context of a block's inner tokens further
    away. Frozen (hashable by value): the pipeline caches its test-time pairs per drawer.
    """

    block: int

    def __call__(self, batch: int, num_tokens: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        if self.block == 1:
            return random_splits(batch, num_tokens, generator, device)
        side, per_side = check_block(num_tokens, self.block)
        b = self.block
        order = torch.rand(batch, per_side**2, generator=generator).argsort(dim=1)  # (batch, blocks)
        corner = (order // per_side) * (b * side) + (order % per_side) * b  # first token of each block
        offsets = (torch.arange(b)[:, None] * side + torch.arange(b)[None, :]).flatten()
        tokens = corner[..., None] + offsets  # (batch, blocks, b*b)
        return tokens.view(batch, 2, num_tokens // 2).to(device)


def split_drawer(knobs: Knobs) -> SplitDrawer:
    """The split drawer of ``knobs``: the package's per-token one, or :class:`BlockSplits`."""
    return random_splits if knobs.split_block == 1 else BlockSplits(knobs.split_block)


# ------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class CosWeightedLoss:
    """:data:`stmae.train.LossFn` MSE + ``cos_weight`` x (1 - cosine), hard-mined as the
    package's (:func:`stmae.model.hard_mined_mean`). ``cos_weight`` 1 is the package's loss."""

    cos_weight: float

    def __call__(self, recon: torch.Tensor, feats: torch.Tensor, hard_mining: float = 0.0) -> torch.Tensor:
        if hard_mining <= 0.0:
            mse = (recon - feats).pow(2).mean()
            cos = 1.0 - F.cosine_similarity(recon, feats, dim=1, eps=1e-6).mean()
            return mse + self.cos_weight * cos
        # the old loss's order of operations: autograd sums the gradient in graph order
        per_cell = (recon - feats).pow(2).mean(dim=1) + self.cos_weight * (
            1.0 - F.cosine_similarity(recon, feats, dim=1, eps=1e-6))
        return hard_mined_mean(per_cell, hard_mining)


class WeightAverage:
    """An exponential moving average of ``model``'s weights, for ``train_model``'s ``after_step``.

    Made from the weights as they are (the model on its training device, before training);
    :meth:`apply` puts the average in the model. The decay warms up (as TensorFlow's
    ``num_updates``: ``min(decay, (1 + step) / (10 + step))``) so that short runs do not
    average in the random initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.average = [p.detach().clone() for p in model.parameters()]

    def __call__(self, step: int) -> None:
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for avg, param in zip(self.average, self.model.parameters()):
                avg.lerp_(param.detach(), 1.0 - decay)

    def apply(self) -> None:
        """Replace the model's weights by the average."""
        with torch.no_grad():
            for param, avg in zip(self.model.parameters(), self.average):
                param.copy_(avg)


def train(model: STMAE, feats: torch.Tensor, cfg: Config, knobs: Knobs, device: torch.device,
          quiet: bool = True) -> list[float]:
    """:func:`stmae.train.train_model` with the knobs' loss, splits and weight average."""
    model.to(device)
    average = WeightAverage(model, knobs.ema) if knobs.ema > 0 else None
    loss: LossFn = reconstruction_loss if knobs.cos_weight == 1.0 else CosWeightedLoss(knobs.cos_weight)
    losses = train_model(model, feats, cfg.train, device, quiet=quiet, loss=loss,
                         draw_splits=split_drawer(knobs), after_step=average)
    if average is not None:
        average.apply()
    return losses


def detector(extractor: FeatureExtractor, model: STMAE, stats: FeatureStats, cfg: Config, knobs: Knobs) -> Detector:
    """A :class:`~stmae.infer.Detector` of the trained parts whose test-time split pairs are
    drawn like the training's (:attr:`~stmae.pipeline.MapPipeline.draw_splits`)."""
    det = Detector(extractor, model, stats, copy.deepcopy(cfg))
    det.pipeline.draw_splits = split_drawer(knobs)
    return det
