"""The two types every loader returns: :class:`Sample` and :class:`AnomalyDataset`.

Loaders only *describe* a dataset (paths, labels, defect types); pixels are decoded
lazily by :meth:`Sample.load_image` / :meth:`Sample.load_mask`, so opening MVTec AD or
VisA costs a directory scan, not gigabytes of RAM. One-class protocols (MNIST etc.)
are the exception: their images already sit in memory and travel in ``Sample.array``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .io import DEFAULT_MAX_PIXELS, DataError, as_rgb, image_size, read_image, read_mask, unreadable_reason

__all__ = ["Sample", "AnomalyDataset", "build_dataset"]

NORMAL_TYPE = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split, with its label and (optionally) its ground-truth mask.

    ``array`` is excluded from equality, hashing and repr: numpy arrays are neither
    hashable nor comparable with ``==``, and in-memory samples are already identified
    by their unique ``name``. ``max_pixels`` is the pixel limit its files are read with
    (:data:`stmae.data.io.DEFAULT_MAX_PIXELS`; loaders set it from their ``max_pixels``).
    """

    path: Path | None
    label: int
    defect_type: str
    mask_path: Path | None = None
    array: np.ndarray | None = field(default=None, compare=False, repr=False)
    name: str = ""
    max_pixels: int | None = field(default=DEFAULT_MAX_PIXELS, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(
                f"Sample {self.name or self.path}: label must be 0 (normal) or 1 (anomalous), got {self.label!r}"
            )
        if self.path is None and self.array is None:
            raise ValueError(f"Sample {self.name!r} has neither a path nor an in-memory array")

    @property
    def display_name(self) -> str:
        """``name`` if set, else the file name; for messages and reports."""
        return self.name or (self.path.name if self.path is not None else "<in-memory>")

    def load_image(self, reduce_to: int | None = None) -> np.ndarray:
        """Return the image as uint8 ``(H, W, 3)`` RGB (a fresh array the caller may modify).

        ``reduce_to``: the size the caller will resize to; a large JPEG file may then come
        back decoded at a reduced scale, never below it (:func:`~stmae.data.io.read_image`).
        """
        if self.array is None:
            assert self.path is not None  # guaranteed by __post_init__
            return read_image(self.path, max_pixels=self.max_pixels, reduce_to=reduce_to)
        img = as_rgb(self.array, max_pixels=self.max_pixels)
        # In-memory arrays are shared between samples and calls; never hand them out.
        return img.copy() if np.may_share_memory(img, self.array) else img

    def load_mask(self) -> np.ndarray | None:
        """Return the bool ``(H, W)`` defect mask, or ``None`` when the sample has none.

        ``None`` (normal images, datasets without ground truth) means "no defect pixels";
        callers treat it as all-False. The mask must have exactly the image's size:
        silently resizing it would hide a mismatched pairing of files.
        """
        if self.mask_path is None:
            return None
        mask = read_mask(self.mask_path, max_pixels=self.max_pixels)
        if self.path is not None:
            expected = image_size(self.path)
        else:
            assert self.array is not None
            expected = tuple(self.array.shape[:2])
        if mask.shape != expected:
            raise DataError(
                f"Mask {self.mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but image "
                f"{self.path or self.display_name} is {expected[1]}x{expected[0]}. The mask does not belong "
                "to this image or was resized; fix or regenerate the mask."
            )
        return mask


@dataclass
class AnomalyDataset:
    """A dataset (usually one category) split into normal-only train and labelled test samples."""

    name: str
    root: Path | None
    train: list[Sample]
    test: list[Sample]
    has_masks: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def defect_types(self) -> list[str]:
        """Sorted defect types of the anomalous test samples (``"good"`` is not a defect type)."""
        return sorted({s.defect_type for s in self.test if s.label == 1})

    def __repr__(self) -> str:
        n_bad = sum(s.label for s in self.test)
        return (
            f"AnomalyDataset(name={self.name!r}, train={len(self.train)}, test={len(self.test)} "
            f"({n_bad} anomalous), defect_types={self.defect_types()}, has_masks={self.has_masks}, "
            f"skipped={len(self.skipped)})"
        )


def _unreadable(sample: Sample) -> tuple[str, str] | None:
    """``(file, reason)`` for the first unreadable file of a sample (image, then mask)."""
    for path in (sample.path, sample.mask_path):
        if path is not None:
            reason = unreadable_reason(path, max_pixels=sample.max_pixels)
            if reason is not None:
                return str(path), reason
    return None


def _screen(samples: Sequence[Sample], skip_unreadable: bool, skipped: list[tuple[str, str]]) -> list[Sample]:
    """Drop (and record) or reject samples whose files do not decode."""
    kept: list[Sample] = []
    for sample in samples:
        problem = _unreadable(sample)
        if problem is None:
            kept.append(sample)
        elif skip_unreadable:
            skipped.append(problem)
        else:
            file, reason = problem
            raise DataError(
                f"Unreadable file {file}: {reason}. Re-export or delete it, or pass "
                "skip_unreadable=True to drop it (it is then listed in dataset.skipped)."
            )
    return kept


def build_dataset(
    name: str,
    root: Path | None,
    train: list[Sample],
    test: list[Sample],
    *,
    verify: bool = False,
    skip_unreadable: bool = False,
    train_location: str = "",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> AnomalyDataset:
    """Finish a loader: optionally decode every file, then check the splits and set ``has_masks``.

    ``skip_unreadable=True`` implies ``verify=True``: skipping is impossible without
    looking. ``has_masks`` requires at least one anomalous test sample, because pixel
    metrics need defect pixels, and a mask on every one of them, because a partial set
    would bias pixel AUROC towards the annotated images. ``max_pixels`` becomes every
    sample's pixel limit (:func:`stmae.data.io.read_image`), for the check and for later reads.
    """
    if max_pixels != DEFAULT_MAX_PIXELS:
        train = [replace(s, max_pixels=max_pixels) for s in train]
        test = [replace(s, max_pixels=max_pixels) for s in test]
    skipped: list[tuple[str, str]] = []
    if verify or skip_unreadable:
        train = _screen(train, skip_unreadable, skipped)
        test = _screen(test, skip_unreadable, skipped)
    if not train:
        where = f" in {train_location}" if train_location else ""
        extra = f" ({len(skipped)} unreadable files were skipped)" if skipped else ""
        raise DataError(f"Dataset {name!r} has no training images{where}{extra}; at least one normal image is needed.")
    if any(s.label != 0 for s in train):
        raise DataError(f"Dataset {name!r}: the train split must contain normal images only.")
    anomalous = [s for s in test if s.label == 1]
    has_masks = bool(anomalous) and all(s.mask_path is not None for s in anomalous)
    return AnomalyDataset(name=name, root=root, train=train, test=test, has_masks=has_masks, skipped=skipped)
