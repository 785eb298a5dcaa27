"""Research protocols: real-defect halves, metrics of parts of a test split, each term alone.

Why outside the package: these serve choosing and reporting the defaults (docs/research.md,
docs/results.md), not a user's inspection job. They reuse the package's own scoring through
its hooks (``stmae.evaluate``'s ``on_image``, ``stmae.protocols.oneclass``'s ``columns``), so
what they report is what the package computes, from the same pass.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from stmae.data import AnomalyDataset
from stmae.infer import Detector
from stmae.evaluate import Evaluation, evaluate
from stmae.metrics import PixelMetricAccumulator, compute_metrics
from stmae.train import FitResult

#: The two halves of a real-defect test split: settings are chosen on the first and
#: figures reported on the second (docs/research.md, "Real-defect validation").
HALVES = ("mt_val", "mt_test")


def real_defect_indices(samples: Sequence[Any], seed: int = 0) -> dict[str, list[int]]:
    """Indices of the two halves of :func:`split_real_defects` (``mt_val``, ``mt_test``), in input order."""
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_type.setdefault(s.defect_type, []).append(i)
    val: set[int] = set()
    for t in sorted(by_type):
        idx = by_type[t]
        order = rng.permutation(len(idx))
        val.update(idx[j] for j in order[: (len(idx) + 1) // 2])
    return {
        HALVES[0]: [i for i in range(len(samples)) if i in val],
        HALVES[1]: [i for i in range(len(samples)) if i not in val],
    }


def split_real_defects(samples: Sequence[Any], seed: int = 0) -> dict[str, list[Any]]:
    """A labelled test split cut into two seeded halves, ``mt_val`` and ``mt_test``.

    Why: settings chosen on painted defects did not hold on real ones; choosing them on real
    defects needs real defects the final figures never see. Each defect type (``good``
    included) is shuffled with ``seed`` and its first ceil(n / 2) images go to ``mt_val``,
    so both halves hold every type in the same proportions. Order within a half follows the
    input order.
    """
    return {name: [samples[i] for i in idx] for name, idx in real_defect_indices(samples, seed).items()}


def evaluate_with_subsets(
    detector: Detector, dataset: AnomalyDataset, subsets: Mapping[str, Sequence[int]], **kwargs: Any
) -> tuple[Evaluation, dict[str, dict[str, Any]]]:
    """:func:`stmae.evaluate` plus the same metrics over each subset of the test split.

    ``subsets``: name -> indices into ``dataset.test`` (e.g. :func:`real_defect_indices`).
    One scoring pass: each subset's image metrics come from the scored images' scores and its
    pixel metrics from their maps, as they stream past (``on_image``).
    """
    members = {name: {int(i) for i in idx} for name, idx in subsets.items()}
    parts = {name: PixelMetricAccumulator() for name in members} if dataset.has_masks else {}
    seen: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in members}

    def on_image(index: int, score: float, amap: np.ndarray, mask: np.ndarray | None) -> None:
        for name, member in members.items():
            if index in member:
                if name in parts:
                    parts[name].update(mask, amap)
                seen[name][0].append(dataset.test[index].label)
                seen[name][1].append(score)

    evaluation = evaluate(detector, dataset, on_image=on_image, **kwargs)
    out = {}
    for name in members:
        labels, scores = np.array(seen[name][0]), np.asarray(seen[name][1], dtype=np.float64)
        if not len(labels):
            raise ValueError(f"subset {name!r}: none of its images was scored")
        m = compute_metrics(labels, scores)
        if name in parts:
            m.update(parts[name].result())
        m.update(n_images=len(labels), n_anomalous=int(labels.sum()), n_good=int((labels == 0).sum()))
        out[name] = m
    return evaluation, out


def each_term_alone(fitted: FitResult, test_feats: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Columns for :func:`stmae.protocols.oneclass` (``columns=``): the image AUROC of a
    blended model scored by the residual alone and by the memory alone (``infer.distance_weight`` 0
    and 1; no second training): what the blend adds on this data. No columns where the
    config does not blend.
    """
    detector = fitted.detector
    share = detector.config.infer.distance_weight
    if not 0.0 < share < 1.0:
        return {}
    out = {}
    try:
        for alone_share, term in ((0.0, "residual"), (1.0, "memory")):
            detector.config.infer.distance_weight = alone_share  # the pipeline reads its share at each call
            _, scores = detector.pipeline.score_cached(test_feats)
            out[f"image_auroc_{term}_alone"] = compute_metrics(labels, scores.numpy())["image_auroc"]
    finally:
        detector.config.infer.distance_weight = share
    return out


__all__ = ["HALVES", "each_term_alone", "evaluate_with_subsets", "real_defect_indices", "split_real_defects"]
