"""BTAD (beanTech Anomaly Detection) layout.

::

    <NN>/train/ok/*.bmp|png
    <NN>/test/ok/*.bmp|png                 (no masks)
    <NN>/test/ko/*.bmp|png
    <NN>/ground_truth/ko/<stem>.png|bmp

Mask naming checked against public loaders: anomalib's ``make_btech_dataset``
(openvinotoolkit/anomalib, src/anomalib/data/datasets/image/btech.py) expects
``ground_truth/<label>/<stem>.png`` after converting every ``.bmp`` to ``.png``, and the
original-data loaders used by several papers take ``<stem>.bmp`` for product 03 and
``<stem>.png`` for 01/02. Matching by stem with any image extension covers both.
"""

from __future__ import annotations

from pathlib import Path

from ._tree import RequireMasks, TreeLayout, load_tree
from .base import AnomalyDataset
from .io import DEFAULT_MAX_PIXELS

__all__ = ["load_btad", "BTAD_LAYOUT"]

BTAD_LAYOUT = TreeLayout(
    kind="BTAD",
    normal_dir="ok",
    mask_suffixes=("",),
    description=(
        "  <NN>/train/ok/*.bmp|png               normal training images\n"
        "  <NN>/test/ok/*.bmp|png                normal test images\n"
        "  <NN>/test/ko/*.bmp|png                defective test images\n"
        "  <NN>/ground_truth/ko/<stem>.png|bmp   masks"
    ),
)


def load_btad(
    category_dir: str | Path,
    *,
    require_masks: RequireMasks = True,
    verify: bool = False,
    skip_unreadable: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> AnomalyDataset:
    """Load one BTAD product folder (``01``, ``02`` or ``03``).

    Normal images get ``defect_type="good"`` like every other loader (BTAD calls them
    ``ok``); defective ones get their folder name (``ko``). Masks are required by
    default because every BTAD defect image is annotated; ``require_masks`` and the
    other options behave as in :func:`stmae.data.load_mvtec`.
    """
    return load_tree(
        category_dir, BTAD_LAYOUT, require_masks=require_masks, verify=verify, skip_unreadable=skip_unreadable,
        max_pixels=max_pixels,
    )
