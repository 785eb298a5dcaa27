"""Evaluation metrics for anomaly detection: image-level and pixel-level.

Why it is built this way:

* Every threshold metric (AUROC, AP, F1-max, AUPRO) is a function of the cumulative
  true/false-positive counts at each *distinct* score, highest first. So the scores are
  sorted once and all four metrics are read off the same counts: one O(n log n) step for
  the 33M pixels of a typical test set instead of four, and ties are handled exactly the way
  scikit-learn (AUROC, AP) and the MVTec AD evaluation code (AUPRO) handle them — a tie
  group enters the curve as a single point.
* Pixel scores are stored as float32 and ground truth as int32 connected-region ids (0 =
  normal pixel), which halves memory compared with float64 and lets one array serve both
  as the pixel labels and as the per-region index for AUPRO.
* AUPRO follows the MVTec AD evaluation code (Bergmann et al.): regions are 8-connected
  components of each mask; the (FPR, PRO) curve starts at (0, 0), has one point per
  distinct score, ends at (1, 1), and is integrated with the trapezoid rule up to
  ``fpr_limit`` (interpolating the curve there) and divided by ``fpr_limit``. One
  difference: FPRs are float64 here (the reference casts them to float32), which can move
  the result in the 7th decimal.
* Undefined metrics: the public single-metric functions raise ``ValueError`` (AUROC needs
  both classes, AP and F1 need a positive) except :func:`aupro`, which returns NaN, like
  averaging over zero regions would. :func:`compute_metrics` and
  :class:`PixelMetricAccumulator` never raise for that: a level (image or pixel) whose
  ground truth lacks one class reports ``None`` for all its metrics, because an all-good
  test split is a normal thing to evaluate (e.g. while developing) and should not crash.

scikit-learn is deliberately not imported: it is only the reference in the tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = [
    "auroc",
    "average_precision",
    "f1_max",
    "aupro",
    "compute_metrics",
    "PixelMetricAccumulator",
]

#: 8-connectivity, as in the MVTec AD evaluation code: diagonal neighbours are one defect.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)

_IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1max", "image_f1_threshold")
_PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_f1_threshold", "aupro")

FloatArray = npt.NDArray[np.float64]
Metrics = dict[str, float | None]


# --------------------------------------------------------------------------------------
# The shared curve: cumulative counts at every distinct threshold
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Curve:
    """Cumulative counts for the classifiers "positive iff score >= thresholds[g]".

    Counts rather than rates are kept so AUROC, AP and F1 can all be derived from one
    sort. ``thresholds`` is strictly decreasing and its last entry is the lowest score,
    so the last point counts every sample (``tps[-1]`` = all positives, ``fps[-1]`` = all
    negatives). Counts are float64: exact for any realistic pixel count (< 2**53) and
    ready for the divisions that follow.
    """

    thresholds: npt.NDArray[np.floating]
    tps: FloatArray
    fps: FloatArray
    #: Per threshold, the sum over ground-truth regions of the fraction of the region that
    #: is detected; divided by ``n_regions`` this is the PRO value. Only for pixel curves.
    overlap: FloatArray | None = None
    n_regions: int = 0

    @property
    def n_pos(self) -> float:
        return float(self.tps[-1])

    @property
    def n_neg(self) -> float:
        return float(self.fps[-1])


def _group_ends(sorted_scores: np.ndarray) -> npt.NDArray[np.bool_]:
    """Mark the last position of every run of equal scores.

    No threshold can separate tied scores, so the curve only has a point after a whole
    tie group: this is what makes tie handling match scikit-learn and MVTec.
    """
    is_last = np.empty(sorted_scores.size, dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=is_last[:-1])
    is_last[-1] = True
    return is_last


def _counts_at_group_ends(
    sorted_positive: npt.NDArray[np.bool_], is_last: npt.NDArray[np.bool_]
) -> tuple[FloatArray, FloatArray]:
    """Cumulative (TP, FP) after each tie group, from labels in descending-score order."""
    tps = np.cumsum(sorted_positive, dtype=np.float64)[is_last]
    fps = np.flatnonzero(is_last).astype(np.float64)
    fps += 1.0  # samples up to and including the group end ...
    fps -= tps  # ... minus the positives among them
    return tps, fps


def _rank(scores: np.ndarray) -> tuple[npt.NDArray[np.intp], np.ndarray, npt.NDArray[np.bool_]]:
    """Sort scores from high to low: the single O(n log n) step all metrics share.

    Returns the sorting permutation, the distinct scores (descending: the curve's
    thresholds) and the tie-group-end mask over sorted positions. The order within tie
    groups is irrelevant because only group ends become curve points.
    """
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    is_last = _group_ends(sorted_scores)
    return order, sorted_scores[is_last], is_last


def _binary_curve(labels: npt.NDArray[np.bool_], scores: np.ndarray) -> _Curve:
    """Curve for plain (label, score) pairs, e.g. one score per image."""
    order, thresholds, is_last = _rank(scores)
    tps, fps = _counts_at_group_ends(labels[order], is_last)
    return _Curve(thresholds, tps, fps)


# --------------------------------------------------------------------------------------
# Metrics read off a curve
# --------------------------------------------------------------------------------------


def _rates_from_origin(counts: FloatArray, total: float) -> FloatArray:
    """``counts / total`` with a leading 0: the point for a threshold above every score.

    Written into one preallocated array because at pixel level these arrays have up to
    one entry per pixel and every temporary costs hundreds of MB.
    """
    rates = np.empty(counts.size + 1, dtype=np.float64)
    rates[0] = 0.0
    np.divide(counts, total, out=rates[1:])
    return rates


def _trapezoid(x: FloatArray, y: FloatArray, x_max: float | None = None) -> float:
    """Area under the polyline through (x, y), x non-decreasing, from x[0] to ``x_max``.

    With ``x_max`` the last segment is cut at ``x_max`` with y linearly interpolated there,
    exactly as ``trapezoid(x, y, x_max)`` in the MVTec AD evaluation code's
    ``generic_util.py``, so AUPRO values are comparable with published numbers. Repeated
    x values (vertical segments) add no area, whatever their order.
    """
    end = x.size if x_max is None else int(np.searchsorted(x, x_max, side="right"))
    area = 0.5 * float(np.dot(np.diff(x[:end]), y[1:end] + y[: end - 1]))
    if x_max is not None and 0 < end < x.size and x[end - 1] < x_max:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_at_limit = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * float((y0 + y_at_limit) * (x_max - x0))
    return area


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _auroc_from_curve(curve: _Curve) -> float:
    """Trapezoid area under (FPR, TPR), as ``sklearn.metrics.roc_auc_score``."""
    _require(
        curve.n_pos > 0 and curve.n_neg > 0,
        "AUROC is undefined when only one class is present in labels",
    )
    fpr = _rates_from_origin(curve.fps, curve.n_neg)
    tpr = _rates_from_origin(curve.tps, curve.n_pos)
    return _trapezoid(fpr, tpr)


def _average_precision_from_curve(curve: _Curve) -> float:
    """Sum of precision weighted by the recall gained at each threshold (no interpolation).

    This is scikit-learn's step-wise definition; the trapezoid would be optimistic.
    """
    _require(curve.n_pos > 0, "average precision is undefined without positive labels")
    precision = curve.tps / (curve.tps + curve.fps)
    recall_gain = np.diff(curve.tps, prepend=0.0)
    return float(np.dot(recall_gain, precision)) / curve.n_pos


def _f1_max_from_curve(curve: _Curve) -> tuple[float, float]:
    """Best F1 = 2TP / (TP + FP + P) over thresholds; ties go to the highest threshold."""
    _require(curve.n_pos > 0, "F1 is undefined without positive labels")
    f1 = 2.0 * curve.tps / (curve.tps + curve.fps + curve.n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(curve.thresholds[best])


def _aupro_from_curve(curve: _Curve, fpr_limit: float) -> float:
    """Normalised area under the (FPR, PRO) curve up to ``fpr_limit``; NaN if undefined."""
    if curve.overlap is None or curve.n_regions == 0 or curve.n_neg == 0:
        return math.nan
    fpr = _rates_from_origin(curve.fps, curve.n_neg)
    pro = _rates_from_origin(curve.overlap, curve.n_regions)
    return _trapezoid(fpr, pro, x_max=fpr_limit) / fpr_limit


def _threshold_metrics(curve: _Curve, prefix: str) -> Metrics:
    """AUROC, AP and F1-max from one curve, under the ``compute_metrics`` key names."""
    f1, threshold = _f1_max_from_curve(curve)
    return {
        f"{prefix}_auroc": _auroc_from_curve(curve),
        f"{prefix}_ap": _average_precision_from_curve(curve),
        f"{prefix}_f1max": f1,
        f"{prefix}_f1_threshold": threshold,
    }


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _check_scores(scores: np.ndarray, what: str) -> None:
    """Reject non-numeric and NaN scores: NaN has no place in a ranking."""
    _require(scores.dtype.kind in "biuf", f"{what} must be real numbers, got dtype {scores.dtype}")
    _require(
        not (scores.dtype.kind == "f" and np.isnan(scores).any()), f"{what} contain NaN"
    )


def _as_binary_inputs(
    labels: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[npt.NDArray[np.bool_], np.ndarray]:
    """Validate 1-D (labels, scores); labels become bool (True = anomalous).

    Labels must be bool or 0/1 so that a mistaken label encoding (e.g. class ids 1/2)
    fails loudly instead of silently flipping the positive class.
    """
    labels_arr = np.asarray(labels)
    scores_arr = np.asarray(scores)
    _require(
        labels_arr.ndim == 1 and scores_arr.ndim == 1,
        f"labels and scores must be 1-D, got shapes {labels_arr.shape} and {scores_arr.shape}",
    )
    _require(
        labels_arr.size == scores_arr.size,
        f"labels and scores differ in length: {labels_arr.size} != {scores_arr.size}",
    )
    _require(labels_arr.size > 0, "labels and scores are empty")
    if labels_arr.dtype != np.bool_:
        _require(
            bool(np.isin(labels_arr, (0, 1)).all()), "labels must be boolean or 0/1"
        )
        labels_arr = labels_arr == 1
    _check_scores(scores_arr, "scores")
    return labels_arr, scores_arr


def _check_fpr_limit(fpr_limit: float) -> None:
    _require(0.0 < fpr_limit <= 1.0, f"fpr_limit must be in (0, 1], got {fpr_limit}")


# --------------------------------------------------------------------------------------
# Public single metrics (1-D inputs)
# --------------------------------------------------------------------------------------


def auroc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve, identical to ``sklearn.metrics.roc_auc_score``.

    Args:
        labels: 1-D bool or 0/1; True/1 = anomalous (positive).
        scores: 1-D real scores, higher = more anomalous.

    Raises:
        ValueError: if only one class is present, or on malformed input.
    """
    return _auroc_from_curve(_binary_curve(*_as_binary_inputs(labels, scores)))


def average_precision(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Average precision, identical to ``sklearn.metrics.average_precision_score``.

    Step-wise sum of precision times recall gain over distinct thresholds.

    Raises:
        ValueError: if there is no positive label (AP is undefined), or on bad input.
    """
    return _average_precision_from_curve(_binary_curve(*_as_binary_inputs(labels, scores)))


def f1_max(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it.

    Returns:
        ``(f1, threshold)``: predicting "anomalous" where ``score >= threshold`` gives
        ``f1``. When several thresholds tie, the highest one is returned.

    Raises:
        ValueError: if there is no positive label, or on malformed input.
    """
    return _f1_max_from_curve(_binary_curve(*_as_binary_inputs(labels, scores)))


# --------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PixelData:
    """All pixels of a test set, flattened and concatenated over images."""

    scores: npt.NDArray[np.float32]
    #: 0 for normal pixels, k > 0 for the k-th ground-truth region of the whole set.
    region_ids: npt.NDArray[np.int32]
    #: Pixel count per region id; entry 0 counts the normal pixels.
    region_sizes: npt.NDArray[np.int64]

    @property
    def n_regions(self) -> int:
        return self.region_sizes.size - 1

    @property
    def has_both_classes(self) -> bool:
        return bool(self.n_regions > 0 and self.region_sizes[0] > 0)


def _overlap_at_group_ends(
    sorted_positive_regions: npt.NDArray[np.int32],
    region_sizes: npt.NDArray[np.int64],
    tps: FloatArray,
) -> FloatArray:
    """Sum over regions of the detected fraction, at every curve point.

    Each anomalous pixel contributes 1 / (size of its region) once it is above the
    threshold (the MVTec construction). Only anomalous pixels carry weight, so the cumsum
    runs over them alone, in score order; the value at a curve point is the cumsum after
    its first ``tps`` anomalous pixels.
    """
    cumulative = np.empty(sorted_positive_regions.size + 1, dtype=np.float64)
    cumulative[0] = 0.0
    np.cumsum(1.0 / region_sizes[sorted_positive_regions], out=cumulative[1:])
    return cumulative[tps.astype(np.intp)]


def _pixel_curve(data: _PixelData) -> _Curve:
    """Exact curve over all distinct pixel scores, from a single argsort.

    Large intermediates are released as soon as possible: at 33M pixels each one is
    130-260 MB.
    """
    order, thresholds, is_last = _rank(data.scores)
    sorted_regions = data.region_ids[order]
    del order
    positive = sorted_regions > 0
    tps, fps = _counts_at_group_ends(positive, is_last)
    del is_last
    overlap = _overlap_at_group_ends(sorted_regions[positive], data.region_sizes, tps)
    return _Curve(thresholds, tps, fps, overlap, data.n_regions)


def _binned_pixel_curve(data: _PixelData, num_thresholds: int) -> _Curve:
    """Approximate curve at ``num_thresholds`` quantiles of the pixel scores, no full sort.

    Each pixel is binned to the highest threshold it reaches and per-bin sums are
    accumulated, which is O(n log num_thresholds). The thresholds are actual scores
    including the minimum, so the curve still ends at (1, 1); with at least one threshold
    per pixel the curve is the exact one.
    """
    levels = np.linspace(0.0, 1.0, num_thresholds)
    ascending = np.unique(np.quantile(data.scores, levels, method="inverted_cdf"))
    ascending = ascending.astype(data.scores.dtype, copy=False)
    n_bins = ascending.size
    # Index, in descending threshold order, of the first threshold the pixel reaches.
    first = n_bins - np.searchsorted(ascending, data.scores, side="right")
    positive = data.region_ids > 0

    def cumulative(selected: np.ndarray, weights: np.ndarray | None = None) -> FloatArray:
        counts = np.bincount(selected, weights=weights, minlength=n_bins)
        return np.cumsum(counts, dtype=np.float64)

    positive_first = first[positive]
    weights = 1.0 / data.region_sizes[data.region_ids[positive]]
    return _Curve(
        thresholds=ascending[::-1],
        tps=cumulative(positive_first),
        fps=cumulative(first[~positive]),
        overlap=cumulative(positive_first, weights),
        n_regions=data.n_regions,
    )


def _pixel_metrics(data: _PixelData, fpr_limit: float, fp_scale: float = 1.0) -> Metrics:
    """All pixel metrics from one exact curve; all None if a class is missing.

    ``fp_scale``: normal pixels were kept at the rate 1 / fp_scale; false-positive counts are
    scaled back (rates, hence AUROC and AUPRO, do not change)."""
    if not data.has_both_classes:
        return dict.fromkeys(_PIXEL_KEYS)
    curve = _pixel_curve(data)
    if fp_scale != 1.0:
        curve = dataclasses.replace(curve, fps=curve.fps * fp_scale)
    metrics = _threshold_metrics(curve, "pixel")
    metrics["aupro"] = _aupro_from_curve(curve, fpr_limit)
    return metrics


def _check_image_pair(mask: np.ndarray, amap: np.ndarray) -> None:
    """Both 2-D with equal shapes, and a real-valued NaN-free map."""
    _require(
        mask.ndim == 2 and amap.ndim == 2,
        f"mask and map must be 2-D (H, W), got shapes {mask.shape} and {amap.shape}",
    )
    _require(
        mask.shape == amap.shape,
        f"mask shape {mask.shape} != anomaly map shape {amap.shape}",
    )
    _check_scores(amap, "anomaly map values")


class PixelMetricAccumulator:
    """Collects (mask, anomaly map) pairs one image at a time; computes pixel metrics.

    Why: evaluation loops produce maps per batch, and images may differ in size, so the
    caller should not have to stack them. Each update stores only float32 scores and
    int32 region ids (8 bytes per kept pixel), not the caller's arrays.

    ``normal_fraction`` < 1 bounds the memory of large test sets (full-resolution masks):
    every anomalous pixel is kept, normal pixels by a seeded draw at that one rate. The
    false-positive *rate* at any threshold is then an unbiased estimate over the kept normal
    pixels, so pixel AUROC and AUPRO need no correction; AP and F1 count false positives,
    which are scaled back by ``1 / normal_fraction``. With 1 (the default) every pixel is
    kept and all metrics are exact.

    Masks: any dtype, nonzero = anomalous (0/255 PNG masks work as is). Maps: real
    numbers, higher = more anomalous; stored as float32, so scores closer than float32
    resolution become ties.

    Example::

        acc = PixelMetricAccumulator()
        for mask, amap in batches:
            acc.update(mask, amap)
        acc.result()  # {"pixel_auroc": ..., "aupro": ...}
    """

    def __init__(self, fpr_limit: float = 0.3, normal_fraction: float = 1.0, seed: int = 0) -> None:
        _check_fpr_limit(fpr_limit)
        _require(0.0 < normal_fraction <= 1.0, f"normal_fraction must be in (0, 1], got {normal_fraction}")
        self.fpr_limit = fpr_limit
        self.normal_fraction = float(normal_fraction)
        self._rng = np.random.default_rng(seed)
        self._scores: list[npt.NDArray[np.float32]] = []
        self._region_ids: list[npt.NDArray[np.int32]] = []
        self._region_sizes: list[npt.NDArray[np.int64]] = []
        self._num_normal = 0
        self._num_regions = 0
        self._num_images = 0

    @property
    def num_images(self) -> int:
        """Number of images added so far (the index the next image will have)."""
        return self._num_images

    def update(self, mask: npt.ArrayLike, amap: npt.ArrayLike) -> None:
        """Add one image: ``mask`` (H, W) ground truth and ``amap`` (H, W) scores.

        Raises:
            ValueError: naming the image index, if the shapes differ or are not 2-D, or
                the map is not real-valued or contains NaN.
        """
        index = self._num_images
        mask_arr = np.asarray(mask)
        map_arr = np.asarray(amap)
        try:
            _check_image_pair(mask_arr, map_arr)
        except ValueError as err:
            raise ValueError(f"image {index}: {err}") from None

        labeled, n_regions = ndimage.label(mask_arr != 0, structure=_CONNECTIVITY, output=np.int32)
        region_ids = labeled.ravel()
        sizes = np.bincount(region_ids, minlength=n_regions + 1)  # region sizes: always exact
        region_ids[region_ids > 0] += self._num_regions  # ids unique over the whole set
        scores = map_arr.astype(np.float32).ravel()
        num_normal = int(sizes[0])
        if self.normal_fraction < 1.0:
            keep = (region_ids > 0) | (self._rng.random(region_ids.size) < self.normal_fraction)
            scores, region_ids = scores[keep], region_ids[keep]
            num_normal = int(np.count_nonzero(region_ids == 0))
        self._scores.append(scores)
        self._region_ids.append(region_ids)
        self._region_sizes.append(sizes[1:].astype(np.int64))
        self._num_normal += num_normal
        self._num_regions += n_regions
        self._num_images += 1

    def _collect(self) -> _PixelData:
        """Concatenate what was added, keeping the concatenation for later calls.

        Replacing the per-image lists by their concatenation means peak memory is paid
        once, and ``update`` may still be called afterwards.
        """
        _require(self._num_images > 0, "no images were added")
        self._scores = [_concatenate(self._scores)]
        self._region_ids = [_concatenate(self._region_ids)]
        sizes = np.concatenate([np.array([self._num_normal], dtype=np.int64), *self._region_sizes])
        return _PixelData(self._scores[0], self._region_ids[0], sizes)

    def result(self) -> Metrics:
        """Pixel AUROC, AP, F1-max (+ threshold) and AUPRO over all images added.

        All values are None when the masks contain no anomalous pixel or no normal pixel.

        Raises:
            ValueError: if no image was added.
        """
        return _pixel_metrics(self._collect(), self.fpr_limit, fp_scale=1.0 / self.normal_fraction)


def _concatenate(chunks: list[np.ndarray]) -> np.ndarray:
    """Concatenate without copying when there is nothing to join."""
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def _accumulate(
    masks: Sequence[npt.ArrayLike] | np.ndarray,
    maps: Sequence[npt.ArrayLike] | np.ndarray,
    fpr_limit: float,
) -> PixelMetricAccumulator:
    """Feed (N, H, W) arrays or lists of (H, W) arrays into an accumulator."""
    _require(
        len(masks) == len(maps),
        f"got {len(masks)} masks but {len(maps)} anomaly maps",
    )
    accumulator = PixelMetricAccumulator(fpr_limit)
    for mask, amap in zip(masks, maps):
        accumulator.update(mask, amap)
    return accumulator


def aupro(
    masks: Sequence[npt.ArrayLike] | np.ndarray,
    maps: Sequence[npt.ArrayLike] | np.ndarray,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    Defined as in the MVTec AD evaluation code: regions are the 8-connected components
    of each mask; at threshold t, FPR is the fraction of normal pixels (over all images)
    with score >= t and PRO the mean over all regions of the fraction of the region's
    pixels with score >= t. Images with empty masks contribute normal pixels only.

    Args:
        masks: (N, H, W) array or list of (H, W) arrays; nonzero = anomalous. Images may
            differ in size.
        maps: matching anomaly maps (real numbers, cast to float32).
        fpr_limit: upper integration limit, in (0, 1].
        num_thresholds: None (default) for the exact curve over all distinct scores;
            an integer >= 2 for a faster approximation at that many score quantiles.

    Returns:
        AUPRO, or NaN when there is no ground-truth region or no normal pixel.

    Raises:
        ValueError: on mismatched inputs (naming the bad image index).
    """
    _check_fpr_limit(fpr_limit)
    _require(
        num_thresholds is None or num_thresholds >= 2,
        f"num_thresholds must be None or >= 2, got {num_thresholds}",
    )
    data = _accumulate(masks, maps, fpr_limit)._collect()
    if not data.has_both_classes:
        return math.nan
    if num_thresholds is None:
        curve = _pixel_curve(data)
    else:
        curve = _binned_pixel_curve(data, num_thresholds)
    return _aupro_from_curve(curve, fpr_limit)


# --------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------


def _image_metrics(labels: npt.ArrayLike, scores: npt.ArrayLike) -> Metrics:
    """Image-level metrics; all None when the labels hold a single class."""
    labels_arr, scores_arr = _as_binary_inputs(labels, scores)
    if labels_arr.all() or not labels_arr.any():
        return dict.fromkeys(_IMAGE_KEYS)
    return _threshold_metrics(_binary_curve(labels_arr, scores_arr), "image")


def compute_metrics(
    image_labels: npt.ArrayLike,
    image_scores: npt.ArrayLike,
    masks: Sequence[npt.ArrayLike] | np.ndarray | None = None,
    maps: Sequence[npt.ArrayLike] | np.ndarray | None = None,
    fpr_limit: float = 0.3,
) -> Metrics:
    """All image- and pixel-level metrics of a test set.

    Args:
        image_labels: (N,) bool or 0/1, True = anomalous image.
        image_scores: (N,) image anomaly scores.
        masks: None, or (N, H, W) / list of N (H, W) ground-truth masks (nonzero =
            anomalous; sizes may differ between images).
        maps: None, or anomaly maps matching ``masks`` image by image.
        fpr_limit: AUPRO integration limit.

    Returns:
        Dict with keys image_auroc, image_ap, image_f1max, image_f1_threshold,
        pixel_auroc, pixel_ap, pixel_f1max, pixel_f1_threshold, aupro. Image keys are
        None when all images share one label (e.g. an all-good split); pixel keys are None
        when masks/maps are not given or the masks lack anomalous or normal pixels.

    Raises:
        ValueError: on malformed input, e.g. a mask/map shape mismatch (the message names
            the image index) or a number of masks different from the number of images.
    """
    _require((masks is None) == (maps is None), "masks and maps must be given together")
    _check_fpr_limit(fpr_limit)
    metrics = _image_metrics(image_labels, image_scores)
    if masks is None or maps is None:
        metrics.update(dict.fromkeys(_PIXEL_KEYS))
        return metrics
    num_images = len(np.asarray(image_labels))
    _require(
        len(masks) == num_images,
        f"got {len(masks)} masks for {num_images} image labels",
    )
    metrics.update(_accumulate(masks, maps, fpr_limit).result())
    return metrics
