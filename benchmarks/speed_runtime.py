"""Speed of an exported model on onnxruntime and OpenVINO, next to torch, in one run.

Why: the export is only worth deploying if the runtime without torch is at least as fast as
the torch path on the CPU a production line has (issue 20's target: onnxruntime at batch 1 no
slower than torch). Every engine scores the *same* pre-decoded images, already resized to the
model input size, so the rows compare the model call alone (batch assembly included; image
decoding and file I/O excluded, they are the same code on every engine).

What it times, per engine (torch = ``Detector`` on the CPU, the pipeline of ``predict``):

- ``load_s``: opening the model (torch: ``stmae.load`` of the run folder; runtimes:
  ``stmae.runtime.open_model`` of the exported file, session creation / compilation included);
- ``export_s``: writing that file from the run folder (runtimes only);
- batch 1: median and p95 latency over ``--calls`` calls after ``--warmup`` calls;
- batch 32: images per second over ``--batches`` calls of 32 images;
- the engines take turns call by call, so load from other processes on a shared machine
  slows them alike (the ratios to torch are the robust figures there);
- ``max_map_diff_over_threshold``: the largest map difference to torch on those images, in
  units of the image threshold (the parity the tests hold to 1e-4).

``runtime_rows(run_dir, images, threads)`` is importable (``benchmarks/speed.py`` can add these
rows to its own table). Run: ``python benchmarks/speed_runtime.py [--run RUN_DIR] [--threads 2,1]``.
Without ``--run`` it fits the default preset on ``--train`` images of Magnetic Tile's
train/good (``--epochs``, default 1: the weights' values do not change the time, the bank size
does, and it follows the number of images) into ``--work-dir`` and reuses that run next time.
Writes ``benchmarks/results/speed_runtime-cpu.json`` with provenance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "speed_runtime-cpu.json"
# shared/data next to the checkout (a worktree sits one level deeper)
DEFAULT_DATA = next(
    (p for p in (up / "shared" / "data" / "magnetic_tile" / "magnetic_tile" for up in Path(__file__).resolve().parents[2:4]) if p.is_dir()),
    Path("shared/data/magnetic_tile/magnetic_tile"),
)


def _p95(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values), 95))


Scorer = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]


def _interleaved(scorers: dict[str, Scorer], batch: list[np.ndarray], calls: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each scorer on ``batch``, the engines taking turns call by call.

    Taking turns matters on a shared machine: a burst of load from other processes then
    slows every engine alike instead of whichever happened to be running.
    """
    for _ in range(warmup):
        for score in scorers.values():
            score(batch)
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(calls):
        for name, score in scorers.items():
            t = time.perf_counter()
            score(batch)
            times[name].append(time.perf_counter() - t)
    return times


def runtime_rows(
    run_dir: str | os.PathLike,
    images: Sequence[np.ndarray],
    threads: int,
    *,
    calls: int = 200,
    warmup: int = 10,
    batches: int = 3,
    engines: Sequence[str] = ("onnxruntime", "openvino"),
    include_torch: bool = True,
) -> list[dict[str, Any]]:
    """Rows for torch (optional) and each runtime engine on ``images`` (uint8 RGB, any size).

    The images are resized once to the model input size (:func:`stmae.data.resize_image`).
    Runtime engines get a fresh export in a temporary folder (ONNX for onnxruntime, IR for
    OpenVINO), timed as ``export_s``. Batch-1 and batch-32 calls alternate between engines.
    """
    import torch

    from stmae_research import scoring
    import stmae
    from stmae.data import resize_image, to_tensor_batch
    from stmae.export import export_model
    from stmae.runtime import open_model

    torch.set_num_threads(threads)
    run = Path(run_dir)
    rows: dict[str, dict[str, Any]] = {}
    scorers: dict[str, Scorer] = {}
    with tempfile.TemporaryDirectory(prefix="stmae_speed_runtime_") as tmp:
        if include_torch:
            t = time.perf_counter()
            det = stmae.load(run, device="cpu")
            rows["torch"] = {"engine": "torch", "load_s": round(time.perf_counter() - t, 3), "export_s": None}

            def torch_score(batch: list[np.ndarray], det: Any = det) -> tuple[np.ndarray, np.ndarray]:
                maps, scores = scoring.score_tensor(det, to_tensor_batch(batch))
                return maps.numpy(), scores.numpy()

            scorers["torch"] = torch_score
        for engine in engines:
            fmt = "openvino" if engine == "openvino" else "onnx"
            out = Path(tmp) / ("model.xml" if fmt == "openvino" else "model.onnx")
            t = time.perf_counter()
            export_model(run, out, fmt)
            export_s = time.perf_counter() - t
            t = time.perf_counter()
            model = open_model(out, engine=engine, threads=threads)
            rows[engine] = {"engine": engine, "load_s": round(time.perf_counter() - t, 3), "export_s": round(export_s, 3)}
            scorers[engine] = model.score_batch
        size = model.image_size if engines else det.config.features.image_size
        threshold = float((model.threshold if engines else det.threshold) or 1.0)
        resized = [resize_image(np.asarray(im), size) for im in images]
        one = _interleaved(scorers, resized[:1], calls, warmup)
        thirty_two = _interleaved(scorers, [resized[i % len(resized)] for i in range(32)], batches, 1)
        maps = {name: score(resized)[0] for name, score in scorers.items()}
    for name, row in rows.items():
        row["batch1_median_ms"] = round(1000 * statistics.median(one[name]), 2)
        row["batch1_p95_ms"] = round(1000 * _p95(one[name]), 2)
        row["batch32_images_per_s"] = round(32 * len(thirty_two[name]) / sum(thirty_two[name]), 2)
        row["calls"] = calls
        if "torch" in maps and name != "torch":
            row["max_map_diff_over_threshold"] = float(np.abs(maps[name] - maps["torch"]).max() / threshold)
    if "torch" in rows:
        base = rows["torch"]
        for row in rows.values():
            row["batch1_vs_torch"] = round(row["batch1_median_ms"] / base["batch1_median_ms"], 3)
            row["batch32_vs_torch"] = round(row["batch32_images_per_s"] / base["batch32_images_per_s"], 3)
    return list(rows.values())


def _fit_run(data: Path, work_dir: Path, n_train: int, epochs: int, threads: int) -> Path:
    """A run of the default preset on the first ``n_train`` images of ``data/train/good`` (reused)."""
    import json

    import torch

    import stmae
    from stmae.data import open_dataset

    run = work_dir / f"default_{n_train}_e{epochs}"
    if (run / "meta.json").is_file() and json.loads((run / "meta.json").read_text()).get("epochs") == epochs:
        return run
    torch.set_num_threads(threads)
    samples = open_dataset(data).train[:n_train]
    stmae.fit(samples, run, "default", epochs=epochs, quiet=True, train__device="cpu")
    return run


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="A fitted run folder (default: fit one, see --train).")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec-layout category for the fit and the images.")
    parser.add_argument("--train", type=int, default=200, help="Training images for the fitted run.")
    parser.add_argument("--epochs", type=int, default=1, help="Epochs of the fitted run (time does not depend on them).")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "stmae_speed_runtime")
    parser.add_argument("--threads", default="2,1", help="CPU thread counts, comma-separated (one set of rows each).")
    parser.add_argument("--calls", type=int, default=200, help="Timed batch-1 calls per engine.")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", type=int, default=3, help="Timed batch-32 calls per engine.")
    parser.add_argument("--images", type=int, default=32, help="Test images to score (read from data/test).")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)

    started = time.time()
    thread_counts = [int(t) for t in str(args.threads).split(",")]
    from stmae.data import list_images, read_image
    from stmae.fileio import atomic_write_json
    from stmae.provenance import collect

    run = args.run or _fit_run(args.data, args.work_dir, args.train, args.epochs, max(thread_counts))
    files = list_images(args.data / "test", recursive=True)
    step = max(1, len(files) // args.images)
    images = [read_image(f) for f in files[::step][: args.images]]
    rows = []
    for threads in thread_counts:
        for row in runtime_rows(run, images, threads, calls=args.calls, warmup=args.warmup, batches=args.batches):
            rows.append({"threads": threads, **row})
    import json

    meta = json.loads((Path(run) / "meta.json").read_text())
    results = {
        "what": "exported model (onnxruntime, OpenVINO) vs torch on the CPU; model call on pre-resized uint8 images",
        "run": {
            "path": str(run),
            "preset": "default" if args.run is None else None,
            "image_size": meta.get("image_size"),
            "n_train": meta.get("n_train"),
            "bank_patches": (meta.get("memory") or {}).get("bank_patches"),
        },
        "threads": thread_counts,
        "images": len(images),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "rows": rows,
        "target": "onnxruntime batch-1 median <= torch batch-1 median",
        "target_met": {
            str(r["threads"]): r["batch1_vs_torch"] <= 1.0 for r in rows if r["engine"] == "onnxruntime" and "batch1_vs_torch" in r
        },
        "provenance": collect("cpu", started=started),
    }
    atomic_write_json(args.out, results)
    for r in rows:
        print(
            f"{r['threads']} thread(s) {r['engine']:12s} load {r['load_s']:.2f} s  batch 1: median {r['batch1_median_ms']:.1f} ms, "
            f"p95 {r['batch1_p95_ms']:.1f} ms ({r.get('batch1_vs_torch', 1):.2f}x torch)  "
            f"batch 32: {r['batch32_images_per_s']:.1f} img/s ({r.get('batch32_vs_torch', 1):.2f}x torch)"
        )
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0 if main() else 1)
