"""Recognise a dataset's layout from its folder, so users can just point at a path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import AnomalyDataset
from .btad import BTAD_LAYOUT, load_btad
from .folder import load_folder
from .io import DataError, list_images
from .mvtec import MVTEC_LAYOUT, load_mvtec
from .visa import load_visa

__all__ = ["open_dataset"]

_ACCEPTED = (
    "Accepted layouts:\n"
    "- MVTec AD / MPDD-style category folder:\n" + MVTEC_LAYOUT.description + "\n"
    "- BTAD product folder:\n" + BTAD_LAYOUT.description + "\n"
    "- VisA root (holding split_csv/1cls.csv), with category=<object>\n"
    "- a folder that directly contains images (train only)\n"
    "For separate good/defect folders use stmae.data.load_folder; for MNIST-style "
    "one-class protocols use stmae.data.load_oneclass."
)


def _category_hint(path: Path) -> str:
    """Name sub-folders that are themselves datasets: users often pass the dataset root."""
    subs = sorted(p.name for p in path.iterdir() if p.is_dir() and _detect(p) in ("mvtec", "btad"))
    if not subs:
        return ""
    listed = ", ".join(subs[:10]) + (", ..." if len(subs) > 10 else "")
    return f" It contains dataset categories ({listed}); pass one of them."


def _detect(path: Path) -> str | None:
    if (path / "train" / "good").is_dir():
        return "mvtec"
    if (path / "train" / "ok").is_dir():
        return "btad"
    if (path / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if list_images(path):
        return "folder"
    return None


def open_dataset(path: str | Path, **kw: Any) -> AnomalyDataset:
    """Open ``path`` with the loader its layout calls for; ``kw`` go to that loader.

    Detection order: MVTec-style (``train/good``), BTAD (``train/ok``), VisA
    (``split_csv/1cls.csv``; needs ``category=``), then a plain folder of images
    (train only).

    Raises:
        DataError: the path does not exist or matches no layout (the message lists the
            accepted layouts and any dataset categories found inside ``path``).
    """
    p = Path(path)
    if not p.is_dir():
        problem = "is a file, not a folder" if p.exists() else "does not exist"
        raise DataError(f"Dataset path {p} {problem}.\n{_ACCEPTED}")
    kind = _detect(p)
    if kind == "mvtec":
        return load_mvtec(p, **kw)
    if kind == "btad":
        return load_btad(p, **kw)
    if kind == "visa":
        if "category" not in kw:
            raise DataError(f"{p} is a VisA root; pass category=<object> (e.g. candle) to choose the object.")
        return load_visa(p, **kw)
    if kind == "folder":
        return load_folder(p, **kw)
    raise DataError(f"Cannot recognise the layout of {p}.{_category_hint(p)}\n{_ACCEPTED}")
