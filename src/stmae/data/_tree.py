"""Shared loader for "split/type/image" trees with a parallel ``ground_truth`` folder.

MVTec AD, MPDD and BTAD differ only in the name of the normal folder (``good`` vs
``ok``) and in how a mask is named after its image (``000_mask.png`` vs ``000.png`` /
``000.bmp``). Keeping one implementation means every such dataset gets the same
validation and the same error messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._masks import match_masks, missing_masks_error
from .base import NORMAL_TYPE, AnomalyDataset, Sample, build_dataset
from .io import DEFAULT_MAX_PIXELS, DataError, list_images, require_dir, require_images

RequireMasks = bool | Literal["auto"]


@dataclass(frozen=True)
class TreeLayout:
    """What distinguishes one tree-shaped dataset format from another."""

    kind: str  # human name used in messages, e.g. "MVTec AD-style"
    normal_dir: str  # folder holding normal images in train/ and test/
    mask_suffixes: tuple[str, ...]  # appended to an image stem to name its mask, tried in order
    description: str  # the expected folder layout, quoted in every error message


def _test_samples(test_dir: Path, layout: TreeLayout) -> list[tuple[str, list[Path]]]:
    """``(folder name, images)`` per non-empty type folder under ``test/``."""
    stray = list_images(test_dir)
    if stray:
        raise DataError(
            f"{len(stray)} images lie directly in {test_dir} (e.g. {stray[0].name}); test images must be in "
            f"one sub-folder per type ('{layout.normal_dir}' or a defect name). "
            f"Expected layout:\n{layout.description}"
        )
    groups = []
    for sub in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(sub)
        if images:
            groups.append((sub.name, images))
    if not groups:
        raise DataError(
            f"Test folder {test_dir} exists but holds no images. Remove it for a train-only "
            f"dataset, or fill it. Expected layout:\n{layout.description}"
        )
    return groups


def _normal_samples(folder: str, images: list[Path]) -> list[Sample]:
    return [Sample(path=p, label=0, defect_type=NORMAL_TYPE, name=f"{folder}/{p.name}") for p in images]


def _defect_samples(
    folder: str, images: list[Path], gt_dir: Path, layout: TreeLayout
) -> tuple[list[Sample], list[tuple[Path, Path]]]:
    """Anomalous samples of one defect type, plus ``(image, expected mask)`` for those without a mask."""
    masks, missing = match_masks(images, gt_dir / folder, layout.mask_suffixes)
    samples = [
        Sample(path=image, label=1, defect_type=folder, mask_path=mask, name=f"{folder}/{image.name}")
        for image, mask in zip(images, masks)
    ]
    return samples, missing


def load_tree(
    category_dir: str | Path,
    layout: TreeLayout,
    *,
    require_masks: RequireMasks = "auto",
    verify: bool = False,
    skip_unreadable: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> AnomalyDataset:
    """Load one category laid out as ``train/<normal>``, ``test/<type>``, ``ground_truth/<type>``.

    ``require_masks``: ``True`` - every defect image needs a mask; ``"auto"`` - the
    same, but only if ``ground_truth/`` exists (otherwise the dataset simply has no
    masks); ``False`` - attach masks where found, never complain. A missing ``test/``
    folder gives a train-only dataset (``test == []``).
    """
    what = f"{layout.kind} category folder"
    cat = require_dir(category_dir, what=what, layout=layout.description)
    train_dir = cat / "train" / layout.normal_dir
    train_paths = require_images(train_dir, what="Training folder", layout=layout.description)
    train = _normal_samples(layout.normal_dir, train_paths)

    gt_dir = cat / "ground_truth"
    strict = require_masks is True or (require_masks == "auto" and gt_dir.is_dir())
    test: list[Sample] = []
    missing: list[tuple[Path, Path]] = []
    test_dir = cat / "test"
    if test_dir.is_dir():
        for folder, images in _test_samples(test_dir, layout):
            if folder == layout.normal_dir:
                test += _normal_samples(folder, images)
            else:
                samples, misses = _defect_samples(folder, images, gt_dir, layout)
                test += samples
                missing += misses
    if missing and strict:
        fix = (
            "Add the masks, or pass require_masks=False to evaluate image-level metrics only. "
            f"Expected layout:\n{layout.description}"
        )
        raise missing_masks_error(missing, gt_dir, fix)
    return build_dataset(
        cat.resolve().name,
        cat,
        train,
        test,
        verify=verify,
        skip_unreadable=skip_unreadable,
        max_pixels=max_pixels,
        train_location=str(train_dir),
    )
