"""Data layer: reading images and masks, dataset loaders, and tensor conversion.

Loaders return an :class:`AnomalyDataset` of lazily loaded :class:`Sample` objects and
raise :class:`DataError` (a ``ValueError``) with an actionable message for any data
problem.
"""

from .auto import open_dataset
from .base import AnomalyDataset, Sample
from .btad import load_btad
from .folder import load_folder
from .io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DataError,
    ImageTooLargeError,
    UnreadableImageError,
    decode_image_bytes,
    list_images,
    read_image,
    read_mask,
    unreadable_reason,
)
from .mvtec import load_mvtec
from .oneclass import ONECLASS_PROTOCOLS, load_oneclass, oneclass_classes
from .transforms import resize_image, resize_mask, to_tensor_batch
from .visa import load_visa

__all__ = [
    "read_image",
    "decode_image_bytes",
    "read_mask",
    "unreadable_reason",
    "DEFAULT_MAX_PIXELS",
    "UnreadableImageError",
    "ImageTooLargeError",
    "list_images",
    "IMAGE_EXTENSIONS",
    "DataError",
    "Sample",
    "AnomalyDataset",
    "open_dataset",
    "load_mvtec",
    "load_btad",
    "load_visa",
    "load_folder",
    "load_oneclass",
    "oneclass_classes",
    "ONECLASS_PROTOCOLS",
    "to_tensor_batch",
    "resize_image",
    "resize_mask",
]
