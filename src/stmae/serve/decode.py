"""Uploaded bytes -> uint8 RGB pixels, or an :class:`UploadError` with a 4xx status.

Why a decoder of its own instead of :func:`stmae.data.read_image`: an upload comes from a
stranger, not from the user's own disk. Every way bytes can be wrong must end as a clear
4xx answer, never as a 500 or a dead worker:

- the declared content type and the first bytes (magic numbers) must say "image" before
  PIL is asked to parse anything, so a text file named ``.png`` is refused up front (415);
- the pixel count is read from the image *header* and checked against the limit before a
  single pixel is decoded, so a 20000 x 20000 palette PNG that compresses to a few KB (a
  decompression bomb) costs nothing (413);
- anything PIL (or a codec under it) raises while decoding, truncated data included, is
  a 422 naming the file.

The pixels come from :func:`stmae.data.io.decode_image_bytes`, the decoder every other
entry point uses (EXIF orientation, grayscale, 16-bit scaling, the header-first pixel limit),
so an image scores the same uploaded as it does from disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.io import DataError, ImageTooLargeError, decode_image_bytes


#: Formats the service decodes (the project's IMAGE_EXTENSIONS), by PIL format name.
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")

#: Declared content types accepted besides ``image/*``: what clients send when they do not
#: know better (curl for an unknown extension, some camera SDKs).
GENERIC_TYPES = ("application/octet-stream", "")


@dataclass
class UploadError(Exception):
    """A bad upload: ``status`` is the HTTP status to answer, ``message`` says what and why.

    ``index`` is set when the model (not the decoder) refused the index-th image of a request.
    """

    status: int
    message: str
    index: int | None = None

    def __str__(self) -> str:
        return self.message


def sniff(head: bytes) -> str | None:
    """The image format the first bytes announce (a name in :data:`FORMATS`), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_content_type(content_type: str | None, name: str) -> None:
    """415 unless the declared type is ``image/*`` or a generic binary type."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind.startswith("image/") or kind in GENERIC_TYPES:
        return
    raise UploadError(
        415, f"{name}: content type {kind!r} is not an image; send image/png, image/jpeg, image/bmp, "
        "image/tiff or image/webp"
    )


def decode_upload(data: bytes, name: str, *, max_pixels: int, content_type: str | None = None) -> np.ndarray:
    """Decode one uploaded image to uint8 (H, W, 3) RGB, or raise :class:`UploadError`.

    ``name`` (the client's file name) only appears in messages; it never touches the disk.
    """
    check_content_type(content_type, name)
    if not data:
        raise UploadError(422, f"{name}: the file is empty")
    fmt = sniff(data[:16])
    if fmt is None:
        raise UploadError(
            415, f"{name}: not a supported image (the content does not start like PNG, JPEG, BMP, TIFF or "
            f"WebP; first bytes {data[:8]!r})"
        )
    try:
        pixels = decode_image_bytes(data, name, max_pixels=max_pixels)  # the same pixels as a file's
    except ImageTooLargeError as exc:  # from the header, before decoding
        raise UploadError(413, f"{name}: refused before decoding: {exc.reason}") from None
    except DataError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise UploadError(422, f"{name}: cannot decode the {fmt} image ({reason})") from None
    except MemoryError:
        raise UploadError(413, f"{name}: the image is too large to decode in memory") from None
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise UploadError(422, f"{name}: the image has no pixels ({pixels.shape[1]} x {pixels.shape[0]})")
    return pixels


__all__ = ["FORMATS", "UploadError", "check_content_type", "decode_upload", "sniff"]
