"""Local perceptual semantic representation: multi-depth CNN features on one grid.

Shallow layers localise small defects; deeper layers know what a "normal" part looks like.
Each chosen layer is resized (bilinear) to one ``grid x grid`` size and the layers are
concatenated on channels. An optional k x k local mean (docs/research.md: it helps both
ST-MAE and the kNN yardstick) gives each position a little neighbourhood context, and
per-channel standardisation with training statistics keeps the high-magnitude deep channels
from dominating the reconstruction loss.

Because the backbone is frozen, training computes these features once per image and caches
them (:func:`extract_features`); the training loop then only runs the transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .backbones import Backbone
from .data import Sample, to_tensor_batch
from .device import tracing
from .geometry import Geometry, Layout


#: Images per backbone call. On a CPU a large batch is slower per image than a small one:
#: the early, high-resolution activations of 32 images (tens of MB each) no longer fit in
#: cache. Measured on 2 threads at 256 px (Lite0): 20-23 ms per image in chunks of 1-4,
#: 42 ms in one batch of 32 (``benchmarks/speed.py`` times the result).
BACKBONE_CHUNK = 4


class FeatureExtractor(nn.Module):
    """Frozen backbone -> (N, C, grid, grid) feature grid.

    Args:
        backbone: a frozen :class:`stmae.backbones.Backbone` returning the chosen layers.
        grid_size: output side; every layer is resized to it.
        aggregate: odd k for a k x k local mean (1 = none).
    """

    def __init__(self, backbone: Backbone, grid_size: int, aggregate: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.grid_size = grid_size
        self.aggregate = aggregate
        self.out_channels = sum(backbone.channels[name] for name in backbone.layers)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) RGB in [0, 1] -> features (N, C, grid, grid) float32.

        On the CPU runs the backbone on at most :data:`BACKBONE_CHUNK` images at a time (one
        call under tracing, where the batch size is symbolic, and on a GPU, which wants the
        whole batch). Every image is processed on its own, so the chunking changes no value
        beyond float rounding of the convolution kernels.
        """
        n = images.shape[0]
        if n > BACKBONE_CHUNK and images.device.type == "cpu" and not tracing():
            return torch.cat([self._features(chunk) for chunk in images.split(BACKBONE_CHUNK)])
        return self._features(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.grid_features(images, self.grid_size).contiguous()

    def grid_features(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """Every chosen layer of the backbone on ``images``, resized (bilinear) to a
        ``size x size`` grid, concatenated on channels, then the local mean.

        ``size`` is a parameter (not always ``grid_size``) so that a variant extractor
        (research's padded one, docs/research.md) can run the same steps on a larger input.
        """
        if not tracing():
            # Channels-last input: oneDNN's and cuDNN's faster kernels for this backbone, with
            # the same values on the CPU (measured: docs/research.md, "Figures behind the code").
            images = images.contiguous(memory_format=torch.channels_last)
        outputs = self.backbone(images)
        maps = [
            F.interpolate(outputs[name].float(), size=(size, size), mode="bilinear", align_corners=False)
            for name in self.backbone.layers
        ]
        feats = torch.cat(maps, dim=1)
        if self.aggregate > 1:
            # Zero padding (count_include_pad=True) damps the outermost cells. Averaging only
            # the in-image cells instead made the border the hottest place of almost every
            # good image (docs/research.md, "Border padding of the local mean").
            feats = F.avg_pool2d(feats, self.aggregate, stride=1, padding=self.aggregate // 2, count_include_pad=True)
        return feats


class FeatureStats(nn.Module):
    """Per-channel mean and std of training features (C,), used to standardise.

    Buffers, so that they are one part of the fitted scoring module
    (:class:`stmae.pipeline.MapPipeline`); its ``state_dict`` is the run folder's
    ``feature_stats.*`` tensors.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @classmethod
    def from_features(cls, feats: torch.Tensor, eps: float = 1e-6) -> "FeatureStats":
        """Channel statistics over all images and positions of (N, C, G, G) features.

        Accumulates in float64 so large caches do not lose precision.
        """
        x = feats.transpose(0, 1).reshape(feats.shape[1], -1).double()
        mean = x.mean(dim=1)
        std = x.std(dim=1).clamp_min(eps)
        return cls(mean.float(), std.float())

    def apply(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardise (N, C, G, G) features (broadcast over N, G, G)."""
        mean = self.mean.to(feats.device, feats.dtype).view(1, -1, 1, 1)
        std = self.std.to(feats.device, feats.dtype).view(1, -1, 1, 1)
        return (feats - mean) / std


def batched(items: Sequence, size: int) -> Iterable[Sequence]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def extract_features(
    extractor: FeatureExtractor,
    samples: Sequence[Sample],
    image_size: int,
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    desc: str = "features",
    quiet: bool = False,
) -> torch.Tensor:
    """Read, resize (to ``image_size``) and featurise samples: a CPU cache (len, C, G, G).

    The one place where images become cached features, so training, the one-class test
    cache and the kNN yardstick all see exactly the same inputs: the squeezing geometry of
    :func:`extract_sample_features`.
    """
    return extract_sample_features(
        extractor, samples, Geometry(size=image_size), batch_size=batch_size, device=device, desc=desc, quiet=quiet
    ).feats


@dataclass
class SampleFeatures:
    """Cached features of samples cut by a :class:`~stmae.geometry.Geometry`: ``feats``
    (tiles, C, G, G) in sample order, ``layouts`` one per sample (its tiles, in order)."""

    feats: torch.Tensor
    layouts: list[Layout]

    @property
    def offsets(self) -> list[int]:
        """Index of each sample's first tile in ``feats`` (and the total at the end)."""
        out = [0]
        for layout in self.layouts:
            out.append(out[-1] + layout.count)
        return out

    def select(self, indices: Sequence[int] | Iterable[int]) -> "SampleFeatures":
        """The samples at ``indices`` (their tiles, in that order)."""
        picked = [int(i) for i in indices]
        offsets = self.offsets
        rows = [j for i in picked for j in range(offsets[i], offsets[i + 1])]
        return SampleFeatures(self.feats[torch.as_tensor(rows, dtype=torch.long)], [self.layouts[i] for i in picked])


@torch.no_grad()
def extract_sample_features(
    extractor: FeatureExtractor,
    samples: Sequence[Sample],
    geometry: Geometry,
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    desc: str = "features",
    quiet: bool = False,
) -> SampleFeatures:
    """Read, cut by ``geometry`` and featurise samples (``resize``: one input per sample).
    Tiles of consecutive samples share backbone calls of at most ``batch_size`` tiles."""
    chunks: list[torch.Tensor] = []
    layouts: list[Layout] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        while pending:
            part, pending[:] = pending[:batch_size], pending[batch_size:]
            chunks.append(extractor(to_tensor_batch(part).to(device)).cpu())

    with tqdm(total=len(samples), desc=desc, unit="img", disable=quiet, leave=False) as bar:
        for sample in samples:
            tiles, layout = geometry.split(sample.load_image(reduce_to=geometry.reduce_to))
            layouts.append(layout)
            pending.extend(tiles)
            if len(pending) >= batch_size:
                flush()
            bar.update(1)
        flush()
    feats = torch.cat(chunks) if chunks else torch.empty(0, extractor.out_channels, extractor.grid_size, extractor.grid_size)
    return SampleFeatures(feats, layouts)
