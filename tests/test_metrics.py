"""Tests for stmae.metrics against scikit-learn and slow, obviously-correct references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from stmae.metrics import (
    PixelMetricAccumulator,
    aupro,
    auroc,
    average_precision,
    compute_metrics,
    f1_max,
)

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1max", "image_f1_threshold")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_f1_threshold", "aupro")


# ------------------------------------------------------------------ helpers / references


def random_binary_cases(seed: int = 0, count: int = 150):
    """(labels, scores) pairs covering tiny, imbalanced and heavily tied inputs."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.choice([2, 3, 5, 20, 200, 1000]))
        pos_frac = float(rng.choice([0.5, 0.1, 0.01]))
        labels = rng.random(n) < pos_frac
        labels[:2] = True, False  # both classes present
        rng.shuffle(labels)
        if i % 3 == 0:
            scores = rng.integers(0, 4, n)  # integer scores: heavy ties
        elif i % 3 == 1:
            scores = rng.normal(size=n) + labels
        else:
            scores = np.round(rng.random(n), 1).astype(np.float32)
        yield labels, scores


def brute_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def f1_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    pred = scores >= threshold
    tp = np.sum(pred & labels)
    return 2 * tp / (pred.sum() + labels.sum())


def brute_aupro(masks, maps, limit: float = 0.3) -> float:
    """Loop over every distinct threshold and measure FPR / PRO directly."""
    regions = []
    for image, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labeled == k) for k in range(1, n + 1)]
    normal_scores = np.concatenate([amap[~mask] for mask, amap in zip(masks, maps)])
    thresholds = np.unique(np.concatenate([amap.ravel() for amap in maps]))[::-1]
    points = [(0.0, 0.0)]
    for t in thresholds:
        fpr = np.mean(normal_scores >= t)
        pro = np.mean([np.mean(maps[image][region] >= t) for image, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y_limit) / 2
            break
    return area / limit


def random_pixel_case(rng: np.random.Generator, sizes, ties: bool):
    """Masks with a few blobs (one image always empty) and float32 maps."""
    masks, maps = [], []
    for i, (h, w) in enumerate(sizes):
        mask = np.zeros((h, w), dtype=bool)
        if i > 0:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
                dy, dx = rng.integers(1, 4, size=2)
                mask[y : y + dy, x : x + dx] = True
            mask[rng.random((h, w)) < 0.02] = True  # specks, some diagonal contacts
        if ties:
            amap = rng.integers(0, 6, (h, w)) + 2 * mask * rng.integers(0, 2, (h, w))
        else:
            amap = rng.random((h, w)) + 0.5 * mask * rng.random((h, w))
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    return masks, maps


# ------------------------------------------------------------------ AUROC / AP / F1


def test_auroc_and_ap_match_sklearn():
    for labels, scores in random_binary_cases():
        assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
        assert average_precision(labels, scores) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-9
        )


def test_auroc_accepts_01_labels_and_lists():
    assert auroc([0, 1, 0, 1], [0.1, 0.9, 0.1, 0.1]) == pytest.approx(
        roc_auc_score([0, 1, 0, 1], [0.1, 0.9, 0.1, 0.1])
    )


def test_f1_max_matches_brute_force():
    for labels, scores in random_binary_cases(seed=1, count=60):
        best, threshold = f1_max(labels, scores)
        assert best == pytest.approx(brute_f1_max(labels, scores), abs=1e-12)
        assert f1_at(labels, scores, threshold) == pytest.approx(best, abs=1e-12)


def test_f1_max_hand_case():
    # t=0.8: TP=1 FP=0 FN=1 -> F1 2/3; t=0.4: TP=1 FP=1 FN=1 -> 1/2;
    # t=0.35: TP=2 FP=1 FN=0 -> 4/5 (best); t=0.1: TP=2 FP=2 -> 2/3.
    best, threshold = f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert best == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


def test_single_class_errors():
    with pytest.raises(ValueError, match="one class"):
        auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one class"):
        auroc([False, False], [0.1, 0.2])
    with pytest.raises(ValueError, match="positive"):
        average_precision([0, 0], [0.1, 0.2])


def test_bad_binary_inputs():
    with pytest.raises(ValueError, match="length"):
        auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        auroc([1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, np.nan])


# ------------------------------------------------------------------ AUPRO


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    sizes = [(16, 16)] * 4 if seed % 2 == 0 else [(16, 16), (12, 20), (16, 9), (10, 10)]
    masks, maps = random_pixel_case(rng, sizes, ties=seed >= 3)
    for limit in (0.3, 0.05, 1.0):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
            brute_aupro(masks, maps, limit), abs=1e-9
        )


def test_aupro_perfect_and_inverted_maps():
    rng = np.random.default_rng(0)
    masks, _ = random_pixel_case(rng, [(16, 16)] * 3, ties=False)
    perfect = [mask.astype(np.float32) for mask in masks]
    inverted = [1.0 - p for p in perfect]
    # Curve (0,0) -> (0,1) -> (1,1): area 0.3 over 0.3.
    assert aupro(masks, perfect) == pytest.approx(1.0)
    # Curve (0,0) -> (1,0) -> (1,1): nothing below FPR 1.
    assert aupro(masks, inverted) == pytest.approx(0.0)


def test_aupro_hand_case():
    # One 1x13 image. Region A = pixels 0-1 (scores 0.9, 0.5), region B = pixel 12 (0.6,
    # tied with a normal pixel); 10 normal pixels 0.8, 0.6, 0.4, 0.35, ... 0.05.
    # Curve: (0,0) -t0.9-> (0, 1/4) -t0.8-> (0.1, 1/4) -t0.6-> (0.2, 3/4) -t0.5-> (0.2, 1)
    #        -t0.4-> (0.3, 1) ...
    # Limit 0.3: 0.1*1/4 + 0.1*(1/4+3/4)/2 + 0.1*1 = 0.175 -> /0.3 = 7/12.
    # Limit 0.15 (interpolated PRO at 0.15 is 1/2): 0.025 + 0.05*(1/4+1/2)/2 = 0.04375
    #   -> /0.15 = 7/24.
    mask = np.zeros((1, 13), dtype=bool)
    mask[0, [0, 1, 12]] = True
    amap = np.array([[0.9, 0.5, 0.8, 0.6, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.6]])
    assert aupro([mask], [amap]) == pytest.approx(7 / 12, abs=1e-12)
    assert aupro([mask], [amap], fpr_limit=0.15) == pytest.approx(7 / 24, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # Pixels (0,0), (1,1), (1,2) form ONE 8-connected region of 3 pixels (4-connectivity
    # would give two regions). Only (0,0) scores above every normal pixel, so PRO stays at
    # 1/3 until FPR = 1: AUPRO = 1/3 (it would be 1/2 with two regions).
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=bool)
    amap = np.array([[0.9, 0.8, 0.7], [0.6, 0.1, 0.1], [0.5, 0.4, 0.3]])
    assert aupro([mask], [amap]) == pytest.approx(1 / 3, abs=1e-12)


def test_aupro_without_regions_is_nan():
    masks = [np.zeros((4, 4), dtype=bool)] * 2
    maps = [np.random.default_rng(0).random((4, 4))] * 2
    assert math.isnan(aupro(masks, maps))


def test_aupro_approximation():
    rng = np.random.default_rng(3)
    masks, maps = random_pixel_case(rng, [(32, 32)] * 6, ties=False)
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=500) == pytest.approx(exact, abs=1e-2)
    n_pixels = sum(m.size for m in masks)  # a threshold per pixel: the exact curve
    assert aupro(masks, maps, num_thresholds=n_pixels + 1) == pytest.approx(exact, abs=1e-12)


# ------------------------------------------------------------------ compute_metrics


def test_accumulator_equals_compute_metrics_on_mixed_sizes():
    rng = np.random.default_rng(7)
    sizes = [(16, 16), (12, 20), (16, 9), (10, 10), (20, 8)]
    masks, maps = random_pixel_case(rng, sizes, ties=False)
    labels = [m.any() for m in masks]
    scores = [float(a.max()) for a in maps]

    accumulator = PixelMetricAccumulator()
    for mask, amap in zip(masks, maps):
        accumulator.update(mask, amap)
    from_accumulator = accumulator.result()
    metrics = compute_metrics(labels, scores, masks, maps)

    assert set(metrics) == set(IMAGE_KEYS) | set(PIXEL_KEYS)
    assert set(from_accumulator) == set(PIXEL_KEYS)
    for key in PIXEL_KEYS:
        assert from_accumulator[key] == metrics[key]
    assert accumulator.result() == from_accumulator  # result() is repeatable

    flat_labels = np.concatenate([m.ravel() for m in masks])
    flat_scores = np.concatenate([a.ravel() for a in maps])
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(flat_labels, flat_scores))
    assert metrics["pixel_ap"] == pytest.approx(average_precision_score(flat_labels, flat_scores))
    assert metrics["aupro"] == pytest.approx(brute_aupro(masks, maps), abs=1e-9)
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))


def test_compute_metrics_stacked_arrays_and_none_cases():
    rng = np.random.default_rng(11)
    masks, maps = random_pixel_case(rng, [(8, 8)] * 4, ties=False)
    stacked = compute_metrics([0, 1, 1, 1], [0.1, 0.5, 0.7, 0.2], np.stack(masks), np.stack(maps))
    listed = compute_metrics([0, 1, 1, 1], [0.1, 0.5, 0.7, 0.2], masks, maps)
    assert stacked == listed

    image_only = compute_metrics([0, 1], [0.2, 0.4])
    assert image_only["image_auroc"] == 1.0
    assert all(image_only[key] is None for key in PIXEL_KEYS)

    all_good = compute_metrics([0, 0], [0.2, 0.4], [np.zeros((4, 4))] * 2, [np.ones((4, 4))] * 2)
    assert all(all_good[key] is None for key in IMAGE_KEYS + PIXEL_KEYS)


def test_shape_mismatch_names_image_index():
    masks = [np.zeros((4, 4), bool), np.ones((4, 4), bool), np.zeros((4, 5), bool)]
    maps = [np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((5, 4))]
    with pytest.raises(ValueError, match="image 2"):
        compute_metrics([0, 1, 0], [0.0, 1.0, 0.0], masks, maps)
    accumulator = PixelMetricAccumulator()
    accumulator.update(masks[0], maps[0])
    with pytest.raises(ValueError, match="image 1"):
        accumulator.update(masks[1], np.zeros((3, 3)))
    with pytest.raises(ValueError, match="image 0"):
        aupro([np.zeros((2, 2, 2))], [np.zeros((2, 2, 2))])


def test_other_input_errors():
    mask, amap = np.ones((2, 2), bool), np.zeros((2, 2))
    with pytest.raises(ValueError, match="together"):
        compute_metrics([0, 1], [0.0, 1.0], masks=[mask, mask])
    with pytest.raises(ValueError, match="masks"):
        compute_metrics([0, 1], [0.0, 1.0], [mask], [amap])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([mask], [amap], fpr_limit=0.0)
    with pytest.raises(ValueError, match="no images"):
        PixelMetricAccumulator().result()
