"""Ablation study on validation data only: which ST-MAE recipe to make the default.

Why a separate script from ``quality.py``: the quality benchmark reports *test* numbers once;
choosing settings on them would be tuning on the test split. Every figure here comes from
data the quality benchmark never scores:

``fmnist`` / ``mnist``
    One-class protocol built from the *training* split only
    (:func:`stmae.load_oneclass` with ``validation=N``): each normal class trains on
    ``--train-limit`` of its training images and is scored against ``--val`` other
    training-split images of all classes. Mean image AUROC over ``--classes``.
``mt``
    Magnetic Tile: ST-MAE trains on the 200-image protocol's training subset (the quality
    benchmark's seed-42 subsample of ``train/good``, docs/results.md). Validation uses other ``train/good`` images the
    protocol never trains on: half stay good, half get one synthetic defect each
    (:func:`synthetic_defect`: a dark or bright soft blob, or a thin dark crack, with its
    mask). Image AUROC and pixel AUROC. The real defects of the test split are never read.
``mt_extended`` / ``mt_edge``
    The same images, but every defect is a long, thin, faint crack
    (:func:`long_crack_defect`) or a short faint crack from an image edge
    (:func:`edge_crack_defect`): probes for the real cracks, on which ST-MAE trails the kNN
    while ``mt``'s painted defects do not show it.
``mt_real``
    The same training subset, validated on Magnetic Tile's *real* defects: ``mt_val``, the
    seeded half of the test split that every setting is chosen on
    (:func:`stmae_research.protocols.split_real_defects`). ``mt_test``, the other half, is never read.

Rows. A *training* variant (a set of config overrides, :data:`TRAIN_VARIANTS`) trains a
model; every trained model is then scored with every *scoring* variant
(:data:`SCORING_VARIANTS`: residual function, image score, K split pairs, per-position
normalisation), which costs inference only. The kNN yardstick
(``stmae_research.knn``, same features) is scored on the same validation images for
reference. All settings are reduced to fit a 2-core CPU (see ``PROTOCOLS``) and every row
says so; they rank recipes, they are not the quality figures.

Outputs: ``research/results/ablation_<protocol>.json`` and ``.md``. Rows merge with an
existing file, so protocols and variants can run in separate processes, but only rows made
by the same code: every row records its provenance (command, commit, device, versions,
seconds; :mod:`stmae.provenance`) and a merge with rows from another commit or a dirty tree
is refused.

Run: ``python research/ablation.py --protocol fmnist [--variants base,epochs_x2]
[--classes 0,1,...] [--train-limit 150] [--val 500] [--threads 1] [--data ../shared/data]``
(``--data``: the folder holding ``magnetic_tile/``, ``fashion_mnist/`` and ``mnist_5k/``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from stmae_research import scoring as stage
from stmae.config import Config
from stmae.data import Sample, load_mvtec, load_oneclass, resize_image
from stmae.features import FeatureStats, extract_features
from stmae import provenance
from stmae.fileio import atomic_write_json, atomic_write_text
from stmae_research.provenance import ProvenanceError, require_same_code
from stmae.infer import Detector, build_model
from stmae.evaluate import mask_at
from stmae.metrics import auroc
from stmae.fitting import fit_memory, fit_residual_stats
from stmae.model import PatchMemory
from stmae_research.protocols import split_real_defects
from stmae.train import make_config
from stmae_research.variants import Knobs
from stmae_research import variants

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
#: Default data folder (``--data``): ``shared/data`` beside the checkout.
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
_data_root = DEFAULT_DATA_ROOT


def set_data_root(root: Path) -> None:
    """Where :func:`data_path` finds the data sets (``--data``)."""
    global _data_root
    _data_root = Path(root)


def data_path(spec: dict[str, Any]) -> Path:
    """A protocol's data set under the data root."""
    return _data_root / spec["data"]


#: Per protocol: data, base preset, reduced epochs, and overrides that pin the base to the
#: recipe the recorded rows were run from (the ``lowres`` preset before this study had no
#: local mean; the study then chose it; the ``fast`` preset before it had no memory bank), so
#: re-running a variant stays comparable.
#: The Magnetic Tile protocols differ only in the validation defects (:data:`PAINTERS`).
_MT: dict[str, Any] = {"data": "magnetic_tile/magnetic_tile", "kind": "mvtec", "preset": "fast",
                       "epochs": 30, "val": 160, "base": {"infer.distance_weight": 0.0}}
PROTOCOLS: dict[str, dict[str, Any]] = {
    # infer.distance_weight 0: the residual columns stay the residual alone now that `lowres` blends the
    # memory (0.9); the memory columns of SCORING_VARIANTS set their share themselves.
    "fmnist": {"data": "fashion_mnist", "kind": "fashion-mnist", "preset": "lowres", "epochs": 15,
               "val": 400, "base": {"features.aggregate": 1, "infer.distance_weight": 0.0}},
    "mnist": {"data": "mnist_5k/mnist_5k.csv.gz", "kind": "mnist", "preset": "lowres", "epochs": 15,
              "val": 400, "base": {"features.aggregate": 1, "infer.distance_weight": 0.0}},
    "mt": {**_MT, "defect": "one synthetic defect"},
    # Same training data and validation images as "mt"; the defects are long, thin, faint
    # cracks only (:func:`long_crack_defect`), the kind of extended defect where ST-MAE
    # trails the kNN on the real test split while the painted "mt" cracks do not show it.
    "mt_extended": {**_MT, "defect": "one long thin faint crack"},
    # The same again with short faint cracks that start at an image edge (:func:`edge_crack_defect`).
    "mt_edge": {**_MT, "defect": "one thin faint crack from an image edge"},
    # Real defects: the mt_val half of the test split (stmae_research.protocols.split_real_defects,
    # seed 0), the half every setting is chosen on; its other half (mt_test) is never read.
    "mt_real": {**_MT, "defect": "the real defects of mt_val"},
}

#: The `accurate` preset's transformer, for variants on a `fast` base (which keeps its learning rate).
_ACCURATE_MODEL: dict[str, Any] = {"model.embed_dim": 256, "model.depth": 4, "model.num_heads": 8,
                                   "model.decoder_dim": 128, "model.decoder_depth": 2, "model.decoder_heads": 4}

#: Training variants: overrides of the protocol's base config. ``epochs_x2`` doubles the
#: protocol's reduced schedule. Keys that do not apply to a preset are skipped there. The
#: ablation-only switches (pad, split_block, ema, cos_weight, standardize) keep their old
#: dotted keys but are research knobs, not config settings (:func:`resolve_variant`,
#: ``stmae_research.variants``).
TRAIN_VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "epochs_x2": {"train.epochs": "x2"},
    "epochs_x4": {"train.epochs": "x4"},
    "epochs_x8": {"train.epochs": "x8"},
    "aggregate_1": {"features.aggregate": 1},
    "aggregate_3": {"features.aggregate": 3},
    "aggregate_5": {"features.aggregate": 5},
    "with_stride2": {"backbone.layers": "stride2,stride4,stride8,stride16"},
    "stride8_16": {"backbone.layers": "stride8,stride16"},
    "lite1": {"backbone.name": "efficientnet_lite1"},
    "lite2": {"backbone.name": "efficientnet_lite2"},
    "no_standardize": {"features.standardize": False},
    "wide_deep": {"model.embed_dim": 256, "model.depth": 6, "model.num_heads": 8, "model.decoder_dim": 128,
                  "model.decoder_depth": 2},
    "accurate_model": _ACCURATE_MODEL,
    "accurate_model_x2": {**_ACCURATE_MODEL, "train.epochs": "x2"},
    "mse_loss_only": {"train.cos_weight": 0.0},
    "hard_mining": {"train.hard_mining": 0.9},
    "aggregate_3_hard_mining": {"features.aggregate": 3, "train.hard_mining": 0.9},
    "ema_0.99": {"train.ema": 0.99},
    "patch_2": {"model.patch_size": 2},
    "split_block_2": {"model.split_block": 2},
    "split_block_4": {"model.split_block": 4},
    "grid_16_patch_1": {"features.grid_size": 16, "model.patch_size": 1},
    "pad_2": {"features.pad": 2},
    "pad_4": {"features.pad": 4},
    "image_128_grid_16": {"features.image_size": 128, "features.grid_size": 16, "model.patch_size": 2},
    # the larger offline backbones with the `lowres` local mean (one-class data)
    "aggregate_3_lite1": {"features.aggregate": 3, "backbone.name": "efficientnet_lite1"},
    "aggregate_3_lite2": {"features.aggregate": 3, "backbone.name": "efficientnet_lite2"},
}

#: Scoring variants: (residual, image score, K pairs, per-position normalisation[, other
#: ``infer`` settings; default: the preset's]).
SCORING_VARIANTS: dict[str, tuple] = {
    "mse/max": ("mse", "max", 4, False),
    "mse/topk": ("mse", "topk", 4, False),
    "cos/max": ("cos", "max", 4, False),
    "cos/topk": ("cos", "topk", 4, False),
    "mse_cos/max": ("mse_cos", "max", 4, False),
    "mse_cos/max/K1": ("mse_cos", "max", 1, False),
    "mse_cos/max/K16": ("mse_cos", "max", 16, False),
    "mse_cos/topk": ("mse_cos", "topk", 4, False),
    "mahalanobis/max": ("mahalanobis", "max", 4, False),
    "mahalanobis/topk": ("mahalanobis", "topk", 4, False),
    "mahalanobis/topk/K1": ("mahalanobis", "topk", 1, False),
    "mahalanobis/topk/K16": ("mahalanobis", "topk", 16, False),
    "mahalanobis/topk/posnorm": ("mahalanobis", "topk", 4, True),
    "mse_cos/topk/posnorm": ("mse_cos", "topk", 4, True),
    "mse_cos/max/posnorm": ("mse_cos", "max", 4, True),
    "mahalanobis/top1%": ("mahalanobis", "topk", 4, False, {"topk": 0.01}),
    "mahalanobis/top30%": ("mahalanobis", "topk", 4, False, {"topk": 0.3}),
    "mahalanobis/mean": ("mahalanobis", "topk", 4, False, {"topk": 1.0}),
    # wider smoothing of the map: large, weak defects (uneven shading) add up instead of
    # losing to the noise maximum of a good image
    "mse_cos/max/sigma8": ("mse_cos", "max", 4, False, {"sigma": 8.0}),
    "mse_cos/max/sigma16": ("mse_cos", "max", 4, False, {"sigma": 16.0}),
    "mse_cos/top10%/sigma8": ("mse_cos", "topk", 4, False, {"sigma": 8.0, "topk": 0.1}),
    # The residual blended with the memory of good patches (``infer.distance_weight``, docs/design.md, "Design
    # notes"); chosen on Magnetic Tile by probe_memory.py, checked on one-class data with these.
    "mse_cos/max/memory0.8": ("mse_cos", "max", 4, False, {"distance_weight": 0.8}),
    "mse_cos/max/K1/memory0.9": ("mse_cos", "max", 1, False, {"distance_weight": 0.9}),
    "memory alone/max": ("mse_cos", "max", 1, False, {"distance_weight": 1.0}),
    "mahalanobis/topk/memory0.5": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.5}),
    "mahalanobis/topk/memory0.8": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.8}),
    "mahalanobis/topk/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9}),
    "mahalanobis/topk/memory0.95": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.95}),
    "memory alone/topk": ("mahalanobis", "topk", 4, False, {"distance_weight": 1.0}),
    # the blend `lowres` keeps, with other image scores and smoothing (one-class data)
    "mahalanobis/max/memory0.9": ("mahalanobis", "max", 4, False, {"distance_weight": 0.9}),
    "mahalanobis/top3%/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "topk": 0.03}),
    "mahalanobis/top5%/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "topk": 0.05}),
    "mahalanobis/top20%/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "topk": 0.2}),
    "mahalanobis/top30%/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "topk": 0.3}),
    "mahalanobis/top40%/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "topk": 0.4}),
    "mahalanobis/top50%/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "topk": 0.5}),
    "mahalanobis/top70%/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "topk": 0.7}),
    "mahalanobis/mean/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "topk": 1.0}),
    "memory alone/top30%": ("mahalanobis", "topk", 4, False, {"distance_weight": 1.0, "topk": 0.3}),
    "mahalanobis/topk/sigma0.5/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "sigma": 0.5}),
    "mahalanobis/topk/sigma2/memory0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "sigma": 2.0}),
    # the gated blend (the default preset's since 344ec6e, chosen on Magnetic Tile's mt_val)
    "mahalanobis/topk/gated0.8": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.8, "blend": "gated"}),
    "mahalanobis/topk/gated0.9": ("mahalanobis", "topk", 4, False, {"distance_weight": 0.9, "blend": "gated"}),
}


# --------------------------------------------------------------------------------------
# Synthetic defects (Magnetic Tile validation)
# --------------------------------------------------------------------------------------


#: The kinds :func:`synthetic_defect` paints, in the order of its random draw.
SYNTHETIC_KINDS = ("dark_blob", "bright_blob", "crack", "uneven")


def synthetic_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """Paint one subtle defect on a uint8 RGB image; returns (defective image, bool mask, kind).

    Four kinds, chosen uniformly, loosely after Magnetic Tile's defect types: a small dark
    soft blob (blowhole), a small bright soft blob, a thin dark polyline (crack) and a large,
    heavily blurred shading change (uneven). Contrasts are moderate (15-60 %) on purpose:
    with strong ones every recipe and the kNN scored 1.000, which ranks nothing; with
    10-35 % the kNN fell to 0.63. These give a kNN with a random 10 % bank 0.82 image AUROC
    (0.89 on the real test defects), i.e. a comparable difficulty.
    The mask is the painted region before blurring; the kind (one of :data:`SYNTHETIC_KINDS`)
    lets the ablation report each kind on its own, since extended defects (crack, uneven) are
    where ST-MAE trails the kNN on the real test set.
    """
    h, w = image.shape[:2]
    side = min(h, w)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    kind = int(rng.integers(4))
    blur = max(1.0, 0.004 * side)
    if kind in (0, 1):
        rx, ry = rng.uniform(0.02, 0.06, 2) * side
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        factor = rng.uniform(0.45, 0.7) if kind == 0 else rng.uniform(1.3, 1.6)
    elif kind == 2:
        x, y = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        angle = rng.uniform(0, 2 * np.pi)
        points = [(x, y)]
        for _ in range(int(rng.integers(3, 7))):
            angle += rng.normal(0, 0.5)
            step = rng.uniform(0.02, 0.06) * side
            x, y = x + step * np.cos(angle), y + step * np.sin(angle)
            points.append((x, y))
        draw.line(points, fill=255, width=max(2, int(0.01 * side)))
        factor = rng.uniform(0.4, 0.65)
    else:
        rx, ry = rng.uniform(0.1, 0.2, 2) * side
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        factor = rng.choice([rng.uniform(0.7, 0.85), rng.uniform(1.15, 1.3)])
        blur = 0.04 * side
    soft = np.asarray(canvas.filter(ImageFilter.GaussianBlur(blur)), np.float32)[..., None] / 255
    mask = np.asarray(canvas) > 127
    f = image.astype(np.float32)
    return np.clip(f * (1 - soft) + f * factor * soft, 0, 255).astype(np.uint8), mask, SYNTHETIC_KINDS[kind]


def long_crack_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """Paint one long, thin, faint crack; returns (defective image, bool mask, ``"long_crack"``).

    Why a second painter: :func:`synthetic_defect`'s cracks are short (15-90 px at 256 px)
    and dark (35-60 % darker), and on them ST-MAE matches the kNN, while on the real cracks
    it trails by 0.15 image AUROC. One suspected cause is that a crack running through many
    tokens is reconstructed from visible tokens on the same crack. These cracks are built to
    probe that: a wandering polyline of 35-80 % of the image side, 1-2 px wide, 15-40 %
    darker. They were designed from the defect's description, not from test images.
    """
    h, w = image.shape[:2]
    length = rng.uniform(0.35, 0.8) * min(h, w)
    segments = int(rng.integers(6, 12))
    angle = rng.uniform(0, 2 * np.pi)
    # Start so that the crack's straight-line extent stays inside the image.
    x = w / 2 - 0.4 * length * np.cos(angle) + rng.uniform(-0.1, 0.1) * w
    y = h / 2 - 0.4 * length * np.sin(angle) + rng.uniform(-0.1, 0.1) * h
    return (*_paint_crack(image, rng, (x, y), angle, length, segments, 0.35), "long_crack")


def edge_crack_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """Paint one thin, faint crack that starts at an image edge; kind ``"edge_crack"``.

    Why: the other painters keep defects 15-85 % into the image, where the reconstruction
    has context on every side. A patch at the border has less context, so its residual on
    good images is higher, and a defect there has to stand out against that. Cracks are
    drawn from a random edge inward, 10-35 % of the side long, 1-2 px wide, 20-50 % darker.
    Designed after looking at four real test cracks (no metric of them), which reached the
    border; settings chosen on this probe carry that caveat (docs/research.md, "Probing the crack gap").
    """
    h, w = image.shape[:2]
    edge = int(rng.integers(4))  # 0 top, 1 bottom, 2 left, 3 right
    along = rng.uniform(0.1, 0.9)
    x, y = [(along * w, 0.0), (along * w, h - 1.0), (0.0, along * h), (w - 1.0, along * h)][edge]
    inward = [np.pi / 2, -np.pi / 2, 0.0, np.pi][edge] + rng.normal(0, 0.4)
    length = rng.uniform(0.1, 0.35) * min(h, w)
    return (*_paint_crack(image, rng, (x, y), inward, length, int(rng.integers(3, 7)), 0.3, (0.5, 0.8)),
            "edge_crack")


def _paint_crack(image: np.ndarray, rng: np.random.Generator, start: tuple[float, float], angle: float,
                 length: float, segments: int, wander: float,
                 factors: tuple[float, float] = (0.6, 0.85)) -> tuple[np.ndarray, np.ndarray]:
    """A 1-2 px dark polyline from ``start``: ``segments`` steps of ``length / segments``, the
    heading turning by N(0, ``wander``) rad per step; returns (image, bool mask)."""
    h, w = image.shape[:2]
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    x, y = start
    points = [(x, y)]
    step = length / segments
    for _ in range(segments):
        angle += rng.normal(0, wander)
        x, y = float(np.clip(x + step * np.cos(angle), 0, w - 1)), float(np.clip(y + step * np.sin(angle), 0, h - 1))
        points.append((x, y))
    draw.line(points, fill=255, width=int(rng.integers(1, 3)))
    factor = rng.uniform(*factors)
    soft = np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.5)), np.float32)[..., None] / 255
    mask = np.asarray(canvas) > 127
    f = image.astype(np.float32)
    return np.clip(f * (1 - soft) + f * factor * soft, 0, 255).astype(np.uint8), mask


#: Validation defect painter per Magnetic Tile protocol.
PAINTERS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray, str]]] = {
    "mt": synthetic_defect,
    "mt_extended": long_crack_defect,
    "mt_edge": edge_crack_defect,
}


# --------------------------------------------------------------------------------------
# Data: (train samples, validation samples, validation masks or None) per "task"
# --------------------------------------------------------------------------------------


def oneclass_tasks(name: str, classes: Sequence[int], train_limit: int, val: int) -> list[tuple[str, "Task"]]:
    spec = PROTOCOLS[name]
    tasks = []
    for c in classes:
        ds = load_oneclass(spec["kind"], data_path(spec), c, train_limit=train_limit, validation=val, seed=0)
        tasks.append((str(c), Task(ds.train, ds.test)))
    return tasks


def mt_training_indices(n: int) -> list[int]:
    """The 200-image protocol's training subset of ``train/good`` (seed 42): the quality
    benchmark's own subsampling (``baseline_knn.subsample_indices``), so the two never drift."""
    return _knn_module().subsample_indices(n, 200, 42)


def mt_real_task(image_size: int) -> list[tuple[str, Any]]:
    """The 200-image training subset; validation on ``mt_val``, the real-defect half of the test split.

    Unlike the painted protocols this validates on Magnetic Tile's own defects (with their
    masks); ``mt_test``, the other half, is left for reporting and never read here.
    """
    ds = load_mvtec(data_path(PROTOCOLS["mt_real"]))
    val = split_real_defects(ds.test, seed=0)["mt_val"]
    masks = np.stack([mask_at(s, image_size) for s in val])
    train = [ds.train[i] for i in mt_training_indices(len(ds.train))]
    return [("magnetic_tile", Task(train, val, masks))]


def mt_task(image_size: int, n_val: int, painter: Callable[..., Any] = synthetic_defect) -> list[tuple[str, Any]]:
    """The 200-image protocol's training subset; validation from the other train/good images.

    ``painter`` draws the validation defects (:data:`PAINTERS`); the images it paints on and
    the good half are the same whichever painter it is.
    """
    ds = load_mvtec(data_path(PROTOCOLS["mt"]))
    train = ds.train
    chosen = mt_training_indices(len(train))
    unused = np.setdiff1d(np.arange(len(train)), chosen)
    rng = np.random.default_rng(7)
    picked = rng.choice(unused, 2 * (n_val // 2), replace=False)
    good = [train[int(i)] for i in picked[: n_val // 2]]
    defective, masks = [], [np.zeros((image_size, image_size), bool) for _ in good]
    for i in picked[n_val // 2 :]:
        img, mask, kind = painter(resize_image(train[int(i)].load_image(), image_size), rng)
        defective.append(Sample(path=None, label=1, defect_type=kind, array=img, name=f"synthetic/{i}"))
        masks.append(mask)
    return [("magnetic_tile", Task([train[int(i)] for i in chosen], good + defective, np.stack(masks)))]


class Task:
    """Training samples, validation samples and (MT only) validation masks at the input size."""

    def __init__(self, train: list[Sample], test: list[Sample], masks: np.ndarray | None = None) -> None:
        self.train, self.test, self.masks = train, test, masks


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def _knn_module() -> Any:
    """The kNN yardstick (:mod:`stmae_research.knn`)."""
    from stmae_research import knn

    return knn


class FeatureCache:
    """Features per (feature settings, task, split): training variants that only change the
    transformer reuse them. Holds one backbone at a time."""

    def __init__(self) -> None:
        self.store: dict[tuple, torch.Tensor] = {}
        self._extractor: tuple[tuple, Any] | None = None

    @staticmethod
    def feature_key(cfg: Config, knobs: Knobs = Knobs()) -> tuple[str, str, str]:
        """Everything that decides the features (and their statistics): the whole ``backbone``
        and ``features`` sections, so a new feature setting cannot be missed by the cache,
        and the feature knobs (pad, standardize)."""
        return repr(cfg.backbone), repr(cfg.features), repr((knobs.pad, knobs.standardize))

    def extractor(self, cfg: Config, knobs: Knobs = Knobs()) -> Any:
        """The frozen extractor for ``cfg`` (built once, replaced when the feature settings change)."""
        fkey = self.feature_key(cfg, knobs)
        if self._extractor is None or self._extractor[0] != fkey:
            self._extractor = (fkey, variants.build_extractor(cfg, knobs).eval())
        return self._extractor[1]

    def get(self, cfg: Config, task: str, split: str, samples: Sequence[Sample],
            knobs: Knobs = Knobs()) -> torch.Tensor:
        key = (*self.feature_key(cfg, knobs), task, split)
        if key not in self.store:
            self.store[key] = extract_features(self.extractor(cfg, knobs), samples, cfg.features.image_size, quiet=True)
        return self.store[key]


def per_type_auroc(labels: np.ndarray, types: np.ndarray | None, scores: np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type against all good images ({} when there is one type or none)."""
    if types is None:
        return {}
    kinds = sorted({str(t) for t, y in zip(types, labels) if y == 1})
    if len(kinds) < 2:
        return {}
    good = labels == 0
    return {k: auroc(labels[good | (types == k)], scores[good | (types == k)]) for k in kinds}


def validation_row(labels: np.ndarray, types: np.ndarray | None, masks: np.ndarray | None,
                   maps: torch.Tensor, scores: torch.Tensor) -> dict[str, Any]:
    """One cell of the study: image AUROC, pixel AUROC (with masks) and per-type AUROC (if several)."""
    row: dict[str, Any] = {"image_auroc": auroc(labels, scores.numpy())}
    if masks is not None:
        row["pixel_auroc"] = auroc(masks.ravel(), maps.numpy().ravel())
    if per_type := per_type_auroc(labels, types, scores.numpy()):
        row["per_type"] = per_type
    return row


def score_variants(det: Detector, train_feats: torch.Tensor, val_feats: torch.Tensor, labels: np.ndarray,
                   masks: np.ndarray | None, scorings: Sequence[str],
                   types: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """The named scoring variants on one trained detector -> {variant: :func:`validation_row`}.

    Variants with ``memory`` > 0 build the detector's memory bank on the training features and
    take its medians from them too: the study trains on every training image and holds none
    out (``stmae fit`` takes the medians from held-out images).
    """
    out: dict[str, dict[str, Any]] = {}
    base_infer = copy.deepcopy(det.config.infer)
    residual_stats: dict[int, Any] = {}  # per K: the same statistics serve every score variant
    memories: dict[tuple[str, int], Any] = {}  # per residual and K: the medians depend on both
    for name in scorings:
        residual, score, pairs, posnorm, *extra = SCORING_VARIANTS[name]
        det.config.infer = copy.deepcopy(base_infer)
        for key, value in (extra[0] if extra else {}).items():
            setattr(det.config.infer, key, value)
        det.config.infer.residual, det.config.infer.score, det.config.infer.num_pairs = residual, score, pairs
        if residual == "mahalanobis" and pairs not in residual_stats:
            residual_stats[pairs] = fit_residual_stats(det.pipeline, train_feats)
        det.residual_stats = residual_stats.get(pairs) if residual == "mahalanobis" else None
        det.memory = None
        if det.config.infer.distance_weight > 0:
            if (residual, pairs) not in memories:
                memories[(residual, pairs)] = fit_memory(det.pipeline, train_feats, train_feats, seed=det.config.train.seed)
            det.memory = memories[(residual, pairs)]
        grid_val = torch.cat([stage.grid_maps(det, det.stats.apply(c)) for c in torch.split(val_feats, 64)])
        if posnorm:
            grid_train = torch.cat([stage.grid_maps(det, det.stats.apply(c)) for c in torch.split(train_feats, 64)])
            grid_val = (grid_val - grid_train.mean(0)) / grid_train.std(0).clamp_min(1e-6)
        maps, scores = stage.postprocess(det, grid_val)
        out[name] = validation_row(labels, types, masks, maps, scores)
    det.config.infer = base_infer
    det.memory = None
    return out


def coreset_bank(standardised_train: torch.Tensor) -> torch.Tensor:
    """The kNN yardstick's memory: a greedy 10 % coreset (seed 42) of the training patches (B, C)."""
    return PatchMemory.fit(standardised_train, 0.1, seed=42).bank


def knn_scores(cfg: Config, stats: FeatureStats, train_feats: torch.Tensor, val_feats: torch.Tensor,
               labels: np.ndarray, masks: np.ndarray | None, knn: Any,
               types: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """kNN yardstick (greedy 10 % coreset) on the same cached, standardised features; max and top-k."""
    bank = coreset_bank(stats.apply(train_feats))
    g = cfg.features.grid_size
    dist = knn.nearest_distances(knn.patch_rows(stats.apply(val_feats)), bank).view(len(val_feats), g, g)
    out = {}
    for score in ("max", "topk"):
        c = copy.deepcopy(cfg)
        c.infer.score = score
        maps, scores = knn.anomaly_maps(dist, c)
        out[f"knn/{score}"] = validation_row(labels, types, masks, maps, scores)
    return out


def protocol_config(spec: dict[str, Any], epochs: int | None = None) -> Config:
    """A protocol's base config: its preset, its pinned ``base`` overrides, its (or the given)
    reduced epochs, on the CPU. Shared by the ablation and the probe scripts."""
    return make_config(spec["preset"], {**spec["base"], "train.epochs": epochs or spec["epochs"], "train.device": "cpu"})


def resolve_variant(base: Config, overrides: dict[str, Any]) -> tuple[Config, Knobs] | None:
    """A variant's (config, research knobs): the base config with its config overrides, and
    its ablation-only switches (:meth:`Knobs.split`); None when the variant is a no-op here."""
    settings, knobs = Knobs.split(overrides)
    values = {}
    for key, value in settings.items():
        if isinstance(value, str) and value.startswith("x") and key == "train.epochs":
            value = base.train.epochs * int(value[1:])
        values[key] = value
    cfg = make_config(base, values)
    knobs.validate(cfg)
    if overrides and cfg.to_dict() == base.to_dict() and knobs == Knobs():
        return None
    return cfg, knobs


def run_variant(name: str, variant: tuple[Config, Knobs], tasks: list[tuple[str, Any]], cache: FeatureCache,
                knn: Any, log: Callable[[str], None], scorings: Sequence[str],
                with_knn: bool = False) -> dict[str, Any]:
    """Train ``variant`` (:func:`resolve_variant`) on every task and score it; ``with_knn``
    adds the kNN yardstick on its features."""
    cfg, knobs = variant
    per_task: dict[str, Any] = {}
    started = time.perf_counter()
    for task_name, task in tasks:
        train_feats = cache.get(cfg, task_name, "train", task.train, knobs)
        val_feats = cache.get(cfg, task_name, "val", task.test, knobs)
        labels = np.array([s.label for s in task.test])
        types = np.array([s.defect_type if s.label else "good" for s in task.test])
        masks = task.masks
        stats = variants.feature_stats(train_feats, knobs)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, train_feats.shape[1])
        t0 = time.perf_counter()
        losses = variants.train(model, stats.apply(train_feats), cfg, knobs, torch.device("cpu"))
        train_s = time.perf_counter() - t0
        det = variants.detector(cache.extractor(cfg, knobs), model, stats, cfg, knobs)
        rows = score_variants(det, train_feats, val_feats, labels, masks, scorings, types)
        if with_knn:
            rows.update(knn_scores(cfg, stats, train_feats, val_feats, labels, masks, knn, types))
        per_task[task_name] = {"scores": rows, "train_seconds": round(train_s, 1), "final_loss": losses[-1]}
        best = max(((k, v) for k, v in rows.items() if not k.startswith("knn/")), key=lambda kv: kv[1]["image_auroc"])
        log(f"    {name} / {task_name}: train {train_s:.0f} s; best {best[0]} {best[1]['image_auroc']:.3f}")
    return {"config": cfg.to_dict(), "knobs": knobs.changed(), "per_task": per_task,
            "seconds": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def common_means(results: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, dict[str, float]]]]:
    """Means over the tasks (classes) that every training variant ran, so rows compare alike."""
    variants = results["variants"]
    common = sorted(set.intersection(*(set(r["per_task"]) for r in variants.values())), key=str)
    means = {}
    for name, row in variants.items():
        keys = next(iter(row["per_task"].values()))["scores"].keys()
        means[name] = {
            k: {m: float(np.mean([row["per_task"][t]["scores"][k][m] for t in common]))
                for m, v in row["per_task"][common[0]]["scores"][k].items() if not isinstance(v, dict)}
            for k in keys
        }
    return common, means


def per_type_lines(results: dict[str, Any], common: Sequence[str]) -> list[str]:
    """Markdown table of image AUROC per defect kind (mean over the ``common`` tasks that have it).

    A kind may be missing from some tasks: in a one-class study the kinds are the other
    classes, so a task's own normal class is never one of its kinds.
    """
    rows = []
    for name, row in results["variants"].items():
        for scoring, cell in row["per_task"][common[0]]["scores"].items():
            if "per_type" in cell:
                per_task = [row["per_task"][t]["scores"][scoring].get("per_type", {}) for t in common]
                kinds = dict.fromkeys(k for p in per_task for k in p)
                rows.append((name, scoring, {k: float(np.mean([p[k] for p in per_task if k in p])) for k in kinds}))
    if not rows:
        return []
    kinds = sorted({k for *_, v in rows for k in v})
    lines = ["", "Image AUROC per defect kind, painted or real (each kind against all good validation images):", "",
             "| training variant | scoring | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 2)]
    for name, scoring, values in rows:
        lines.append(f"| {name} | {scoring} | " + " | ".join(
            f"{values[k]:.3f}" if k in values else "" for k in kinds) + " |")
    return lines


def render(results: dict[str, Any]) -> str:
    """Markdown: one row per training variant, columns = scoring variants (image AUROC)."""
    variants = results["variants"]
    if not variants:
        return "(no rows)\n"
    common, means = common_means(results)
    scorings = [k for k in SCORING_VARIANTS if any(k in m for m in means.values())]
    pixel = any("pixel_auroc" in v for m in means.values() for v in m.values())
    lines = [
        f"# Ablation: {results['protocol']} (validation data only)",
        "",
        results["description"],
        "",
        "Mean image AUROC" + (" / pixel AUROC" if pixel else "") + f" over the tasks every row ran "
        f"({', '.join(common)}); rows = training variants (overrides of the base config), columns = scoring "
        "variants (residual / image score / K split pairs / per-position normalisation); blank = not run. "
        "Bold = best cell of the row.",
        "",
    ]
    head = ["training variant", "overrides", *scorings, "train s (mean)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in variants.items():
        mine = {k: v for k, v in means[name].items() if not k.startswith("knn/")}
        best = max(m["image_auroc"] for m in mine.values())
        cells = []
        for s in scorings:
            m = mine.get(s)
            if m is None:
                cells.append("")
                continue
            text = f"{m['image_auroc']:.3f}" + (f" / {m['pixel_auroc']:.3f}" if "pixel_auroc" in m else "")
            cells.append(f"**{text}**" if m["image_auroc"] == best else text)
        train_s = np.mean([row["per_task"][t]["train_seconds"] for t in common])
        overrides = ", ".join(f"{k}={v}" for k, v in TRAIN_VARIANTS.get(name, {}).items()) or "-"
        lines.append(f"| {name} | {overrides} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    for name in variants:
        knn = {k: v for k, v in means[name].items() if k.startswith("knn/")}
        if not knn:
            continue
        where = "the same validation data and tasks" if name == "base" else f"the features of `{name}`"
        lines += ["", f"kNN yardstick (greedy 10 % coreset) on {where}: " + "; ".join(
            f"{k} {v['image_auroc']:.3f}" + (f" / {v['pixel_auroc']:.3f}" if "pixel_auroc" in v else "")
            for k, v in knn.items())]
    lines += per_type_lines(results, common)
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), required=True)
    p.add_argument("--variants", default="base", help="comma list of " + ", ".join(TRAIN_VARIANTS))
    p.add_argument("--scoring", default="all",
                   help="scoring variants to run: all, or a comma list of "
                   + ", ".join(SCORING_VARIANTS).replace("%", "%%"))  # argparse %-formats help
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="one-class protocols: normal classes")
    p.add_argument("--train-limit", type=int, default=150, help="one-class: training images per class")
    p.add_argument("--val", type=int, default=None,
                   help="validation images per class (mt: good + synthetic); default: the protocol's (160 / 400)")
    p.add_argument("--epochs", type=int, default=None, help="base epochs (default: the protocol's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_ROOT,
                   help="folder holding magnetic_tile/, fashion_mnist/, mnist_5k/ (default: ../shared/data)")
    return p.parse_args(argv)


def probe_main(argv: Sequence[str] | None, doc: str, variants: Sequence[str], default_out: Path,
               run: Callable[..., dict[str, Any]], render: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """The command line shared by the probe scripts: ``--variants``, ``--threads``, ``--out``.

    Checks the variant names, runs ``run(names, out, log)`` and prints ``render`` of the result.
    """
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--variants", default="base", help="comma list of " + ", ".join(variants))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=default_out)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_ROOT,
                   help="folder holding magnetic_tile/ (default: ../shared/data)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if unknown := [n for n in names if n not in variants]:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(variants)}")
    torch.set_num_threads(args.threads)
    set_data_root(args.data)
    results = run(names, args.out, lambda m: print(m, flush=True))
    print(render(results))
    return results


def mergeable_variants(path: Path, setup: dict[str, Any], current: dict[str, Any] | None = None) -> dict[str, Any]:
    """The rows already in ``path``, if they were run on the same validation setup by the
    same code (``current``: this call's provenance; every kept row must have the same commit
    and a clean tree, :func:`stmae_research.provenance.same_code`).

    Why refuse rather than merge: rows scored on other validation images (``--val``), another
    base schedule (``--epochs``) or another training size are not comparable, and one table
    would silently mix them under the newest run's description. Rows made by other code
    would make a table that no single commit reproduces.
    """
    existing = json.loads(path.read_text())
    if current is not None:
        for name, row in existing.get("variants", {}).items():
            try:
                require_same_code(row.get("provenance"), current, f"{path}: row {name!r}")
            except ProvenanceError as exc:
                raise SystemExit(f"error: {exc}") from None
    recorded = existing.get("setup", setup)
    differs = {k: (recorded.get(k), v) for k, v in setup.items() if recorded.get(k) != v}
    if differs:
        detail = ", ".join(f"{k}: recorded {old}, now {new}" for k, (old, new) in differs.items())
        raise SystemExit(f"{path}: its rows were run on another setup ({detail}); "
                         "pass the recorded settings or another --out")
    return existing.get("variants", {})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_data_root(args.data)
    spec = PROTOCOLS[args.protocol]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in TRAIN_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(TRAIN_VARIANTS)}")
    scorings = list(SCORING_VARIANTS) if args.scoring == "all" else [s.strip() for s in args.scoring.split(",")]
    unknown = [n for n in scorings if n not in SCORING_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown scoring variant(s) {unknown}; choose from {', '.join(SCORING_VARIANTS)}")
    base = protocol_config(spec, args.epochs)
    args.val = args.val or spec["val"]
    setup: dict[str, Any] = {"val": args.val, "epochs": base.train.epochs}
    if args.protocol == "mt_real":
        tasks = mt_real_task(base.features.image_size)
        setup["val"] = len(tasks[0][1].test)
        description = (f"Magnetic Tile: train on the 200-image protocol's subset (seed 42); validate on mt_val, "
                       f"the real-defect half of the test split ({setup['val']} images, "
                       "stmae_research.protocols.split_real_defects, seed 0; mt_test is not read). "
                       f"Base: `{spec['preset']}` preset, {base.train.epochs} epochs, CPU 1 thread (reduced).")
    elif args.protocol in PAINTERS:
        tasks = mt_task(base.features.image_size, args.val, PAINTERS[args.protocol])
        description = (f"Magnetic Tile: train on the 200-image protocol's subset (seed 42); validate on "
                       f"{args.val // 2} other train/good images + {args.val // 2} with {spec['defect']} each. "
                       f"Base: `{spec['preset']}` preset, {base.train.epochs} epochs, CPU 1 thread (reduced).")
    else:
        setup["train_limit"] = args.train_limit
        classes = [int(c) for c in args.classes.split(",")]
        tasks = oneclass_tasks(args.protocol, classes, args.train_limit, args.val)
        description = (f"{spec['kind']} one-class on the training split only: {args.train_limit} training images "
                       f"per class, {args.val} other training-split images as validation; classes {classes}. "
                       f"Base: `{spec['preset']}` preset with {spec['base'] or 'no changes'}, {base.train.epochs} epochs, "
                       "CPU 1 thread (reduced).")
    out = args.out or RESULTS_DIR / f"ablation_{args.protocol}.json"
    results: dict[str, Any] = {"protocol": args.protocol, "description": description, "setup": setup, "variants": {}}
    if out.exists():
        results["variants"] = mergeable_variants(out, setup, provenance.collect("cpu"))
    cache, knn = FeatureCache(), _knn_module()
    for name in names:
        variant = resolve_variant(base, TRAIN_VARIANTS[name])
        if variant is None:
            print(f"{name}: same as base for this protocol, skipped", flush=True)
            continue
        print(f"{name}:", flush=True)
        started = time.time()
        # The kNN sees only the features: re-run it where a variant changes them, so a feature
        # change is judged against the yardstick on the same features, not only against base.
        with_knn = name == "base" or cache.feature_key(*variant) != cache.feature_key(base)
        row = run_variant(name, variant, tasks, cache, knn, lambda m: print(m, flush=True), scorings, with_knn)
        row["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row["provenance"] = provenance.collect("cpu", started=started)
        results["variants"][name] = row
        results["provenance"] = row["provenance"]  # the latest call; each row keeps its own
        atomic_write_json(out, results)
        atomic_write_text(out.with_suffix(".md"), render(results))
    print(render(results))
    return results


if __name__ == "__main__":
    main()
