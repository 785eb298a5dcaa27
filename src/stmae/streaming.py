"""Streaming prediction shared by every engine: decode ahead in threads, score in batches, yield in order.

Why one function: the torch :class:`~stmae.infer.Detector` and an exported model's runtime
(:mod:`stmae.runtime`) differ only in how a batch of resized images becomes maps and scores.
Everything around that (input expansion, decoding and skipping bad inputs, the prefetch of
the next batch, thresholds, normalised scores, full-resolution maps, the order of results)
is here, so both engines stream, skip and label alike. Torch-free.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from .data.io import DataError
from .geometry import Geometry, ScoreBatch, score_split
from .inputs import Item, expand, load_rgb
from .mapops import resize_map
from .prediction import Prediction, Skipped
from .thresholds import Calibration


def stream_predictions(
    images: Any,
    score_batch: ScoreBatch,
    *,
    geometry: Geometry,
    batch_size: int,
    threshold: float | None,
    pixel_threshold: float | None,
    calibration: Calibration | None,
    full_resolution: bool = False,
    on_error: str = "skip",
    max_pixels: int | None = None,
    keep_images: bool = False,
    quiet: bool = True,
) -> Iterator[Prediction | Skipped]:
    """Yield a :class:`Prediction` (or :class:`Skipped`) per input, in input order.

    At most the batch being scored and the next one are decoded at any time, so memory stays
    flat however many inputs there are. ``on_error="raise"`` raises DataError naming the
    first bad input instead of yielding Skipped. Each image is cut into model inputs by
    ``geometry`` in the decode threads; ``batch_size`` bounds the inputs (tiles) per
    ``score_batch`` call, and the images of one batch are stitched after it.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    items = expand(images)

    def prepare(item: Item) -> tuple[np.ndarray, Any] | str:
        try:
            # Full-resolution maps need the image's own size; otherwise a large JPEG may
            # decode at a reduced scale (never below what the geometry needs).
            rgb = load_rgb(item, max_pixels, None if full_resolution else geometry.reduce_to)
            return rgb, geometry.split(rgb)
        except DataError as exc:
            if on_error == "raise":
                raise
            return str(exc)

    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="stmae-decode") as pool, tqdm(
        total=len(items), desc="predict", unit="img", disable=quiet, leave=False
    ) as bar:

        def submit(chunk: Sequence[Item]) -> Future:
            if len(chunks) == 1 and len(chunk) == 1:  # one image (batch-1 latency): no thread handoff
                done: Future = Future()
                done.set_result([prepare(chunk[0])])
                return done
            return pool.submit(lambda: list(pool.map(prepare, chunk)))

        pending = submit(chunks[0]) if chunks else None
        for index, chunk in enumerate(chunks):
            assert pending is not None
            prepared = pending.result()
            # Decode the next batch while this one is scored.
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else None
            good = [i for i, p in enumerate(prepared) if not isinstance(p, str)]
            maps = scores = normalized = None
            if good:
                maps, scores = score_split(score_batch, geometry, [prepared[i][1] for i in good], batch_size)  # type: ignore[index]
                if calibration is not None and threshold is not None:
                    normalized = calibration.normalized(scores, threshold)
            slot = {i: j for j, i in enumerate(good)}
            for i, item in enumerate(chunk):
                p = prepared[i]
                if isinstance(p, str):
                    yield Skipped(item.name, p)
                    continue
                j, rgb = slot[i], p[0]
                score = float(scores[j])  # type: ignore[index]
                amap = np.asarray(maps[j], dtype=np.float32)  # type: ignore[index]
                yield Prediction(
                    score=score,
                    label=-1 if threshold is None else int(score > threshold),
                    anomaly_map=resize_map(amap, rgb.shape[:2]) if full_resolution else amap.copy(),
                    threshold=threshold,
                    path=item.name if item.is_path else None,
                    normalized=None if normalized is None else float(normalized[j]),
                    pixel_threshold=pixel_threshold,
                    image=rgb if keep_images else None,
                )
            bar.update(len(chunk))


__all__ = ["ScoreBatch", "stream_predictions"]
