"""The map recipe, once: images -> features -> K split pairs -> residual -> memory blend ->
upsampling -> smoothing -> image score.

Why one module: ``predict``, ``test``, the calibration inside ``fit``, the benchmarks and the
exported ONNX/OpenVINO graph must compute the same map. They all run :class:`MapPipeline`
(or its stages), so a change to the recipe cannot reach one of them and miss another.

Why it is fast:

- all K split pairs go through the transformer in *one* batched forward (K x N sequences)
  instead of K calls;
- the memory bank is searched with matrix products: in bf16 with an exact float32 check of
  the few rows bf16 cannot rule out, where the CPU has AMX
  (:class:`stmae.model.memory.BankSearch`), else in float32 blocks
  (:func:`stmae.model.memory.nearest_distances`, also what the ONNX export runs);
- with ``infer.memory == 1`` the transformer is skipped: the map is the distance alone;
- every tensor it needs is a buffer, so it moves with ``.to(device)`` and exports as
  constants; the threshold is *not* in it (thresholds are data, :mod:`stmae.thresholds`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import InferConfig
from .device import tracing
from .features import FeatureExtractor, FeatureStats
from .mapops import blur_operator, blur_radius, resize_operator
from .model import STMAE, PatchMemory, ResidualStats, complementary_splits, feature_residual
from .model.memory import nearest_distances, search_bank

if TYPE_CHECKING:
    from .config import Config

def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (N, H, W) maps; kernel radius 4 sigma, reflect border."""
    if sigma <= 0:
        return maps
    radius = blur_radius(sigma)
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


@functools.lru_cache(maxsize=16)
def _post_operator(grid: int, image_size: int, sigma: float) -> torch.Tensor:
    """(S, G) float32 matrix: bilinear upsampling then Gaussian smoothing along one axis."""
    reflect = blur_radius(sigma) < image_size  # as gaussian_blur chooses for the (S, S) map
    op = blur_operator(image_size, sigma, reflect) @ resize_operator(image_size, grid)
    return torch.from_numpy(op.astype(np.float32))


@functools.lru_cache(maxsize=32)
def _post_operator_on(grid: int, image_size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_post_operator` kept on ``device``: on a GPU no host-to-device copy per call,
    which a CUDA graph could not capture (:mod:`stmae.cuda_graphs`)."""
    return _post_operator(grid, image_size, sigma).to(device, dtype)


def postprocess(grid: torch.Tensor, infer: InferConfig, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid maps (N, H, W) -> (maps (N, S, S) at the input size, scores (N,)).

    Bilinear upsampling, Gaussian smoothing, then the image score: the end of every map
    recipe in the project (ST-MAE's and the kNN yardstick's). Both steps are linear and
    separable, so they run as ``A_H @ grid @ A_W.T`` with one (S, H) and one (S, W) matrix
    (built in numpy, constants in an exported graph): 0.1 ms at 256 px instead of 2 ms for
    an upsampled map and two padded convolutions, equal to that path
    (:func:`reference_postprocess`) within float32 rounding.
    """
    h, w = int(grid.shape[-2]), int(grid.shape[-1])
    op_h, op_w = (_post_operator_on(n, int(image_size), float(infer.sigma), grid.device, grid.dtype) for n in (h, w))
    maps = torch.matmul(torch.matmul(op_h, grid), op_w.T)
    return maps, image_scores(maps, infer.score, infer.topk)


def reference_postprocess(grid: torch.Tensor, infer: InferConfig, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`postprocess` step by step: ``F.interpolate`` (bilinear) then :func:`gaussian_blur`."""
    maps = F.interpolate(grid.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False)
    maps = gaussian_blur(maps.squeeze(1), infer.sigma)
    return maps, image_scores(maps, infer.score, infer.topk)


def blend_scales(memory: PatchMemory, mode: str, pixel: bool = False) -> tuple[float, float, float, float]:
    """(residual offset, residual scale, distance offset, distance scale) for :func:`blend`.

    ``median``: each map divided by its median over held-out good images' grid cells.
    ``quantile``: each map mapped so that the 0.90 quantile of those cells is 0 and the
    0.995 quantile is 1 (``stmae.model.memory.BLEND_QUANTILES``): the two maps then agree on
    what a high value on a good image is, not only on a typical one.
    ``gated``: the same scales; :func:`blend` then also clips the residual at 0.
    ``pixel``: the residual is the pixel map's own (``infer.pixel_residual``), with its own scale.
    """
    if pixel:
        r_median, r_range = memory.pixel_residual_median, memory.pixel_residual_range
        if r_median is None or r_range is None:
            raise ValueError(
                "infer.pixel_residual differs from infer.residual but this memory bank was calibrated "
                "for one map (saved by an older stmae, or fitted with pixel_residual 'same'); refit, or "
                "set infer.pixel_residual and infer.pixel_blend to 'same'"
            )
    else:
        r_median, r_range = memory.residual_median, memory.residual_range
    if mode == "median":
        return 0.0, r_median, 0.0, memory.distance_median
    if r_range is None or memory.distance_range is None:
        raise ValueError(
            f"infer.blend is {mode!r} but this memory bank has no quantile ranges (saved by an older "
            "stmae); refit, or set infer.blend to median"
        )
    (r_lo, r_hi), (d_lo, d_hi) = r_range, memory.distance_range
    return r_lo, r_hi - r_lo, d_lo, d_hi - d_lo


def blend(
    residual: torch.Tensor | None,
    distance: torch.Tensor,
    share: float,
    scales: tuple[float, float, float, float],
    gate: bool = False,
) -> torch.Tensor:
    """``(1 - share) * residual' + share * distance'``, each map put on the good images' scale first.

    ``gate`` (the ``gated`` blend) clips ``residual'`` at 0: below its good images' 0.90
    quantile the residual adds nothing, so it no longer adds its noise to the many good
    cells, only evidence where it is high. On Magnetic Tile's ``mt_val`` this (at share 0.8)
    scored above the memory alone on all three metrics, which no plain share did
    (research/results/blend_val_default.json).
    """
    r_off, r_scale, d_off, d_scale = scales
    dist = (distance - d_off) / d_scale
    if residual is None or share >= 1.0:
        return dist
    res = (residual - r_off) / r_scale
    if gate:
        res = res.clamp_min(0.0)
    return (1.0 - share) * res + share * dist


class MapPipeline(nn.Module):
    """Images (N, 3, S, S) in [0, 1] at the model input size -> (maps (N, S, S), scores (N,)).

    Stages, each callable on its own: :meth:`features` (standardised grid), :meth:`residual`,
    :meth:`distances`, :meth:`grid_pair` (or :meth:`grid_maps`), :meth:`postprocess`.

    Two maps, one pass: the image score comes from the *score map* (``infer.residual``,
    ``infer.blend``) and the returned pixel map from the *pixel map* (``infer.pixel_residual``,
    ``infer.pixel_blend``), both at the share ``infer.memory``, from one transformer call and
    one bank search. Why: on Magnetic Tile's ``mt_val`` the plain squared error localises
    defects best and ``mse_cos`` ranks images best (research/results/pixel_map_val.json), so
    each output takes the one that serves it. With ``same`` for both (or the memory alone)
    the two maps are one.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        model: STMAE | None,
        stats: FeatureStats,
        splits: torch.Tensor,
        infer: InferConfig,
        image_size: int,
        memory: PatchMemory | None = None,
        residual_stats: ResidualStats | None = None,
    ) -> None:
        super().__init__()
        if infer.memory > 0 and memory is None:
            raise ValueError(
                f"infer.memory is {infer.memory} but there is no memory bank; fit one on good training "
                "features (stmae fit does this), or set infer.memory to 0"
            )
        if model is None and infer.memory < 1:
            raise ValueError("a pipeline without a transformer scores by the memory alone: set infer.memory to 1")
        if infer.residual == "mahalanobis" and residual_stats is None and infer.memory < 1:
            raise ValueError(
                "infer.residual is 'mahalanobis' but there are no residual statistics; fit them on good "
                "training features (stmae fit does this)"
            )
        self.extractor = extractor.eval()
        self.model = model.eval() if model is not None else None
        self.image_size = int(image_size)
        self.infer = dataclasses.replace(infer)  # a private copy: the pipeline never changes under its owner
        self.num_pairs = int(splits.shape[0])
        self.register_buffer("feat_mean", stats.mean.float().view(1, -1, 1, 1).clone())
        self.register_buffer("feat_std", stats.std.float().view(1, -1, 1, 1).clone())
        self.register_buffer("splits", splits.long().clone())
        if residual_stats is not None:
            self.register_buffer("res_mean", residual_stats.mean.float().view(1, -1, 1, 1).clone())
            self.register_buffer("res_precision", residual_stats.precision.float().clone())
        self.pixel_residual = infer.residual if infer.pixel_residual == "same" else infer.pixel_residual
        self.pixel_blend = infer.blend if infer.pixel_blend == "same" else infer.pixel_blend
        share = infer.memory
        #: True when the pixel map is not the score map (see the class docstring).
        self.split_maps = share < 1.0 and (
            self.pixel_residual != infer.residual or (share > 0.0 and self.pixel_blend != infer.blend)
        )
        if memory is not None:
            bank = memory.bank.float()
            self.register_buffer("bank", bank.clone())
            self.register_buffer("bank_sq", (bank * bank).sum(dim=1))
            self.scales = blend_scales(memory, infer.blend)
            if self.split_maps and share > 0.0:
                self.pixel_scales = blend_scales(memory, self.pixel_blend, pixel=self.pixel_residual != infer.residual)
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def build(
        cls,
        extractor: FeatureExtractor,
        model: STMAE,
        stats: FeatureStats,
        config: "Config",
        memory: PatchMemory | None = None,
        residual_stats: ResidualStats | None = None,
    ) -> "MapPipeline":
        """The pipeline ``config`` describes: its K fixed test-time split pairs (seeded) included."""
        splits = complementary_splits(
            model.num_tokens, config.infer.num_pairs, seed=config.train.seed, block=config.model.split_block
        )
        return cls(extractor, model, stats, splits, config.infer, config.features.image_size, memory, residual_stats)

    @classmethod
    def knn(cls, extractor: FeatureExtractor, stats: FeatureStats, bank: torch.Tensor, config: "Config") -> "MapPipeline":
        """The kNN yardstick: the same recipe scored by the distance to ``bank`` alone (no transformer)."""
        infer = dataclasses.replace(config.infer, memory=1.0, blend="median")  # raw distances: scale 1
        memory = PatchMemory(bank, 1.0, 1.0)
        return cls(extractor, None, stats, torch.zeros(0, 2, 1, dtype=torch.long), infer, config.features.image_size, memory)

    # ------------------------------------------------------------------ stages
    def _autocast(self, x: torch.Tensor, on_cuda: bool) -> torch.autocast:
        """bf16 autocast where ``infer.precision`` is bf16; on CUDA also when ``on_cuda`` (the
        transformer, which always runs in bf16 there)."""
        bf16 = self.infer.precision == "bf16"
        if x.is_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda or bf16)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) in [0, 1] -> standardised features (N, C, G, G)."""
        with self._autocast(images, on_cuda=False):
            feats = self.extractor(images)
        return self.standardize(feats)

    def standardize(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw cached features -> standardised (training statistics)."""
        return (feats.float() - self.feat_mean) / self.feat_std

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised features (N, C, G, G) -> mean residual over the K split pairs (N, G, G).

        The score map's residual (``infer.residual``). One transformer call on K x N
        sequences: pair k of image i is row k * N + i.
        """
        recon, xs = self.reconstructions(x)
        return self._mean_residual(recon, xs, self.infer.residual, x.shape[0])

    def residuals(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score residual, pixel residual), each (N, G, G), from one transformer call; the
        same tensor twice when the pixel map reads the score's residual."""
        recon, xs = self.reconstructions(x)
        score = self._mean_residual(recon, xs, self.infer.residual, x.shape[0])
        if self.pixel_residual == self.infer.residual:
            return score, score
        return score, self._mean_residual(recon, xs, self.pixel_residual, x.shape[0])

    def _mean_residual(self, recon: torch.Tensor, xs: torch.Tensor, kind: str, n: int) -> torch.Tensor:
        """(K * N, C, G, G) reconstructions and inputs -> the ``kind`` residual averaged over the K pairs."""
        if kind == "mahalanobis":
            d = (recon - xs) - self.res_mean
            pd = torch.einsum("cd,ndhw->nchw", self.res_precision, d)
            res = (d * pd).sum(dim=1).clamp_min(0.0)
        else:
            res = feature_residual(recon, xs, kind)
        return res.view(self.num_pairs, n, *res.shape[1:]).mean(dim=0)

    def reconstructions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features (N, C, G, G) -> (reconstructions, inputs), both (K * N, C, G, G).

        Pair k of image i is row k * N + i. Autocast (bf16 on CUDA) covers the transformer
        only (and on the CPU only with ``infer.precision`` bf16); the residual is computed in float32.
        """
        n, k = x.shape[0], self.num_pairs
        xs = x.repeat(k, 1, 1, 1)
        splits = self.splits.repeat_interleave(n, dim=0)
        with self._autocast(x, on_cuda=True):
            recon = self.model(xs, splits)
        return recon.float(), xs

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised features (N, C, G, G) -> distance to the nearest bank patch (N, G, G).

        On a CPU with fast bf16 the exact :class:`~stmae.model.memory.BankSearch` runs (built
        once per bank); under export, and elsewhere, the float32 blocked search, whose
        products run in TF32 on CUDA with ``infer.precision`` bf16.
        """
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        if tracing():
            return nearest_distances(rows, self.bank, self.bank_sq).view(n, h, w)
        tf32 = self.infer.precision == "bf16"
        return search_bank(self, rows, self.bank, self.bank_sq, tf32=tf32).view(n, h, w)

    def grid_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features -> (pixel map, score map) on the grid, each (N, G, G).

        Each is the residual, the distance or their blend at the share ``infer.memory``; one
        transformer call and one bank search serve both. The same tensor twice where the two
        maps are one (:attr:`split_maps` False).
        """
        share = self.infer.memory
        if share >= 1.0:
            dist = blend(None, self.distances(x), 1.0, self.scales)
            return dist, dist
        score_res, pixel_res = self.residuals(x)
        if share <= 0.0:
            return pixel_res, score_res
        dist = self.distances(x)
        score = blend(score_res, dist, share, self.scales, gate=self.infer.blend == "gated")
        if not self.split_maps:
            return score, score
        pixel = blend(pixel_res, dist, share, self.pixel_scales, gate=self.pixel_blend == "gated")
        return pixel, score

    def grid_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised features -> the pixel map on the grid (N, G, G) (:meth:`grid_pair`)."""
        return self.grid_pair(x)[0]

    def postprocess(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid maps (N, G, G) -> (maps (N, S, S) at the input size, scores (N,)) (:func:`postprocess`)."""
        return postprocess(grid, self.infer, self.image_size)

    def postprocess_pair(self, pixel: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel map, score map) on the grid -> (the pixel map at the input size, the score map's image scores)."""
        maps, scores = self.postprocess(pixel)
        if score is not pixel:
            scores = self.postprocess(score)[1]
        return maps, scores

    def score_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw cached features (N, C, G, G) -> (maps, scores): the recipe after the backbone."""
        return self.postprocess_pair(*self.grid_pair(self.standardize(feats)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.postprocess_pair(*self.grid_pair(self.features(images)))


__all__ = [
    "MapPipeline", "blend", "blend_scales", "gaussian_blur", "image_scores", "postprocess", "reference_postprocess",
]
