"""Speed and memory of ``stmae.metrics.compute_metrics`` at MVTec-like scale.

Why: the pixel metrics must stay under 60 s and about 2 GB for 500 images of 256x256
(32.8M pixels) on 2 CPU cores. This script generates such a test set (random maps with
blob-shaped defect masks, fixed seed), times ``compute_metrics`` (median of 3 runs),
measures memory two ways, prints the figures and writes them to
``benchmarks/results/metrics_speed.json``.

* ``peak_rss_mb``: the process high-water mark (``resource.getrusage``), data included.
* ``tracemalloc_peak_mb``: peak of memory allocated during one ``compute_metrics`` call
  on top of what existed before it (numpy reports its buffers to tracemalloc).

Run: ``python benchmarks/metrics_speed.py [--images 500] [--size 256] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from stmae import provenance
from stmae.metrics import compute_metrics

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "metrics_speed.json"
SEED = 0


def make_dataset(
    num_images: int, size: int, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Masks (N, S, S) bool, maps (N, S, S) float32, image labels and scores.

    Half of the images get 1-3 elliptical defects; maps are uniform noise raised inside
    defects, so scores are realistic in count of distinct values (millions) and ties.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    masks = np.zeros((num_images, size, size), dtype=bool)
    maps = rng.random((num_images, size, size), dtype=np.float32)
    for i in range(num_images):
        if i % 2 == 0:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(size / 40, size / 8, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        maps[i][masks[i]] += 0.5 * rng.random(int(masks[i].sum()), dtype=np.float32)
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    return masks, maps, labels, scores


def peak_rss_mb() -> float:
    """Process high-water mark; ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def write_json_atomically(path: Path, payload: dict) -> None:
    """Temp file + os.replace, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def run(num_images: int, size: int, repeats: int) -> dict:
    masks, maps, labels, scores = make_dataset(num_images, size)
    baseline_rss = peak_rss_mb()

    times, metrics = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        metrics = compute_metrics(labels, scores, masks, maps)
        times.append(time.perf_counter() - start)
    rss_after = peak_rss_mb()

    tracemalloc.start()
    compute_metrics(labels, scores, masks, maps)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    return {
        "num_images": num_images,
        "image_size": [size, size],
        "num_pixels": int(masks.size),
        "anomalous_pixel_fraction": float(masks.mean()),
        "seed": SEED,
        "repeats": repeats,
        "times_s": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3),
        "baseline_rss_mb": round(baseline_rss, 1),
        "peak_rss_mb": round(rss_after, 1),
        "tracemalloc_peak_mb": round(traced_peak / 2**20, 1),
        "metrics": metrics,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = time.time()
    result = run(args.images, args.size, args.repeats)
    result["provenance"] = provenance.collect("cpu", started=started)
    write_json_atomically(RESULTS_PATH, result)
    print(json.dumps(result, indent=2))
    print(f"written to {RESULTS_PATH}")


if __name__ == "__main__":
    main()
