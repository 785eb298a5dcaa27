"""MVTec AD layout, also used by MPDD and by any data set repacked to it.

::

    <category>/train/good/*.png
    <category>/test/good/*.png                      (no masks)
    <category>/test/<defect>/*.png
    <category>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

from pathlib import Path

from ._tree import RequireMasks, TreeLayout, load_tree
from .base import AnomalyDataset
from .io import DEFAULT_MAX_PIXELS

__all__ = ["load_mvtec", "MVTEC_LAYOUT"]

MVTEC_LAYOUT = TreeLayout(
    kind="MVTec AD-style",
    normal_dir="good",
    # "<stem>_mask" is the MVTec/MPDD convention; a bare "<stem>" is accepted because
    # hand-made copies of the layout often drop the suffix.
    mask_suffixes=("_mask", ""),
    description=(
        "  <category>/train/good/*.png                  normal training images\n"
        "  <category>/test/good/*.png                   normal test images (optional)\n"
        "  <category>/test/<defect>/*.png               defective test images\n"
        "  <category>/ground_truth/<defect>/<stem>_mask.png   masks (optional as a whole)"
    ),
)


def load_mvtec(
    category_dir: str | Path,
    *,
    require_masks: RequireMasks = "auto",
    verify: bool = False,
    skip_unreadable: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> AnomalyDataset:
    """Load one MVTec AD-style category (MVTec AD, MPDD, ...).

    Args:
        category_dir: the category folder, e.g. ``.../mvtec_anomaly_detection/bottle``.
        require_masks: ``"auto"`` (default) requires a mask for every defect image when
            ``ground_truth/`` exists and otherwise loads without masks (``has_masks``
            False, pixel metrics skipped); ``True`` always requires them; ``False``
            attaches the masks it finds and never complains.
        verify: decode every image and mask up front to find unreadable files.
        skip_unreadable: drop unreadable files (listed in ``skipped``) instead of
            raising; implies ``verify``.
        max_pixels: largest image accepted, in pixels, checked from the file header
            (:data:`stmae.data.io.DEFAULT_MAX_PIXELS`; None: PIL's own limit only).

    Raises:
        DataError: missing folder, empty training split, defect image without mask,
            unreadable file.
    """
    return load_tree(
        category_dir, MVTEC_LAYOUT, require_masks=require_masks, verify=verify, skip_unreadable=skip_unreadable,
        max_pixels=max_pixels,
    )
