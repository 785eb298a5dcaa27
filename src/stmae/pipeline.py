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
- with ``infer.distance_weight == 1`` the transformer is skipped: the map is the distance alone;
- every tensor it needs is a buffer, so it moves with ``.to(device)`` and exports as
  constants; the threshold is *not* in it (thresholds are data, :mod:`stmae.thresholds`).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import InferConfig
from .features import FeatureExtractor, FeatureStats
from .mapops import blur_operator, blur_radius, resize_operator
from .model import STMAE, PatchMemory, ResidualStats, complementary_splits, feature_residual, random_splits
from .model.decoupling import SplitDrawer
from .thresholds import Calibration

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
    which a CUDA graph could not capture (research code: stmae_research.cuda_graphs)."""
    return _post_operator(grid, image_size, sigma).to(device, dtype)


def postprocess(grid: torch.Tensor, infer: InferConfig, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid maps (N, H, W) -> (maps (N, S, S) at the input size, scores (N,)).

    Bilinear upsampling, Gaussian smoothing, then the image score: the end of every map
    recipe in the project (ST-MAE's and the kNN yardstick's). Both steps are linear and
    separable, so they run as ``A_H @ grid @ A_W.T`` with one (S, H) and one (S, W) matrix
    (built in numpy, constants in an exported graph): 0.1 ms at 256 px instead of 2 ms for
    an upsampled map and two padded convolutions, equal to that path within float32
    rounding (``tests/test_pipeline.py`` holds the step-by-step reference).
    """
    h, w = int(grid.shape[-2]), int(grid.shape[-1])
    op_h, op_w = (_post_operator_on(n, int(image_size), float(infer.sigma), grid.device, grid.dtype) for n in (h, w))
    maps = torch.matmul(torch.matmul(op_h, grid), op_w.T)
    return maps, image_scores(maps, infer.score, infer.topk)


def blend_scales(memory: PatchMemory, mode: str, pixel: bool = False) -> tuple[torch.Tensor, ...]:
    """(residual offset, residual scale, distance offset, distance scale) for :func:`blend`,
    as 0-d tensors read from the memory's buffers at every call (nothing to go stale).

    ``median``: each map divided by its median over held-out good images' grid cells.
    ``quantile``: each map mapped so that the 0.90 quantile of those cells is 0 and the
    0.995 quantile is 1 (``stmae.model.memory.BLEND_QUANTILES``): the two maps then agree on
    what a high value on a good image is, not only on a typical one.
    ``gated``: the same scales; :func:`blend` then also clips the residual at 0.
    ``pixel``: the residual is the pixel map's own (``infer.pixel_residual``), with its own scale.
    """
    medians, ranges = memory.medians, memory.ranges
    if pixel:
        if memory.pixel_residual is None:
            raise ValueError(
                "infer.pixel_residual differs from infer.residual but this memory bank was calibrated "
                "for one map (fitted with pixel_residual 'same'); refit, or set infer.pixel_residual "
                "and infer.pixel_blend to 'same'"
            )
        r_median, r_lo, r_hi = memory.pixel_residual.unbind()
    else:
        r_median = medians[0]
        r_lo, r_hi = (None, None) if ranges is None else (ranges[0], ranges[1])
    if mode == "median":
        zero = medians.new_zeros(())
        return zero, r_median, zero, medians[1]
    if ranges is None or r_lo is None:
        raise ValueError(
            f"infer.blend is {mode!r} but this memory bank has no quantile ranges (not calibrated); "
            "calibrate it on held-out good images, or set infer.blend to median"
        )
    return r_lo, r_hi - r_lo, ranges[2], ranges[3] - ranges[2]


def blend(
    residual: torch.Tensor | None,
    distance: torch.Tensor,
    share: float,
    scales: tuple[torch.Tensor, ...],
    gate: bool = False,
) -> torch.Tensor:
    """``(1 - share) * residual' + share * distance'``, each map put on the good images' scale first.

    ``gate`` (the ``gated`` blend) clips ``residual'`` at 0: below its good images' 0.90
    quantile the residual adds nothing, so it no longer adds its noise to the many good
    cells, only evidence where it is high: on real defects this beat the memory alone where
    no plain share did (docs/research.md, "Real-defect validation").
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
    """The fitted scoring module: images (N, 3, S, S) in [0, 1] at the model input size ->
    (maps (N, S, S), scores (N,)).

    It holds every fitted part, once: the frozen ``extractor``, the transformer ``model``,
    the ``feature_stats``, the ``residual_stats`` (Mahalanobis), the ``memory`` (bank and
    blend statistics) as submodules whose tensors are buffers, and the ``calibration``
    (thresholds are data: they are not in the graph an export traces). Its
    :meth:`fitted_state` is the run folder's weights file, key for key. Nothing is copied
    out of these parts: a blend scale or a bank changed in place is what the next call
    reads, and the bank search follows a bank's version.

    ``config`` is shared with the owner (a :class:`~stmae.infer.Detector`), and the
    predict-time settings (``config.infer``: K, the residual, the blend, smoothing, the
    score) are read at every call; the K split pairs are derived from them and cached.

    Stages, each callable on its own: :meth:`features` (standardised grid), :meth:`residual`,
    :meth:`distances`, :meth:`grid_pair` (or :meth:`grid_maps`), :meth:`postprocess`.

    Two maps, one pass: the image score comes from the *score map* (``infer.residual``,
    ``infer.blend``) and the returned pixel map from the *pixel map* (``infer.pixel_residual``,
    ``infer.pixel_blend``), both at the weight ``infer.distance_weight``, from one transformer call and
    one bank search (docs/design.md, "Two maps from one pass"). With ``same`` for both (or
    the memory alone) the two maps are one.
    """

    feature_stats: FeatureStats
    residual_stats: ResidualStats | None
    memory: PatchMemory | None

    def __init__(
        self,
        extractor: FeatureExtractor,
        model: STMAE | None,
        stats: FeatureStats,
        config: "Config",
        memory: PatchMemory | None = None,
        residual_stats: ResidualStats | None = None,
        calibration: Calibration | None = None,
        *,
        check: bool = True,
    ) -> None:
        super().__init__()
        self.extractor = extractor.eval()
        self.register_module("model", model.eval() if model is not None else None)
        self.feature_stats = stats
        self.register_module("residual_stats", residual_stats)
        self.register_module("memory", memory)
        self.config = config
        self.calibration = calibration
        self._splits: dict[tuple, torch.Tensor] = {}
        #: How the K test-time pairs are drawn (:data:`stmae.model.decoupling.SplitDrawer`):
        #: per token, as in training; a study of other splits sets its own drawer here.
        self.draw_splits: SplitDrawer = random_splits
        for p in self.parameters():
            p.requires_grad_(False)
        if check:  # off while fitting: the parts are filled in afterwards (stmae.fitting)
            self.check()

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
        """The pipeline ``config`` describes (kept for callers of the earlier constructor)."""
        return cls(extractor, model, stats, config, memory, residual_stats)

    # ------------------------------------------------------------------ settings
    @property
    def infer(self) -> InferConfig:
        """The predict-time settings, read live from the shared config."""
        return self.config.infer

    @property
    def image_size(self) -> int:
        return int(self.config.features.image_size)

    @property
    def pixel_residual(self) -> str:
        i = self.infer
        return i.residual if i.pixel_residual == "same" else i.pixel_residual

    @property
    def pixel_blend(self) -> str:
        i = self.infer
        return i.blend if i.pixel_blend == "same" else i.pixel_blend

    @property
    def split_maps(self) -> bool:
        """True when the pixel map is not the score map (see the class docstring)."""
        i, share = self.infer, self.infer.distance_weight
        return share < 1.0 and (self.pixel_residual != i.residual or (share > 0.0 and self.pixel_blend != i.blend))

    @property
    def num_pairs(self) -> int:
        return int(self.splits.shape[0])

    @property
    def splits(self) -> torch.Tensor:
        """The K fixed test-time split pairs (K, 2, L/2), seeded by the run's seed."""
        if self.model is None:
            return torch.zeros(0, 2, 1, dtype=torch.long)
        c, device = self.config, self.feature_stats.mean.device
        key = (c.infer.num_pairs, c.train.seed, self.draw_splits, self.model.num_tokens, device)
        if key not in self._splits:
            self._splits[key] = complementary_splits(
                self.model.num_tokens, c.infer.num_pairs, seed=c.train.seed, draw=self.draw_splits
            ).to(device)
        return self._splits[key]

    def check(self) -> None:
        """Refuse settings the fitted parts cannot score (ValueError saying what is missing)."""
        i = self.infer
        if i.distance_weight > 0 and self.memory is None:
            raise ValueError(
                f"infer.distance_weight is {i.distance_weight} but there is no memory bank; fit one on good training "
                "features (stmae fit does this), or set infer.distance_weight to 0"
            )
        if self.model is None and i.distance_weight < 1:
            raise ValueError("a pipeline without a transformer scores by the memory alone: set infer.distance_weight to 1")
        if i.residual == "mahalanobis" and self.residual_stats is None and i.distance_weight < 1:
            raise ValueError(
                "infer.residual is 'mahalanobis' but there are no residual statistics; fit them on good "
                "training features (stmae fit does this)"
            )

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """Every fitted tensor (the extractor's frozen weights excluded: they come from the
        backbone), on the CPU: the run folder's ``model.safetensors``."""
        return {
            k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("extractor.")
        }

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
        return self.feature_stats.apply(feats.float())

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
        res = feature_residual(recon, xs, kind, self.residual_stats)
        return res.view(-1, n, *res.shape[1:]).mean(dim=0)

    def reconstructions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features (N, C, G, G) -> (reconstructions, inputs), both (K * N, C, G, G).

        Pair k of image i is row k * N + i. Autocast (bf16 on CUDA) covers the transformer
        only (and on the CPU only with ``infer.precision`` bf16); the residual is computed in float32.
        """
        n, pairs = x.shape[0], self.splits
        xs = x.repeat(pairs.shape[0], 1, 1, 1)
        splits = pairs.repeat_interleave(n, dim=0)
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
        return self.memory.search(rows, tf32=self.infer.precision == "bf16").view(n, h, w)

    def grid_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features -> (pixel map, score map) on the grid, each (N, G, G).

        Each is the residual, the distance or their blend at the weight ``infer.distance_weight``; one
        transformer call and one bank search serve both. The same tensor twice where the two
        maps are one (:attr:`split_maps` False).
        """
        self.check()
        share, infer = self.infer.distance_weight, self.infer
        if share >= 1.0:
            dist = blend(None, self.distances(x), 1.0, blend_scales(self.memory, infer.blend))
            return dist, dist
        score_res, pixel_res = self.residuals(x)
        if share <= 0.0:
            return pixel_res, score_res
        dist = self.distances(x)
        score = blend(score_res, dist, share, blend_scales(self.memory, infer.blend), gate=infer.blend == "gated")
        if not self.split_maps:
            return score, score
        pixel_scales = blend_scales(self.memory, self.pixel_blend, pixel=self.pixel_residual != infer.residual)
        pixel = blend(pixel_res, dist, share, pixel_scales, gate=self.pixel_blend == "gated")
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

    def score_cached(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw cached features (N, C, G, G), on any device -> (maps, scores) on the CPU, in
        chunks of ``infer.batch_size``."""
        device, maps, scores = self.feature_stats.mean.device, [], []
        with torch.inference_mode():
            for chunk in torch.split(feats, self.infer.batch_size):
                m, s = self.score_features(chunk.to(device))
                maps.append(m.cpu())
                scores.append(s.cpu())
        return torch.cat(maps), torch.cat(scores)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.postprocess_pair(*self.grid_pair(self.features(images)))


__all__ = [
    "MapPipeline", "blend", "blend_scales", "gaussian_blur", "image_scores", "postprocess",
]
