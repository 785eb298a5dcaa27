"""Stage-by-stage scoring of a fitted Detector, for experiments that look inside the recipe.

Why here: a user scores images (``Detector.predict``); experiments score cached features
and grid maps, stage by stage. These are thin calls into the detector's own
:class:`stmae.pipeline.MapPipeline`, so what an experiment measures is the package's scoring.
"""

from __future__ import annotations

import torch

from stmae.infer import Detector


def grid_maps(det: Detector, feats: torch.Tensor) -> torch.Tensor:
    """Standardised features (N, C, G, G) -> the pixel maps on the grid (N, G, G)."""
    with torch.no_grad():
        return det.pipeline.grid_maps(feats.to(det.device))


def postprocess(det: Detector, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid maps (N, G, G) -> (maps (N, S, S) at the input size, scores (N,))."""
    with torch.no_grad():
        return det.pipeline.postprocess(grid)


def score_features(det: Detector, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unstandardised) cached features -> (maps (N, S, S), scores (N,)) on CPU."""
    return det.pipeline.score_cached(feats)


def score_tensor(det: Detector, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, S, S) in [0, 1] at the input size -> (maps, scores) on CPU."""
    with torch.inference_mode():
        maps, scores = det.pipeline(images.to(det.device))
    return maps.cpu(), scores.cpu()


__all__ = ["grid_maps", "postprocess", "score_features", "score_tensor"]
