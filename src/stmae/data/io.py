"""Reading images and masks from disk, and listing image files.

Everything that touches an image file goes through this module so that every loader,
the CLI and the benchmarks see pixels the same way (same mode handling, same EXIF
orientation, same 16-bit scaling) and fail with the same kind of error: a
:class:`DataError` that names the file and says what to do about it.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "DECODED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "SERVE_MAX_PIXELS",
    "DataError",
    "UnreadableImageError",
    "read_image",
    "decode_image_bytes",
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

#: PIL formats that are decoded, whatever the file is named. Files are identified by their
#: content, so a JPEG named ``.png`` still works; every other format PIL knows (EPS, which
#: runs Ghostscript; ICNS; FLI; ...) is refused: each decoder is attack surface, and an
#: inspection tool reads files nobody curated.
DECODED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")

#: Largest image, in pixels (width x height, read from the file header before anything is
#: decoded), that :func:`read_image` and friends accept by default: 64 megapixels. Why this
#: number: it admits every camera and dataset an inspection line uses (MVTec AD and VisA
#: are 1-2.5 MP, 45-61 MP full-frame sensors such as 9504x6336, 16k line-scan strips of
#: 4000 lines), bounds the memory of one decode to ~0.2 GB (RGB; ~0.5 GB for 16-bit
#: grayscale, which is scaled in float64), and stays below PIL's own warning limit
#: (``Image.MAX_IMAGE_PIXELS``, 89.5 MP), so PIL never warns about an image stmae accepts.
#: The model sees every image at ``features.image_size`` (256 px), so larger images add
#: cost, not accuracy. Pass ``max_pixels=`` (CLI ``--max-pixels``) to change it; ``None``
#: leaves only PIL's own hard limit (``2 * Image.MAX_IMAGE_PIXELS``).
DEFAULT_MAX_PIXELS: int = 64_000_000
#: The service's lower default (``stmae serve --max-pixels``): a request may carry many
#: uploads, each decoded before scoring.
SERVE_MAX_PIXELS: int = 40_000_000

PathLike = str | os.PathLike[str]

# Modes whose samples do not fit in uint8. PIL's own convert("RGB") clips them instead of
# scaling, which would turn a normal 16-bit image into a saturated white one.
_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# EXIF orientations 5-8 involve a 90-degree turn, so width and height swap.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Maps the full 16-bit range 0..65535 exactly onto 0..255 (65535 / 257 == 255).
_UINT16_TO_UINT8 = 257.0
# What a plugin's parser raises when a file is not of its format (PIL tries the next one).
_NOT_THIS_FORMAT = (SyntaxError, IndexError, TypeError, struct.error)
_ADVICE = (
    "Re-export or delete the file (dataset loaders can drop such files with "
    "skip_unreadable=True; `stmae test` skips them and lists them in skipped.csv)."
)


class DataError(ValueError):
    """Any problem with input data: missing folders, empty splits, unreadable files.

    Subclasses :class:`ValueError` so that generic callers that already catch bad values
    keep working; the message always names the file or folder, the problem, and a fix.
    """


class UnreadableImageError(DataError):
    """One image file (or in-memory image) cannot be used; the only error decoding raises.

    ``file`` names it (a path, an upload's name, or ``<array>`` / ``<PIL image>``) and
    ``reason`` is the short problem ("empty file (0 bytes)", "truncated or corrupt image
    data (...)", "20000x20000 = 400,000,000 pixels, over the limit of ...") that batch
    commands write into ``skipped.csv``; ``str(exc)`` is the full sentence with a fix.
    """

    def __init__(self, file: str, reason: str, advice: str = _ADVICE) -> None:
        self.file = file
        self.reason = reason
        self.advice = advice
        super().__init__(f"Cannot read image {file}: {reason}." + (f" {advice}" if advice else ""))

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # picklable across worker processes
        return (type(self), (self.file, self.reason, self.advice))


class ImageTooLargeError(UnreadableImageError):
    """An image over the pixel limit, refused from its header before decoding (HTTP 413 in the service)."""


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
    if mode == "La":  # premultiplied luminance + alpha: PIL has no La -> L conversion
        return np.array(img.getchannel(0))
    if mode in ("1", "L", "LA"):
        return np.array(img if mode == "L" else img.convert("L"))
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # lets PIL apply palette transparency without warnings
    return np.array(img if img.mode == "RGB" else img.convert("RGB"))


def _pixel_limit(max_pixels: int | None) -> int | None:
    """The effective limit: ``max_pixels``, or PIL's own hard limit when it is None."""
    if max_pixels is not None:
        return int(max_pixels)
    pil = Image.MAX_IMAGE_PIXELS
    return None if pil is None else 2 * int(pil)


def _check_size(name: str, width: int, height: int, max_pixels: int | None) -> None:
    """Refuse empty images and images over the pixel limit, from their header alone."""
    if width <= 0 or height <= 0:
        raise UnreadableImageError(name, f"the image is empty ({width}x{height} pixels)")
    limit = _pixel_limit(max_pixels)
    pixels = width * height
    if limit is not None and pixels > limit:
        raise ImageTooLargeError(
            name,
            f"{width}x{height} = {pixels:,} pixels, over the limit of {limit:,} (a decompression bomb "
            "or an image far larger than inspection needs; raise max_pixels / --max-pixels to accept it)",
        )


def _identify(fp: IO[bytes], name: str) -> Image.Image:
    """Open (header only) a file of one of :data:`DECODED_FORMATS`.

    Does what ``Image.open`` does minus its decompression-bomb check, which warns or
    raises according to the process-global ``Image.MAX_IMAGE_PIXELS`` (changing that, or
    the warnings filters to silence it, would change every other PIL user in the
    process); the caller checks the size against its own limit instead.
    """
    registry = getattr(Image, "OPEN", None)
    if not isinstance(registry, dict):  # a future Pillow without the registry: plain open
        return Image.open(fp, formats=list(DECODED_FORMATS))
    prefix = fp.read(16)
    Image.preinit()
    first_failure: str | None = None
    for fmt in DECODED_FORMATS:
        if fmt not in registry:
            Image.init()
            if fmt not in registry:  # e.g. Pillow built without WebP
                continue
        factory, accept = registry[fmt]
        verdict = accept(prefix) if accept else True
        if not verdict or isinstance(verdict, str):
            continue
        fp.seek(0)
        try:
            return factory(fp, name)
        except _NOT_THIS_FORMAT as exc:
            first_failure = first_failure or f"corrupt {fmt} header ({type(exc).__name__}: {exc})"
    if first_failure:
        raise UnreadableImageError(name, first_failure)
    raise UnreadableImageError(
        name, f"not an image (not {', '.join(DECODED_FORMATS)}; the file starts with {prefix[:8]!r})"
    )


def _open_header(fp: IO[bytes], name: str) -> Image.Image:
    """:func:`_identify`, with any exception PIL raises while parsing the header (see
    :func:`_decode_stream`) turned into one :class:`UnreadableImageError` naming the file."""
    try:
        return _identify(fp, name)
    except UnreadableImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any header failure means "not a usable image"
        raise UnreadableImageError(name, _describe("unreadable image header", exc)) from exc


def _decode_stream(fp: IO[bytes], name: str, max_pixels: int | None, reduce_to: int | None = None) -> np.ndarray:
    """Decode the first frame of an open binary stream (see :func:`_pil_to_array`).

    ``reduce_to``: a JPEG at least twice that size on both sides is decoded at 1/2, 1/4 or
    1/8 scale (libjpeg's DCT scaling, ``Image.draft``), the smallest that keeps both sides
    >= ``reduce_to``. A model that resizes to 256 px needs no more, and a 5-megapixel
    camera frame then decodes several times faster. Other formats ignore it.

    Any exception PIL raises here means "this file is not a usable image": its decoders
    raise at least ten types on malformed input (OSError, SyntaxError, ValueError,
    TypeError, IndexError, KeyError, EOFError, struct.error, ZeroDivisionError,
    DecompressionBombError, MemoryError, ...), so all of them become one
    :class:`UnreadableImageError` naming the file.
    """
    with _open_header(fp, name) as img:
        _check_size(name, *img.size, max_pixels)
        if reduce_to and img.format == "JPEG" and min(img.size) >= 2 * reduce_to:
            try:
                img.draft(img.mode, (reduce_to, reduce_to))
            except Exception as exc:  # noqa: BLE001 - see above
                raise UnreadableImageError(name, _describe("corrupt JPEG header", exc)) from exc
        try:
            img.load()  # a full decode now, so truncated files fail here, not later
        except Exception as exc:  # noqa: BLE001 - see docstring
            raise UnreadableImageError(name, _describe("truncated or corrupt image data", exc)) from exc
        return _converted(img, name)


def _converted(img: Image.Image, name: str) -> np.ndarray:
    """:func:`_pil_to_array` with its failures (odd modes, broken EXIF) as UnreadableImageError."""
    try:
        return _pil_to_array(img)
    except Exception as exc:  # noqa: BLE001 - conversions raise ValueError, OSError, KeyError...
        raise UnreadableImageError(name, _describe(f"cannot convert pixel mode {img.mode!r} to RGB", exc)) from exc


def _describe(what: str, exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "too large to decode in the memory available"
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb ({exc})"
    detail = str(exc).strip() or "no detail"
    return f"{what} ({type(exc).__name__}: {detail[:300]})"


def _decode(path: PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS, reduce_to: int | None = None) -> np.ndarray:
    """Decode the image file ``path``; every problem is an UnreadableImageError naming it."""
    p = Path(path)
    name = str(p)
    try:
        info = p.stat()
    except FileNotFoundError:
        raise UnreadableImageError(name, "file not found", "Check the path and that the file was not moved.") from None
    except OSError as exc:
        raise UnreadableImageError(name, _describe("cannot access the file", exc)) from exc
    if stat.S_ISDIR(info.st_mode):
        raise UnreadableImageError(name, "is a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
        raise UnreadableImageError(name, "not a regular file")
    if info.st_size == 0:
        raise UnreadableImageError(name, "empty file (0 bytes)")
    try:
        fh = open(p, "rb")
    except OSError as exc:
        raise UnreadableImageError(name, _describe("cannot open the file", exc)) from exc
    with fh:
        return _decode_stream(fh, name, max_pixels, reduce_to)


def _to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """``(H, W)`` / ``(H, W, 1|3|4)`` pixels of any bit depth -> uint8 ``(H, W, 3)``.

    Wider-than-8-bit values are scaled with the full 16-bit range (``/257``) so a 16-bit
    scan looks like its 8-bit export instead of being clipped to white; NaN counts as 0.
    """
    if arr.dtype != np.uint8:
        # errstate (context-local): signalling NaNs in float files would warn on the cast.
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = arr.astype(np.float64)  # one float buffer, scaled in place
        np.nan_to_num(scaled, copy=False, nan=0.0, posinf=255.0 * _UINT16_TO_UINT8, neginf=0.0)
        np.divide(scaled, _UINT16_TO_UINT8, out=scaled)
        np.rint(scaled, out=scaled)
        np.clip(scaled, 0, 255, out=scaled)
        arr = scaled.astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def read_image(path: PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, reduce_to: int | None = None) -> np.ndarray:
    """Read any supported image as uint8 ``(H, W, 3)`` RGB.

    Grayscale is repeated to three channels because every backbone in the project is
    RGB; 16-bit and float images are scaled with the full 16-bit range (``/257``).
    Images over ``max_pixels`` pixels (:data:`DEFAULT_MAX_PIXELS`) are refused from their
    header, before any pixel is decoded. ``reduce_to`` (the model's input size) lets a
    large JPEG decode at a reduced scale that is still at least that size (see
    :func:`_decode_stream`); the caller resizes anyway.

    Raises:
        UnreadableImageError: (a :class:`DataError`) the file is missing, empty, not an
            image, truncated, corrupt, too large or of an unsupported pixel mode; the
            message names the file and the problem.
    """
    return _to_rgb_uint8(_decode(path, max_pixels, reduce_to))


def decode_image_bytes(
    data: bytes, name: str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, reduce_to: int | None = None
) -> np.ndarray:
    """Decode an encoded image held in memory (an HTTP upload) as uint8 ``(H, W, 3)`` RGB.

    Exactly :func:`read_image`'s checks and conversions; ``name`` (the upload's file name)
    is what error messages quote.

    Raises:
        UnreadableImageError: as :func:`read_image`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnreadableImageError(name, f"expected the encoded bytes of an image, got {type(data).__name__}")
    if len(data) == 0:
        raise UnreadableImageError(name, "empty file (0 bytes)")
    return _to_rgb_uint8(_decode_stream(io.BytesIO(bytes(data)), name, max_pixels, reduce_to))


def as_rgb(
    image: PathLike | Image.Image | np.ndarray, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, reduce_to: int | None = None
) -> np.ndarray:
    """Any user-supplied image (path, PIL image or numpy array) as uint8 ``(H, W, 3)`` RGB.

    This is the one entry point inference uses, so a PNG on disk and the same picture
    passed in memory give the same score: PIL images get the same mode and EXIF
    handling as files. Arrays may be ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or
    ``(H, W, 4)`` (alpha dropped) and uint8, uint16 (scaled ``/257``) or float in
    ``[0, 1]`` (NaN counts as 0). Other integer types are rejected: an int64 array holding
    0..255 would otherwise be mistaken for 16-bit data and come out black. A uint8
    ``(H, W, 3)`` array is returned without a copy (a view of it). Every input is held
    to ``max_pixels`` and must have at least one pixel.

    Raises:
        UnreadableImageError: (a :class:`DataError`) naming the file, or ``<array>`` /
            ``<PIL image>``, and the problem.
    """
    if isinstance(image, Image.Image):
        name = str(getattr(image, "filename", "") or "<PIL image>")
        _check_size(name, *image.size, max_pixels)
        try:
            image.load()  # a lazily opened file decodes here: truncation shows up now
        except Exception as exc:  # noqa: BLE001 - see _decode_stream
            raise UnreadableImageError(name, _describe("truncated or corrupt image data", exc)) from exc
        return _to_rgb_uint8(_converted(image, name))
    if not isinstance(image, np.ndarray):
        if not isinstance(image, (str, os.PathLike)):
            raise UnreadableImageError(
                f"<{type(image).__name__}>", "not an image: pass a path, a PIL image or a numpy array"
            )
        return read_image(image, max_pixels=max_pixels, reduce_to=reduce_to)
    shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
    dtype_ok = np.issubdtype(image.dtype, np.floating) or image.dtype in (np.uint8, np.uint16)
    if not shape_ok or not dtype_ok:
        raise UnreadableImageError(
            "<array>",
            f"dtype {image.dtype} and shape {image.shape}; expected (H, W), (H, W, 1), (H, W, 3) or "
            "(H, W, 4) with dtype uint8, uint16 or float in [0, 1] (convert it, e.g. img.astype(np.uint8) "
            "for 0..255 integers)",
        )
    _check_size("<array>", image.shape[1], image.shape[0], max_pixels)
    if np.issubdtype(image.dtype, np.floating):
        with np.errstate(invalid="ignore", over="ignore"):  # signalling NaNs warn on the cast
            scaled = np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0) * 255.0
        return _to_rgb_uint8(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    return _to_rgb_uint8(image)


def read_mask(path: PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a ground-truth mask as bool ``(H, W)``: any non-zero pixel is a defect.

    Thresholding at ``> 0`` (not ``> 127``) is deliberate: it accepts 0/255 masks, 0/1
    masks (VisA), instance-labelled masks and 16-bit masks alike. Colour masks count a
    pixel as defective when any colour channel is non-zero, which a luma conversion
    would get wrong for dark colours such as (0, 0, 1). Errors as :func:`read_image`.
    """
    arr = _decode(path, max_pixels)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr > 0


def image_size(path: PathLike) -> tuple[int, int]:
    """Return ``(height, width)`` as :func:`read_image` would produce, without decoding.

    Used to check that a mask matches its image cheaply; EXIF rotations by 90 degrees
    are taken into account so the answer agrees with the decoded image.
    """
    p = Path(path)
    name = str(p)
    try:
        with open(p, "rb") as fh:
            with _open_header(fh, name) as img:
                width, height = img.size
                try:
                    orientation = _orientation(img)
                except Exception:  # noqa: BLE001 - broken EXIF: read_image reports it when decoding
                    orientation = None
    except FileNotFoundError:
        raise UnreadableImageError(name, "file not found", "Check the path and that the file was not moved.") from None
    except OSError as exc:
        raise UnreadableImageError(name, _describe("cannot open the file", exc)) from exc
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width


def unreadable_reason(path: PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Return why ``path`` cannot be decoded (``UnreadableImageError.reason``), or ``None``.

    The same checks as :func:`read_image` (it decodes fully), so a file that passes here
    is one that training and testing can read. A full decode rather than PIL's
    ``verify()``: ``verify()`` does not notice truncated JPEG data, which would then crash
    a long training run halfway through.
    """
    try:
        _decode(path, max_pixels)
    except UnreadableImageError as exc:
        return exc.reason
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
