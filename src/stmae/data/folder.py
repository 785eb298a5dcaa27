"""Plain folders of images: the quickest way to bring one's own data.

::

    good_dir/*.png        normal images -> train (or all of train, when test_good_dir is given)
    test_good_dir/*.png   optional normal test images
    bad_dir/*.png         optional defective test images (defect type = folder name)
    mask_dir/<stem>.png or <stem>_mask.png   optional masks for bad_dir
"""

from __future__ import annotations

from pathlib import Path

from ._masks import match_masks, missing_masks_error
from .base import NORMAL_TYPE, AnomalyDataset, Sample, build_dataset
from .io import DEFAULT_MAX_PIXELS, require_dir, require_images

__all__ = ["load_folder", "FOLDER_LAYOUT"]

FOLDER_LAYOUT = (
    "  good_dir/*.png              normal images (training)\n"
    "  test_good_dir/*.png         normal test images (optional)\n"
    "  bad_dir/*.png               defective test images (optional)\n"
    "  mask_dir/<stem>.png or <stem>_mask.png   one mask per defective image (optional)"
)
# A bare stem first: in a dedicated mask folder, masks are most often named like their image.
_MASK_SUFFIXES = ("", "_mask")


def _normal_samples(folder: Path, what: str) -> list[Sample]:
    images = require_images(folder, what=what, layout=FOLDER_LAYOUT)
    return [Sample(path=p, label=0, defect_type=NORMAL_TYPE, name=f"{folder.name}/{p.name}") for p in images]


def _defect_samples(bad_dir: Path, mask_dir: Path | None) -> list[Sample]:
    images = require_images(bad_dir, what="Folder of defective images", layout=FOLDER_LAYOUT)
    masks: list[Path | None] = [None] * len(images)
    if mask_dir is not None:
        require_dir(mask_dir, what="Mask folder", layout=FOLDER_LAYOUT)
        masks, missing = match_masks(images, mask_dir, _MASK_SUFFIXES)
        if missing:
            fix = "Add the missing masks, or leave out mask_dir to evaluate image-level metrics only."
            raise missing_masks_error(missing, mask_dir, fix)
    defect = bad_dir.resolve().name
    return [
        Sample(path=p, label=1, defect_type=defect, mask_path=m, name=f"{defect}/{p.name}")
        for p, m in zip(images, masks)
    ]


def load_folder(
    good_dir: str | Path,
    bad_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    *,
    test_good_dir: str | Path | None = None,
    name: str | None = None,
    verify: bool = False,
    skip_unreadable: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> AnomalyDataset:
    """Build a dataset from plain folders (non-recursive).

    All of ``good_dir`` is used for training; normal test images only come from
    ``test_good_dir``, so no image is ever both trained on and scored. Defective images
    get ``defect_type`` = the name of ``bad_dir``. When ``mask_dir`` is given every
    defective image must have a mask there. ``name`` defaults to ``good_dir``'s name.

    Raises:
        DataError: missing or empty folder, defect image without mask, unreadable
            file (see ``verify`` / ``skip_unreadable`` in :func:`stmae.data.load_mvtec`).
    """
    good = Path(good_dir)
    train = _normal_samples(good, "Folder of normal images")
    test: list[Sample] = []
    if test_good_dir is not None:
        test += _normal_samples(Path(test_good_dir), "Folder of normal test images")
    if bad_dir is not None:
        test += _defect_samples(Path(bad_dir), Path(mask_dir) if mask_dir is not None else None)
    elif mask_dir is not None:
        raise ValueError("mask_dir was given without bad_dir; masks belong to defective images.")
    return build_dataset(
        name or good.resolve().name,
        good,
        train,
        test,
        verify=verify,
        skip_unreadable=skip_unreadable,
        max_pixels=max_pixels,
        train_location=str(good),
    )
