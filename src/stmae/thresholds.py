"""Decision thresholds and normalised scores, from held-out good images only.

Why a module of its own, free of torch: the same rules must give the same labels in
``fit`` (calibration), ``predict``/``test``, the torch-free runtime of an exported model and
the HTTP service. Thresholds are *data* (stored in ``meta.json``), never baked into a graph,
so a user can override them anywhere.

Rules (``rule`` strings):

- ``max`` (the default): the largest score of the held-out good images. No held-out good
  image is flagged. With the 10-80 held-out images a typical fit has, any high quantile is
  this maximum anyway, and it is the choice that keeps false alarms lowest.
- ``quantile:Q``: the Q quantile (0 < Q <= 1) of the good scores (linear interpolation).
- ``fpr:F``: the threshold that flags a fraction F of good images (= ``quantile:1-F``); it
  says what the rule is for: a target false-positive rate.

The image rule applies to image scores; the *pixel* threshold applies the same rule to the
pixel values of the good images' maps (a top-k image score is a mean of the highest pixels,
so using the image threshold per pixel would be wrong).

Normalised score: ``0.5 + 0.5 * (score - threshold) / (threshold - center)`` clipped to
[0, 1], with ``center`` the median good score. A typical good image maps to 0, the
threshold to 0.5 (label 1 above it), and a score as far above the threshold as the threshold
is above typical good images to 1.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

#: Fewer held-out good images than this make a threshold a guess: fit warns.
MIN_CALIBRATION_IMAGES = 10

#: Pixel values used to set the pixel threshold (a seeded subsample above this many).
MAX_PIXEL_SAMPLES = 2_000_000


class ThresholdWarning(UserWarning):
    """A threshold rests on too few held-out good images."""


def parse_rule(rule: str) -> tuple[str, float]:
    """``max`` | ``quantile:Q`` | ``fpr:F`` -> (kind, quantile). ValueError with the accepted forms."""
    text = str(rule).strip().lower()
    if text == "max":
        return "max", 1.0
    kind, _, value = text.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if kind == "quantile" and 0.0 < number <= 1.0:
        return "quantile", number
    if kind == "fpr" and 0.0 <= number < 1.0:
        return "fpr", 1.0 - number
    raise ValueError(f"threshold rule {rule!r}: use max, quantile:Q (0 < Q <= 1) or fpr:F (0 <= F < 1)")


def threshold_from(values: Sequence[float] | np.ndarray, rule: str = "max") -> float:
    """The threshold ``rule`` gives for good-image ``values`` (scores or pixel values)."""
    kind, q = parse_rule(rule)
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("no good-image values to set a threshold from")
    if kind == "max":
        return float(arr.max())
    return float(np.quantile(arr, q))


def normalize(scores: Any, threshold: Any, center: Any, xp: Any = np) -> Any:
    """Raw scores -> [0, 1] with ``threshold`` at 0.5 and ``center`` (median good score) at 0.

    ``xp`` is the array module that evaluates the formula: numpy (float64) for every scorer,
    torch inside the exported graph (:class:`stmae.export.ExportGraph`, where ``threshold``
    and ``center`` are graph inputs), so one formula serves both.
    """
    if xp is np:
        scores = np.asarray(scores, dtype=np.float64)
    spread = threshold - center
    # A threshold at or below the centre (all good scores equal): a tiny spread, so scores
    # above the threshold still read 1 and those below 0.
    fallback = xp.clip(xp.abs(threshold), 1.0, None) * 1e-6
    spread = xp.where(spread > 0, spread, fallback)
    return xp.clip(0.5 + 0.5 * (scores - threshold) / spread, 0.0, 1.0)


@dataclass(frozen=True)
class Calibration:
    """What ``fit`` stores in ``meta.json["calibration"]`` and every scorer reads back."""

    rule: str
    image_threshold: float
    pixel_threshold: float
    center: float
    n_images: int

    def normalized(self, scores: Any, threshold: float | None = None) -> np.ndarray:
        """Normalised scores; ``threshold`` overrides the stored image threshold."""
        return normalize(scores, self.image_threshold if threshold is None else threshold, self.center)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Calibration":
        return cls(
            rule=str(data["rule"]),
            image_threshold=float(data["image_threshold"]),
            pixel_threshold=float(data["pixel_threshold"]),
            center=float(data["center"]),
            n_images=int(data["n_images"]),
        )


def calibrate(
    scores: Sequence[float] | np.ndarray,
    maps: np.ndarray | None = None,
    rule: str = "max",
    *,
    min_images: int = MIN_CALIBRATION_IMAGES,
    seed: int = 0,
) -> Calibration:
    """Image and pixel thresholds from held-out good images' ``scores`` (N,) and ``maps``
    (N, H, W), or their pixel values flat (maps of different sizes).

    Warns (:class:`ThresholdWarning`) when fewer than ``min_images`` images back them.
    Without maps the pixel threshold equals the image threshold.
    """
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size < min_images:
        warnings.warn(
            f"the threshold rests on {arr.size} held-out good image(s) (fewer than {min_images}); "
            "give more good images (or --val-dir) for a threshold you can trust",
            ThresholdWarning,
            stacklevel=2,
        )
    image_t = threshold_from(arr, rule)
    pixel_t = image_t
    if maps is not None:
        pixels = np.asarray(maps, dtype=np.float32).ravel()
        if pixels.size > MAX_PIXEL_SAMPLES:
            pick = np.random.default_rng(seed).choice(pixels.size, MAX_PIXEL_SAMPLES, replace=False)
            pixels = np.concatenate([pixels[pick], [pixels.max()]])  # the max is exact
        pixel_t = threshold_from(pixels, rule)
    return Calibration(rule, image_t, pixel_t, float(np.median(arr)), int(arr.size))


__all__ = [
    "Calibration",
    "MIN_CALIBRATION_IMAGES",
    "ThresholdWarning",
    "calibrate",
    "normalize",
    "parse_rule",
    "threshold_from",
]
