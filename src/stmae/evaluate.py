"""Scoring a labelled test split: metrics, per-defect-type breakdown, per-image records.

Protocol (what ``stmae test`` and the demo report): all metrics are threshold-free,
computed on raw scores over the whole test split. Pixel metrics are computed at one of two
sizes (``eval_size``):

- ``model``: masks resized (nearest) to the map's size (S x S for a squeezing run, the
  scaled image for a tiled one, :mod:`stmae.geometry`), against the maps: the usual
  benchmark protocol, cheap, but a resize deletes thin defects from the masks it scores
  against;
- ``native``: each map resized (bilinear, as ``predict`` makes its full-size maps) to the
  mask's own size, so what the squeeze deleted still counts.

The default (``eval_size=None``) is ``model`` for a run that squeezes its images
(``features.geometry: resize``) and ``native`` for one that tiles or keeps the aspect ratio.

Pixel metrics are streamed image by image (:class:`stmae.metrics.PixelMetricAccumulator`)
so the maps of a large test set are never all held in memory; only the maps of the images
picked for the report are kept. Where the test set has more pixels than ``pixel_budget``,
normal pixels are kept at one seeded rate that fits it (every defect pixel is kept), which
leaves pixel AUROC and AUPRO unbiased.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .data import AnomalyDataset, DataError, Sample, resize_image, resize_mask
from .data.io import UnreadableImageError, image_size
from .mapops import resize_map
from .features import batched
from .geometry import Geometry
from .infer import Detector
from .metrics import PixelMetricAccumulator, auroc, average_precision, compute_metrics


#: ``on_image(index into dataset.test, score, anomaly map, mask or None)``: the map and mask
#: the pixel metrics used (the map's size at ``eval_size="model"``, the mask's own size at ``"native"``).
ImageHook = Callable[[int, float, np.ndarray, "np.ndarray | None"], None]

#: Where pixel metrics are computed: the model input size, or each mask's own size.
EVAL_SIZES = ("model", "native")
#: At most this many pixels are held for the pixel metrics (8 bytes each: 2 GB); beyond it
#: normal pixels are subsampled at one seeded rate. None: keep all.
PIXEL_BUDGET = 250_000_000


@dataclass
class Evaluation:
    """Everything ``stmae test`` writes.

    metrics: image_auroc, image_ap, image_f1max, pixel_auroc, pixel_ap, pixel_f1max, aupro,
        ... (pixel values None when the dataset has no masks).
    per_type: defect type -> {n, mean_score, image_auroc, image_ap (vs. the good images), detected}.
    records: one dict per scored test image (name, defect_type, label, score, predicted).
    examples: record index -> (image uint8 (S,S,3), map float32 (S,S), mask bool (S,S) | None)
        for the images chosen for the report.
    skipped: ``(file, reason)`` for every test image left out because it or its mask could
        not be read (only with ``skip_unreadable``); metrics cover the other images.
    eval_size: where the pixel metrics were computed (``"model"`` or ``"native"``).
    pixel_fraction: share of the normal pixels the pixel metrics kept (1.0: all, exact).
    """

    metrics: dict[str, Any]
    per_type: dict[str, dict[str, Any]]
    records: list[dict[str, Any]]
    threshold: float | None
    examples: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    eval_size: str = "model"
    pixel_fraction: float = 1.0


def pick_examples(samples: Sequence[Sample], per_type: int) -> set[int]:
    """The first ``per_type`` test images of each defect type (deterministic)."""
    chosen: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        bucket = chosen.setdefault(s.defect_type, [])
        if len(bucket) < per_type:
            bucket.append(i)
    return {i for idx in chosen.values() for i in idx}


def evaluate(
    detector: Detector,
    dataset: AnomalyDataset,
    *,
    examples_per_type: int = 0,
    quiet: bool = False,
    skip_unreadable: bool = False,
    on_image: ImageHook | None = None,
    eval_size: str | None = None,
    pixel_budget: int | None = PIXEL_BUDGET,
) -> Evaluation:
    """Score ``dataset.test`` with ``detector`` and compute all metrics.

    ``on_image(index, score, anomaly_map, mask)`` is called for every scored test image
    (``index`` into ``dataset.test``; ``mask`` None without masks), from the same pass: a
    caller that needs more than these metrics (maps saved elsewhere, metrics of parts of the
    split) gets them without scoring twice. The maps are not kept here.

    With ``skip_unreadable``, a test image whose file or mask cannot be read (a
    :class:`~stmae.data.DataError`: empty, truncated, not an image, over the pixel limit,
    mask of the wrong size) is left out and listed in ``Evaluation.skipped`` instead of
    stopping the evaluation; without it the first such file raises, naming it.

    ``eval_size``: ``"model"``, ``"native"`` or None for the run's default (module docstring); ``pixel_budget``: the most
    pixels held for the pixel metrics (``Evaluation.pixel_fraction`` says which share of the
    normal pixels was kept; 1.0 = exact).

    Raises:
        DataError: an unreadable file (without ``skip_unreadable``), or no readable test image.
        ValueError: an unknown ``eval_size`` or a ``pixel_budget`` below 1.
    """
    samples = dataset.test
    if not samples:
        raise ValueError(f"{dataset.root or dataset.name}: the test split is empty; nothing to evaluate")
    geometry = detector.geometry
    if eval_size is None:
        eval_size = default_eval_size(geometry)
    if eval_size not in EVAL_SIZES:
        raise ValueError(f"eval_size must be one of {EVAL_SIZES}, got {eval_size!r}")
    if pixel_budget is not None and pixel_budget < 1:
        raise ValueError(f"pixel_budget must be >= 1 (or None: keep every pixel), got {pixel_budget}")
    native = eval_size == "native"
    fraction = 1.0
    if dataset.has_masks and pixel_budget is not None:
        total = sum(_pixels(s, None if native else geometry) for s in samples)
        fraction = min(1.0, pixel_budget / max(total, 1))
    seed = detector.config.train.seed
    pixel = PixelMetricAccumulator(normal_fraction=fraction, seed=seed) if dataset.has_masks else None
    keep = pick_examples(samples, examples_per_type)
    scored: list[Sample] = []
    scores: list[float] = []
    skipped: list[tuple[str, str]] = []
    examples: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    bs = detector.config.infer.batch_size
    with tqdm(total=len(samples), desc="test", unit="img", disable=quiet, leave=False) as bar:
        for chunk in batched(list(range(len(samples))), bs):
            loaded = []  # (sample index, image, mask) of the readable samples of this chunk
            for i in chunk:
                try:
                    image = samples[i].load_image(reduce_to=geometry.reduce_to)
                    full = None
                    if pixel or i in keep:
                        full = samples[i].load_mask()
                        if full is None:
                            full = np.zeros(native_shape(samples[i]), dtype=bool)
                except DataError as exc:
                    if not skip_unreadable:
                        raise
                    skipped.append(_skip_entry(samples[i], exc))
                    continue
                loaded.append((i, image, full))
            if loaded:
                maps, batch_scores = detector.score_images([image for _, image, _ in loaded])
                for j, (i, image, full) in enumerate(loaded):
                    amap = maps[j]
                    # the mask at the map's size (nearest), as the model-size protocol scores it
                    mask = None if full is None else resize_mask(full, amap.shape)
                    used_map, used_mask = (resize_map(amap, full.shape), full) if native and full is not None else (amap, mask)
                    if pixel is not None:
                        pixel.update(used_mask, used_map)
                    if on_image is not None:
                        on_image(i, float(batch_scores[j]), used_map, used_mask)
                    if i in keep:
                        examples[len(scored)] = (resize_image(image, amap.shape), amap, mask)
                    scored.append(samples[i])
                    scores.append(float(batch_scores[j]))
            bar.update(len(chunk))
    if not scored:
        raise DataError(
            f"{dataset.root or dataset.name}: none of the {len(samples)} test images could be read "
            f"(first: {skipped[0][0]}: {skipped[0][1]})"
        )
    score_array = np.asarray(scores, dtype=np.float64)
    labels = np.array([s.label for s in scored])
    metrics = compute_metrics(labels, score_array)
    if pixel is not None:
        metrics.update(pixel.result())
    metrics["n_images"] = len(scored)
    metrics["n_anomalous"] = int(labels.sum())
    metrics["n_good"] = int(len(labels) - labels.sum())
    threshold = detector.threshold
    records = [
        {
            "name": s.name or (str(s.path) if s.path else str(i)),
            "defect_type": s.defect_type,
            "label": s.label,
            "score": scores[i],
            "predicted": None if threshold is None else int(scores[i] > threshold),
        }
        for i, s in enumerate(scored)
    ]
    per_type = per_type_breakdown(scored, score_array, threshold)
    return Evaluation(metrics, per_type, records, threshold, examples, skipped, eval_size, fraction)


def _skip_entry(sample: Sample, exc: DataError) -> tuple[str, str]:
    """``(file, reason)`` for ``skipped.csv``: the file that failed (image or mask) and why."""
    if isinstance(exc, UnreadableImageError):
        return exc.file, exc.reason
    return str(sample.path or sample.display_name), str(exc)


def native_shape(sample: Sample) -> tuple[int, int]:
    """(height, width) of the sample's image as decoded at full size, without decoding it."""
    if sample.path is not None:
        return image_size(sample.path)
    assert sample.array is not None
    return (int(sample.array.shape[0]), int(sample.array.shape[1]))


def default_eval_size(geometry: Geometry) -> str:
    """``native`` for a run that tiles or keeps the aspect ratio, ``model`` for one that squeezes."""
    return "native" if geometry.tiled else "model"


def _pixels(sample: Sample, geometry: Geometry | None = None) -> int:
    """Pixels of the sample's map (``geometry``) or at full size (None); 0 when its header
    cannot be read (it is skipped later)."""
    try:
        h, w = native_shape(sample)
    except (DataError, OSError):
        return 0
    if geometry is not None:
        h, w = geometry.map_shape(h, w)
    return h * w


def mask_at(sample: Sample, size: int | tuple[int, int]) -> np.ndarray:
    """The sample's mask at ``size`` (an int side or (h, w); nearest); all-False for images without one."""
    mask = sample.load_mask()
    if mask is None:
        return np.zeros((size, size) if isinstance(size, int) else tuple(size), dtype=bool)
    return resize_mask(mask, size)


def per_type_breakdown(
    samples: Sequence[Sample], scores: np.ndarray, threshold: float | None
) -> dict[str, dict[str, Any]]:
    """Per defect type: count, mean score, detection rate at the threshold, and image AUROC/AP
    of that type against the good test images (None where there are no good images)."""
    types = sorted({s.defect_type for s in samples})
    good = np.array([s.label == 0 for s in samples])
    out: dict[str, dict[str, Any]] = {}
    for t in types:
        sel = np.array([s.defect_type == t for s in samples])
        row: dict[str, Any] = {"n": int(sel.sum()), "mean_score": float(scores[sel].mean())}
        if threshold is not None:
            row["flagged_rate"] = float((scores[sel] > threshold).mean())
        is_anomalous_type = not good[sel].any()
        if is_anomalous_type and good.any():
            both = sel | good
            labels = sel[both].astype(int)
            row["image_auroc"] = auroc(labels, scores[both])
            row["image_ap"] = average_precision(labels, scores[both])
        out[t] = row
    return out
