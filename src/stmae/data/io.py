"""Reading images and masks from disk, and listing image files.

Everything that touches an image file goes through this module so that every loader,
the CLI and the benchmarks see pixels the same way (same mode handling, same EXIF
orientation, same 16-bit scaling) and fail with the same kind of error: a
:class:`DataError` that names the file and says what to do about it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "read_image",
    "read_mask",
    "as_rgb",
    "list_images",
    "image_size",
    "require_dir",
    "require_images",
    "index_by_stem",
    "unreadable_reason",
]

#: Lower-case suffixes treated as images. Matching is case-insensitive because real
#: datasets mix cases (VisA ships ``.JPG``, some BTAD copies ``.BMP``).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

PathLike = str | os.PathLike[str]

# Modes whose samples do not fit in uint8. PIL's own convert("RGB") clips them instead of
# scaling, which would turn a normal 16-bit image into a saturated white one.
_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# EXIF orientations 5-8 involve a 90-degree turn, so width and height swap.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Maps the full 16-bit range 0..65535 exactly onto 0..255 (65535 / 257 == 255).
_UINT16_TO_UINT8 = 257.0


class DataError(ValueError):
    """Any problem with input data: missing folders, empty splits, unreadable files.

    Subclasses :class:`ValueError` so that generic callers that already catch bad values
    keep working; the message always names the file or folder, the problem, and a fix.
    """


def _open_error(path: Path, exc: BaseException) -> DataError:
    """Turn whatever PIL raised into one actionable message."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"Image file not found: {path}. Check the path and that the file was not moved.")
    return DataError(
        f"Cannot read image file {path}: {type(exc).__name__}: {exc}. The file is corrupt, "
        "truncated or not an image; re-export or delete it (dataset loaders can drop such "
        "files with skip_unreadable=True)."
    )


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag (1 = upright), or None when absent."""
    return img.getexif().get(_EXIF_ORIENTATION_TAG)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """Pixels of an opened PIL image with EXIF orientation applied and alpha dropped.

    Returns uint8 ``(H, W)`` or ``(H, W, 3)`` for ordinary images, or a 2-D uint16 /
    int32 / float32 array for high-bit-depth grayscale, so that callers can choose how
    to map it (images scale it, masks threshold it).
    """
    if _orientation(img) not in (None, 1):  # exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img)
    # np.array, not np.asarray: PIL hands numpy an immutable bytes buffer, and callers
    # expect images they can modify in place.
    mode = img.mode
    if mode in _HIGH_BIT_DEPTH_MODES:
        return np.array(img)
    if mode in ("1", "L", "LA", "La"):
        return np.array(img if mode == "L" else img.convert("L"))
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # lets PIL apply palette transparency without warnings
    return np.array(img if img.mode == "RGB" else img.convert("RGB"))


def _decode(path: PathLike) -> np.ndarray:
    """Decode the first frame of ``path`` (see :func:`_pil_to_array`); errors name the file."""
    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()  # force a full decode now so truncated files fail here, not later
            return _pil_to_array(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _open_error(p, exc) from exc


def _to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """``(H, W)`` / ``(H, W, 1|3|4)`` pixels of any bit depth -> uint8 ``(H, W, 3)``.

    Wider-than-8-bit values are scaled with the full 16-bit range (``/257``) so a 16-bit
    scan looks like its 8-bit export instead of being clipped to white.
    """
    if arr.dtype != np.uint8:
        scaled = np.rint(arr.astype(np.float64) / _UINT16_TO_UINT8)
        arr = np.clip(scaled, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def read_image(path: PathLike) -> np.ndarray:
    """Read any supported image as uint8 ``(H, W, 3)`` RGB.

    Grayscale is repeated to three channels because every backbone in the project is
    RGB; 16-bit and float images are scaled with the full 16-bit range (``/257``).

    Raises:
        DataError: the file is missing, corrupt, or not an image (the message names it).
    """
    return _to_rgb_uint8(_decode(path))


def as_rgb(image: PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """Any user-supplied image (path, PIL image or numpy array) as uint8 ``(H, W, 3)`` RGB.

    This is the one entry point inference uses, so a PNG on disk and the same picture
    passed in memory give the same score: PIL images get the same mode and EXIF
    handling as files. Arrays may be ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or
    ``(H, W, 4)`` (alpha dropped) and uint8, uint16 (scaled ``/257``) or float in
    ``[0, 1]``. Other integer types are rejected: an int64 array holding 0..255 would
    otherwise be mistaken for 16-bit data and come out black. A uint8 ``(H, W, 3)``
    array is returned without a copy (a view of it).
    """
    if isinstance(image, Image.Image):
        return _to_rgb_uint8(_pil_to_array(image))
    if not isinstance(image, np.ndarray):
        return read_image(image)
    shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
    if shape_ok and np.issubdtype(image.dtype, np.floating):
        return _to_rgb_uint8(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))
    if not shape_ok or image.dtype not in (np.uint8, np.uint16):
        raise DataError(
            f"Image array has dtype {image.dtype} and shape {image.shape}; expected (H, W), (H, W, 1), "
            "(H, W, 3) or (H, W, 4) with dtype uint8, uint16 or float in [0, 1]. "
            "Convert it, e.g. img.astype(np.uint8) for 0..255 integers."
        )
    return _to_rgb_uint8(image)


def read_mask(path: PathLike) -> np.ndarray:
    """Read a ground-truth mask as bool ``(H, W)``: any non-zero pixel is a defect.

    Thresholding at ``> 0`` (not ``> 127``) is deliberate: it accepts 0/255 masks, 0/1
    masks (VisA), instance-labelled masks and 16-bit masks alike. Colour masks count a
    pixel as defective when any colour channel is non-zero, which a luma conversion
    would get wrong for dark colours such as (0, 0, 1).
    """
    arr = _decode(path)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr > 0


def image_size(path: PathLike) -> tuple[int, int]:
    """Return ``(height, width)`` as :func:`read_image` would produce, without decoding.

    Used to check that a mask matches its image cheaply; EXIF rotations by 90 degrees
    are taken into account so the answer agrees with the decoded image.
    """
    p = Path(path)
    try:
        with Image.open(p) as img:
            width, height = img.size
            orientation = _orientation(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise _open_error(p, exc) from exc
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width


def unreadable_reason(path: PathLike) -> str | None:
    """Return why ``path`` cannot be decoded, or ``None`` if it decodes.

    A full decode rather than PIL's ``verify()``: ``verify()`` does not notice truncated
    JPEG data, which would then crash a long training run halfway through.
    """
    try:
        _decode(path)
    except DataError as exc:
        cause = exc.__cause__
        return f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
    return None


def _is_hidden(path: Path, root: Path) -> bool:
    """Hidden names (``.DS_Store``, macOS ``._000.png`` resource forks) are never images."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _has_image_suffix(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: PathLike, recursive: bool = False) -> list[Path]:
    """List image files in ``folder`` (sorted, hidden files skipped).

    Sorting makes sample order, and therefore seeded subsets and reported results,
    identical on every filesystem.

    Raises:
        DataError: ``folder`` does not exist or is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"Image folder not found: {root}. Check the path.")
    candidates: Iterable[Path] = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in candidates if _has_image_suffix(p) and not _is_hidden(p, root) and p.is_file())


def require_dir(path: PathLike, *, what: str, layout: str) -> Path:
    """Return ``path`` if it is a directory, else raise a DataError describing the layout.

    Shared by every loader so that a wrong path always explains what was expected.
    """
    p = Path(path)
    if not p.is_dir():
        problem = "is a file, not a folder" if p.exists() else "does not exist"
        raise DataError(f"{what} {p} {problem}. Expected layout:\n{layout}")
    return p


def require_images(folder: PathLike, *, what: str, layout: str, recursive: bool = False) -> list[Path]:
    """List images in a folder that must exist and must not be empty (e.g. a train split)."""
    p = require_dir(folder, what=what, layout=layout)
    images = list_images(p, recursive=recursive)
    if not images:
        exts = " ".join(IMAGE_EXTENSIONS)
        raise DataError(
            f"{what} {p} contains no images (looked for {exts}, hidden files ignored). "
            f"Expected layout:\n{layout}"
        )
    return images


def index_by_stem(folder: Path) -> dict[str, Path]:
    """Map each image's stem to its path, for matching masks to images by name.

    Masks are matched by stem rather than exact name because datasets disagree on the
    mask extension (BTAD uses ``.png`` for some products and ``.bmp`` for others). The
    folder is listed once so matching N images costs one directory scan, not N. When
    two files share a stem, the extension earlier in :data:`IMAGE_EXTENSIONS` wins.
    Returns an empty mapping for a missing folder so callers report the missing mask.
    """
    if not folder.is_dir():
        return {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    found = sorted(list_images(folder), key=lambda p: (p.stem, rank[p.suffix.lower()]))
    index: dict[str, Path] = {}
    for p in found:
        index.setdefault(p.stem, p)
    return index
