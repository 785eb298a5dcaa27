"""Inference: the :class:`Detector` turns images into anomaly maps, scores and labels.

Map recipe (one place, shared by validation during ``fit``, ``predict`` and ``test``):
features -> K complementary split pairs -> per-position residual averaged over pairs ->
(with ``infer.memory`` > 0: blended with the distance to the nearest good patch of the
memory bank, :mod:`stmae.model.memory`) -> bilinear upsampling to the model input size ->
Gaussian smoothing -> image score (max or top-k mean). Using K fixed splits (seeded) makes
scores deterministic for an image.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .backbones import build_backbone
from .checkpoint import load_run
from .config import Config
from .device import autocast, resolve_device
from .data import resize_image, to_tensor_batch
from .data.io import as_rgb
from .features import FeatureExtractor, FeatureStats, batched
from .model import (
    STMAE,
    PatchMemory,
    ResidualAccumulator,
    ResidualStats,
    complementary_splits,
    feature_residual,
)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass
class Prediction:
    """Result for one image.

    score: image anomaly score (higher = more anomalous).
    label: 1 if ``score > threshold`` (anomalous), else 0; -1 when no threshold is known.
    anomaly_map: float32 (H, W) at the image's original size.
    """

    score: float
    label: int
    anomaly_map: np.ndarray
    threshold: float | None
    path: str | None = None


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
    return FeatureExtractor(backbone, config.features.grid_size, config.features.aggregate, config.features.pad)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (N, H, W) maps; kernel radius 4 sigma, reflect border."""
    if sigma <= 0:
        return maps
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    h, w = maps.shape[-2:]
    mode = "reflect" if radius < min(h, w) else "replicate"
    out = maps.unsqueeze(1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def image_scores(maps: torch.Tensor, score: str = "max", topk: float = 0.01) -> torch.Tensor:
    """(N, H, W) maps -> (N,) scores: the maximum, or the mean of the top ``topk`` fraction."""
    flat = maps.flatten(1)
    if score == "max":
        return flat.amax(dim=1)
    k = max(1, int(math.ceil(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


class Detector:
    """A trained ST-MAE ready to score images.

    Build with :meth:`load` from a run folder (or from parts right after training).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        model: STMAE,
        stats: FeatureStats,
        config: Config,
        threshold: float | None = None,
        meta: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        residual_stats: ResidualStats | None = None,
        memory: PatchMemory | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.extractor = extractor.to(self.device).eval()
        self.model = model.to(self.device).eval()
        self.stats = stats
        self.config = config
        self.threshold = threshold
        self.meta = meta or {}
        self.residual_stats = residual_stats
        self.memory = memory
        if memory is not None:  # searched on every batch: keep it where the features are
            memory.bank = memory.bank.to(self.device)
        self.rebuild_splits()

    def rebuild_splits(self) -> None:
        """The K fixed test-time split pairs from the config (again after changing ``infer.num_pairs``)."""
        cfg = self.config
        self.splits = complementary_splits(
            self.model.num_tokens, cfg.infer.num_pairs, seed=cfg.train.seed, block=cfg.model.split_block
        ).to(self.device)

    @classmethod
    def load(
        cls, run_dir: str | os.PathLike, device: str = "auto", backbone_weights: str | None = None
    ) -> "Detector":
        """Load a run folder written by ``stmae fit``.

        ``backbone_weights`` overrides the backbone weights file recorded in the run (for
        backbones whose weights are not packaged, e.g. VGG19 moved to another machine).
        """
        run = load_run(run_dir)
        extractor = build_extractor(run.config, weights=backbone_weights)
        model = build_model(run.config, extractor.out_channels)
        model.load_state_dict(run.model_state, strict=True)
        return cls(
            extractor,
            model,
            run.stats,
            run.config,
            threshold=run.meta.get("threshold"),
            meta=run.meta,
            device=resolve_device(device),
            residual_stats=run.residual_stats,
            memory=run.memory,
        )

    # ------------------------------------------------------------------ core maths
    @torch.no_grad()
    def grid_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardised features (N, C, G, G) -> anomaly maps on the grid (N, G, G).

        Mean over the K complementary split pairs of the per-position residual; with
        ``infer.memory`` > 0 blended with the distance to the nearest good patch.
        """
        share = self.config.infer.memory
        if share > 0 and self.memory is None:
            raise ValueError(
                f"infer.memory is {share} but this detector has no memory bank; call fit_memory() on "
                "good training features (stmae fit does this), or set infer.memory to 0"
            )
        feats = feats.to(self.device)
        residual = self.residual_maps(feats)
        if share <= 0:
            return residual
        return self.memory.blend(residual, self.memory.distances(feats), share)

    @torch.no_grad()
    def residual_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardised features (N, C, G, G) -> mean residual over the K split pairs (N, G, G)."""
        kind = self.config.infer.residual
        if kind == "mahalanobis" and self.residual_stats is None:
            raise ValueError(
                "infer.residual is 'mahalanobis' but this detector has no residual statistics; "
                "call fit_residual_stats() on good training features (stmae fit does this)"
            )
        feats = feats.to(self.device)
        total = torch.zeros(feats.shape[0], feats.shape[2], feats.shape[3], device=self.device)
        for recon in self._reconstructions(feats):
            total += feature_residual(recon, feats, kind, self.residual_stats)
        return total / len(self.splits)

    def _reconstructions(self, feats: torch.Tensor) -> Iterable[torch.Tensor]:
        """The K reconstructions (one per split pair) of standardised features on the device.

        Autocast covers the model only, never the caller's code between yields, so residuals
        (the Mahalanobis whitening in particular) are computed in float32.
        """
        for split in self.splits:
            with torch.no_grad(), autocast(self.device):
                recon = self.model(feats, split)
            yield recon.float()

    @torch.no_grad()
    def fit_residual_stats(self, feats: torch.Tensor, quiet: bool = True) -> ResidualStats:
        """Fit (and keep) the Mahalanobis residual statistics on raw features of good images.

        Uses the same K split pairs as scoring, so the statistics describe exactly the
        residuals that will be scored.
        """
        acc = ResidualAccumulator(feats.shape[1])
        chunks = torch.split(feats, self.config.infer.batch_size)
        for chunk in tqdm(chunks, desc="residual stats", unit="batch", disable=quiet, leave=False):
            x = self.stats.apply(chunk.to(self.device))
            for recon in self._reconstructions(x):
                acc.add(recon, x)
        self.residual_stats = acc.finish(self.config.infer.shrinkage)
        return self.residual_stats

    @torch.no_grad()
    def fit_memory(
        self, train_feats: torch.Tensor, calib_feats: torch.Tensor, seed: int = 42, quiet: bool = True
    ) -> PatchMemory:
        """Build (and keep) the memory bank from raw features of good training images, and
        scale it with the medians of good calibration images (held out from training).

        The coreset ratio is ``infer.memory_coreset``; selection runs on the detector's device.
        """
        x = self.stats.apply(train_feats.to(self.device))
        memory = PatchMemory.fit(x, self.config.infer.memory_coreset, seed=seed, quiet=quiet)
        residuals, distances = [], []
        for chunk in torch.split(calib_feats, self.config.infer.batch_size):
            c = self.stats.apply(chunk.to(self.device))
            residuals.append(self.residual_maps(c))
            distances.append(memory.distances(c))
        memory.calibrate(torch.cat(residuals), torch.cat(distances))
        self.memory = memory
        return memory

    def postprocess(self, grid_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid maps (N, G, G) -> (maps (N, S, S) at the input size S, scores (N,))."""
        size = self.config.features.image_size
        maps = F.interpolate(grid_maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
        maps = gaussian_blur(maps.squeeze(1), self.config.infer.sigma)
        return maps, image_scores(maps, self.config.infer.score, self.config.infer.topk)

    @torch.no_grad()
    def score_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (unstandardised) cached features -> (maps (N, S, S), scores (N,)) on CPU."""
        maps, scores = [], []
        for chunk in torch.split(feats, self.config.infer.batch_size):
            m, s = self.postprocess(self.grid_maps(self.stats.apply(chunk.to(self.device))))
            maps.append(m.cpu())
            scores.append(s.cpu())
        return torch.cat(maps), torch.cat(scores)

    @torch.no_grad()
    def score_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, S, S) in [0, 1], already resized -> (maps (N, S, S), scores (N,)) on CPU."""
        return self.score_features(self.extractor(images.to(self.device)))

    def score_arrays(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 RGB arrays of any size -> maps at the model input size and scores (CPU)."""
        size = self.config.features.image_size
        return self.score_tensor(to_tensor_batch([resize_image(im, size) for im in images]))

    # ------------------------------------------------------------------ user API
    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        batch_size: int | None = None,
        quiet: bool = True,
    ) -> list[Prediction]:
        """Score images given as paths, PIL images or numpy arrays (HxW, HxWx3/4, uint8/16).

        Returns one :class:`Prediction` per image, maps at each image's original size.
        """
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) else list(images)
        results: list[Prediction] = []
        bs = batch_size or self.config.infer.batch_size
        with tqdm(total=len(items), desc="predict", unit="img", disable=quiet, leave=False) as bar:
            for chunk in batched(items, bs):
                arrays = [as_rgb(item) for item in chunk]
                maps, scores = self.score_arrays(arrays)
                for item, arr, amap, score in zip(chunk, arrays, maps, scores):
                    results.append(self._prediction(item, arr, amap, float(score)))
                bar.update(len(chunk))
        return results

    def _prediction(self, item: ImageInput, arr: np.ndarray, amap: torch.Tensor, score: float) -> Prediction:
        h, w = arr.shape[:2]
        full = F.interpolate(amap[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        label = -1 if self.threshold is None else int(score > self.threshold)
        path = str(item) if isinstance(item, (str, os.PathLike)) else None
        return Prediction(score, label, full.numpy().astype(np.float32), self.threshold, path)


def load(run_dir: str | os.PathLike, device: str = "auto", backbone_weights: str | None = None) -> Detector:
    """Shortcut for :meth:`Detector.load`."""
    return Detector.load(run_dir, device=device, backbone_weights=backbone_weights)


__all__ = ["Detector", "Prediction", "load", "gaussian_blur", "image_scores"]
