"""Pairing defect images with their mask files, shared by every folder-based loader."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .io import DataError, index_by_stem

# How many offending files to quote in one error message before summarising.
_MAX_EXAMPLES = 3


def match_masks(
    images: Sequence[Path], mask_dir: Path, suffixes: Sequence[str]
) -> tuple[list[Path | None], list[tuple[Path, Path]]]:
    """Find each image's mask in ``mask_dir`` as ``<stem><suffix>.<any image ext>``.

    Returns the mask (or ``None``) per image and, for the misses, ``(image, expected
    mask path)`` so the caller can decide whether a miss is an error and can tell the
    user exactly which file to create (``<stem><suffixes[0]>.png``).
    """
    index = index_by_stem(mask_dir)
    masks: list[Path | None] = []
    missing: list[tuple[Path, Path]] = []
    for image in images:
        mask = next((index[image.stem + suf] for suf in suffixes if image.stem + suf in index), None)
        masks.append(mask)
        if mask is None:
            missing.append((image, mask_dir / f"{image.stem}{suffixes[0]}.png"))
    return masks, missing


def missing_masks_error(missing: Sequence[tuple[Path, Path]], mask_root: Path, fix: str) -> DataError:
    """One error for all defect images without masks, quoting a few and counting the rest."""
    examples = "\n".join(f"  {img} -> expected {mask}" for img, mask in missing[:_MAX_EXAMPLES])
    more = f"\n  ... and {len(missing) - _MAX_EXAMPLES} more" if len(missing) > _MAX_EXAMPLES else ""
    absent = "" if mask_root.is_dir() else " (that folder does not exist)"
    return DataError(f"{len(missing)} defect images have no mask under {mask_root}{absent}:\n{examples}{more}\n{fix}")
