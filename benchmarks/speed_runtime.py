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
- ``max_map_diff_over_threshold``: the largest map difference to torch on those images, in
  units of the image threshold (the parity the tests hold to 1e-4).

``runtime_rows(run_dir, images, threads)`` is importable (``benchmarks/speed.py`` can add these
rows to its own table). Run: ``python benchmarks/speed_runtime.py [--run RUN_DIR] [--threads 2]``.
Without ``--run`` it fits the ``accurate`` preset on ``--train`` images of Magnetic Tile's
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


def _latencies(call: Callable[[], Any], calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def _p95(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values), 95))


def _timed_rows(
    name: str,
    load: Callable[[], Any],
    score: Callable[[Any, list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
    images: list[np.ndarray],
    calls: int,
    warmup: int,
    batches: int,
    extra: dict[str, Any],
) -> tuple[dict[str, Any], np.ndarray]:
    t = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t
    one = images[:1]
    lat = _latencies(lambda: score(model, one), calls, warmup)
    batch = [images[i % len(images)] for i in range(32)]
    score(model, batch)  # warm-up at this batch size
    t = time.perf_counter()
    for _ in range(batches):
        score(model, batch)
    throughput = 32 * batches / (time.perf_counter() - t)
    maps, _ = score(model, images)
    row = {
        "engine": name,
        "load_s": round(load_s, 3),
        **extra,
        "batch1_median_ms": round(1000 * statistics.median(lat), 2),
        "batch1_p95_ms": round(1000 * _p95(lat), 2),
        "batch32_images_per_s": round(throughput, 2),
        "calls": calls,
    }
    return row, np.asarray(maps)


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
    OpenVINO), timed as ``export_s``.
    """
    import torch

    import stmae
    from stmae.data import resize_image
    from stmae.export import export_model
    from stmae.runtime import open_model

    torch.set_num_threads(threads)
    run = Path(run_dir)
    det0 = stmae.load(run, device="cpu")
    size = det0.config.features.image_size
    threshold = float(det0.threshold or 1.0)
    resized = [resize_image(np.asarray(im), size) for im in images]
    rows: list[dict[str, Any]] = []
    reference = None

    def torch_score(det: Any, batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = det.score_tensor(det._batch(batch))
        return maps.numpy(), scores.numpy()

    if include_torch:
        row, reference = _timed_rows(
            "torch", lambda: stmae.load(run, device="cpu"), torch_score, resized, calls, warmup, batches, {"export_s": None}
        )
        rows.append(row)
    with tempfile.TemporaryDirectory(prefix="stmae_speed_runtime_") as tmp:
        for engine in engines:
            fmt = "openvino" if engine == "openvino" else "onnx"
            out = Path(tmp) / ("model.xml" if fmt == "openvino" else "model.onnx")
            t = time.perf_counter()
            export_model(run, out, fmt)
            export_s = time.perf_counter() - t
            row, maps = _timed_rows(
                engine,
                lambda: open_model(out, engine=engine, threads=threads),
                lambda m, batch: m.score_batch(batch),
                resized,
                calls,
                warmup,
                batches,
                {"export_s": round(export_s, 3)},
            )
            if reference is not None:
                row["max_map_diff_over_threshold"] = float(np.abs(maps - reference).max() / threshold)
            rows.append(row)
    torch_row = rows[0] if include_torch else None
    for row in rows:
        if torch_row is not None:
            row["batch1_vs_torch"] = round(row["batch1_median_ms"] / torch_row["batch1_median_ms"], 3)
            row["batch32_vs_torch"] = round(row["batch32_images_per_s"] / torch_row["batch32_images_per_s"], 3)
    return rows


def _fit_run(data: Path, work_dir: Path, n_train: int, epochs: int, threads: int) -> Path:
    """A run of the accurate preset on the first ``n_train`` images of ``data/train/good`` (reused)."""
    import json

    import torch

    import stmae
    from stmae.data import open_dataset

    run = work_dir / f"accurate_{n_train}_e{epochs}"
    if (run / "meta.json").is_file() and json.loads((run / "meta.json").read_text()).get("epochs") == epochs:
        return run
    torch.set_num_threads(threads)
    samples = open_dataset(data).train[:n_train]
    stmae.fit(samples, run, "accurate", epochs=epochs, quiet=True, train__device="cpu")
    return run


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="A fitted run folder (default: fit one, see --train).")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec-layout category for the fit and the images.")
    parser.add_argument("--train", type=int, default=200, help="Training images for the fitted run.")
    parser.add_argument("--epochs", type=int, default=1, help="Epochs of the fitted run (time does not depend on them).")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "stmae_speed_runtime")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200, help="Timed batch-1 calls per engine.")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", type=int, default=3, help="Timed batch-32 calls per engine.")
    parser.add_argument("--images", type=int, default=32, help="Test images to score (read from data/test).")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)

    started = time.time()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from stmae.data import list_images, read_image
    from stmae.fileio import atomic_write_json
    from stmae.provenance import collect

    run = args.run or _fit_run(args.data, args.work_dir, args.train, args.epochs, args.threads)
    files = list_images(args.data / "test", recursive=True)
    step = max(1, len(files) // args.images)
    images = [read_image(f) for f in files[::step][: args.images]]
    rows = runtime_rows(run, images, args.threads, calls=args.calls, warmup=args.warmup, batches=args.batches)
    import json

    meta = json.loads((Path(run) / "meta.json").read_text())
    results = {
        "what": "exported model (onnxruntime, OpenVINO) vs torch on the CPU; model call on pre-resized uint8 images",
        "run": {
            "path": str(run),
            "preset": "accurate" if args.run is None else None,
            "image_size": meta.get("image_size"),
            "n_train": meta.get("n_train"),
            "bank_patches": (meta.get("memory") or {}).get("bank_patches"),
        },
        "threads": args.threads,
        "images": len(images),
        "rows": rows,
        "target": "onnxruntime batch-1 median <= torch batch-1 median",
        "target_met": next((r["batch1_vs_torch"] <= 1.0 for r in rows if r["engine"] == "onnxruntime"), None),
        "provenance": collect("cpu", started=started),
    }
    atomic_write_json(args.out, results)
    for r in rows:
        print(
            f"{r['engine']:12s} load {r['load_s']:.2f} s  batch 1: median {r['batch1_median_ms']:.1f} ms, "
            f"p95 {r['batch1_p95_ms']:.1f} ms ({r.get('batch1_vs_torch', 1):.2f}x torch)  "
            f"batch 32: {r['batch32_images_per_s']:.1f} img/s ({r.get('batch32_vs_torch', 1):.2f}x torch)"
        )
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0 if main() else 1)
