"""VisA (Visual Anomaly) one-class protocol, read straight from the original archive layout.

::

    <root>/split_csv/1cls.csv            columns: object,split,label,image,mask
    <root>/<object>/Data/Images/Normal/0000.JPG
    <root>/<object>/Data/Images/Anomaly/000.JPG
    <root>/<object>/Data/Masks/Anomaly/000.png

``1cls.csv`` is the authoritative split (the 90/10 normal split exists nowhere else);
``label`` is ``normal`` or ``anomaly``, paths are relative to ``<root>`` and normal rows
have an empty ``mask``. Column order and names checked against anomalib's
``Visa.apply_cls1_split`` (openvinotoolkit/anomalib,
src/anomalib/data/datamodules/image/visa.py), which unpacks each row as
``object, split, label, image, mask``. VisA masks are not 0/255 (anomalib binarises
them with ``!= 0``); :func:`stmae.data.read_mask` already thresholds at ``> 0``.
1cls.csv carries no per-image defect name, so anomalies get ``defect_type="anomaly"``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .base import NORMAL_TYPE, AnomalyDataset, Sample, build_dataset
from .io import DEFAULT_MAX_PIXELS, DataError, require_dir

__all__ = ["load_visa", "VISA_LAYOUT"]

VISA_LAYOUT = (
    "  <root>/split_csv/1cls.csv      columns object,split,label,image,mask (paths relative to <root>)\n"
    "  <root>/<object>/Data/Images/...  images\n"
    "  <root>/<object>/Data/Masks/...   masks of the anomalous images"
)
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}
_SPLITS = ("train", "test")
_ANOMALY_TYPE = "anomaly"


def _read_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` pairs with whitespace stripped; validates the header."""
    if not csv_path.is_file():
        raise DataError(
            f"VisA split file {csv_path} not found. It ships in the VisA archive as split_csv/1cls.csv; "
            f"pass the folder that contains split_csv/ as root. Expected layout:\n{VISA_LAYOUT}"
        )
    # utf-8-sig: copies edited on Windows often gain a byte-order mark before "object".
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [c.strip() for c in reader.fieldnames or []]
        absent = [c for c in _COLUMNS if c not in header]
        if absent:
            raise DataError(f"{csv_path}: missing column(s) {absent}; found {header}, expected {list(_COLUMNS)}.")
        reader.fieldnames = header
        return [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}) for row in reader]


def _row_sample(csv_path: Path, line: int, row: dict[str, str], root: Path, category: str) -> Sample:
    """Turn one CSV row into a Sample, rejecting unknown labels, splits and anomalous train rows."""
    where = f"{csv_path}, line {line}"
    label = _LABELS.get(row["label"])
    if label is None:
        raise DataError(f"{where}: label {row['label']!r} is not one of {sorted(_LABELS)}.")
    if row["split"] not in _SPLITS:
        raise DataError(f"{where}: split {row['split']!r} is not one of {list(_SPLITS)}.")
    if label == 1 and row["split"] == "train":
        raise DataError(
            f"{where}: an anomalous image is listed in the train split; "
            "the one-class protocol trains on normal images only."
        )
    image = root / row["image"]
    mask = root / row["mask"] if (label == 1 and row["mask"]) else None
    name = row["image"].removeprefix(f"{category}/Data/Images/")
    defect = _ANOMALY_TYPE if label else NORMAL_TYPE
    return Sample(path=image, label=label, defect_type=defect, mask_path=mask, name=name)


def _check_files(samples: list[Sample], csv_path: Path) -> None:
    """Every referenced image must exist, and every anomaly must have an existing mask."""
    problems: list[str] = []
    for s in samples:
        assert s.path is not None
        if not s.path.is_file():
            problems.append(f"  image {s.path} does not exist")
        elif s.label == 1 and s.mask_path is None:
            problems.append(f"  defect image {s.path} has an empty mask column")
        elif s.mask_path is not None and not s.mask_path.is_file():
            problems.append(f"  defect image {s.path}: mask {s.mask_path} does not exist")
    if problems:
        shown = "\n".join(problems[:3]) + (f"\n  ... and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise DataError(
            f"{len(problems)} problem(s) with files listed in {csv_path}:\n{shown}\n"
            "Check that root is the folder that holds split_csv/ and the object folders, "
            "and that the archive was fully extracted."
        )


def load_visa(
    root: str | Path,
    category: str,
    *,
    verify: bool = False,
    skip_unreadable: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> AnomalyDataset:
    """Load one VisA object (e.g. ``"candle"``) using the official one-class split.

    Raises:
        DataError: missing root or split file, unknown category (the message lists the
            available ones), malformed rows, missing image or mask files, unreadable
            files (see ``verify`` / ``skip_unreadable`` in :func:`stmae.data.load_mvtec`).
    """
    base = require_dir(root, what="VisA root folder", layout=VISA_LAYOUT)
    csv_path = base / "split_csv" / "1cls.csv"
    rows = _read_rows(csv_path)
    mine = [(line, row) for line, row in rows if row["object"] == category]
    if not mine:
        available = sorted({row["object"] for _, row in rows})
        raise DataError(
            f"VisA category {category!r} not found in {csv_path}; available: {', '.join(available) or 'none'}."
        )
    samples = [_row_sample(csv_path, line, row, base, category) for line, row in mine]
    _check_files(samples, csv_path)
    splits = [row["split"] for _, row in mine]
    train = [s for s, split in zip(samples, splits) if split == "train"]
    test = [s for s, split in zip(samples, splits) if split == "test"]
    return build_dataset(
        category,
        base,
        train,
        test,
        verify=verify,
        skip_unreadable=skip_unreadable,
        max_pixels=max_pixels,
        train_location=f"{csv_path} (split=train)",
    )
