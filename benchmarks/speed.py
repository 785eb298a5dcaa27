"""Speed and memory of fit and predict, against the feature extractor alone and the kNN yardstick.

Why: a production line scores images all day, often on a CPU. The targets (issue "One fast
inference pipeline") are ratios measured in one run on one machine:

- default preset at batch 1: <= 2.0x the feature extractor alone;
- batch-32 throughput: >= 1.5x the batch-1 rate;
- fit of 200 images at 256 px: <= 10 minutes on 2 CPU threads.

What it times, per preset (``default``, ``accurate``):

- ``fit``: a real ``stmae.fit`` on ``--train`` good Magnetic Tile images. The presets named by
  ``--full-fit`` (default: ``default``) train their whole schedule, so their fit time is
  measured; the others train ``--fit-epochs`` epochs (default 2: ``accurate``'s schedule takes
  most of an hour on a CPU) and the file records, clearly marked, the fit time for the
  preset's own epochs extrapolated from the measured seconds per epoch (extraction, memory
  and calibration do not depend on the epochs);
- ``extractor``: the frozen backbone + feature grid alone on a (1, 3, S, S) tensor;
- ``predict_b1``: ``Detector.predict`` on one decoded uint8 image (resize included), median
  and p95 over ``--calls`` calls after warm-up;
- ``predict_b32``: images per second of ``Detector.predict`` on 32 images at once;
- ``predict_b1_after_idle``: the batch-1 call again, each after 0.2 s idle, as on a line that
  scores one part at a time (back-to-back calls keep caches and clocks warm);
- the same with ``infer.precision = bf16`` (CPU autocast), with their parity: the largest
  map difference relative to the threshold and label agreement on the test images;
- peak resident memory (``ru_maxrss``, the process's peak so far; on CUDA
  ``max_memory_allocated``);
- ``bank_search``: the memory-bank search alone on real test features, the bf16 search with
  its float32 check against the float32 search, with their distance from a float64 search;
- ``stages``: milliseconds per image of each stage of the pipeline (features, residual,
  distances, post-processing, the whole) at batch 1 and 32, and their ratio: which stages
  batching speeds up;
- ``decode``: a 2448 x 2048 camera-sized JPEG (a test image scaled up) read in full and at
  the reduced scale the model size allows (``read_image(..., reduce_to=256)``), and
  ``Detector.predict`` on that file (reduced decode) against ``full_resolution=True`` (full
  decode and a full-size map).

- ``tiled``: one camera frame of 5 megapixels (2592 x 1944, a test image scaled up) scored at
  batch 1 (one image per call) squeezed to the model size (``Detector.predict``) and cut into
  model-size tiles at scale 1 (``stmae.geometry.score_split`` over the same model's
  ``score_uint8``: the path ``Scorer.predict`` takes for a run fitted with ``--tile``; the
  weights do not change the cost), in ms per image and per megapixel; the same frame at a
  quarter and a half of its area as well, so ms per tile shows whether the cost is linear in
  the number of tiles. ``--only-tiled`` times this row alone (one short fit of the default
  preset) and writes ``speed-tiled-<device>.json``.

On a GPU (``--device cuda``) the bf16 rows are replaced by ``cuda``: the pipeline alone on
64 images already on the device, eagerly and replayed from CUDA graphs, at batch 1 and 64, in
both precisions, against the GPU targets (<= 2 ms at batch 1, >= 3,000 images/s at batch 64);
``predict_b64`` is ``Detector.predict`` on 64 decoded images (resizing on the CPU included).
``benchmarks/device_speed.sh`` runs it on a lent GPU machine.

The kNN yardstick (the same backbone and coreset, :meth:`stmae.pipeline.MapPipeline.knn`) is
timed the same way in the same run. With the export helper's ``benchmarks/speed_runtime.py``
present, onnxruntime and OpenVINO rows are added.

Run: ``python benchmarks/speed.py [--data DIR] [--threads 2] [--device cpu]``; writes
``benchmarks/results/speed-cpu.json`` (``speed-cuda.json`` on a GPU) with its provenance.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

from stmae_research import knn  # noqa: E402

from stmae import Detector, fit, provenance  # noqa: E402
from stmae.config import preset as preset_config  # noqa: E402
from stmae.data import load_mvtec, resize_image, to_tensor_batch  # noqa: E402
from stmae.data.base import Sample  # noqa: E402
from stmae.fileio import atomic_write_json  # noqa: E402
from stmae.pipeline import MapPipeline  # noqa: E402

DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile"


def timed(fn: Callable[[], Any], calls: int, warmup: int = 5) -> dict[str, float]:
    """Median and p95 wall time (ms) of ``calls`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)), "calls": calls}


def throughput(fn: Callable[[], Any], images: int, repeats: int = 3) -> dict[str, float]:
    """Images per second of one call scoring ``images`` images (median of ``repeats`` after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"images_per_second": float(images / np.median(times)), "batch": images, "repeats": repeats}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_of(samples: Sequence[Sample], count: int) -> list[np.ndarray]:
    return [samples[i % len(samples)].load_image() for i in range(count)]


def time_detector(det: Detector, images: list[np.ndarray], calls: int, device: torch.device) -> dict[str, Any]:
    """Batch-1 latency and batch-32 throughput of ``det.predict``."""
    one = images[0]

    def b1() -> None:
        det.predict(one)
        sync(device)

    def b32() -> None:
        det.predict(images[:32], batch_size=32)
        sync(device)

    row = {"predict_b1": timed(b1, calls), "predict_b32": throughput(b32, 32)}
    row["b32_over_b1_rate"] = row["predict_b32"]["images_per_second"] / (1000.0 / row["predict_b1"]["median_ms"])
    row["predict_b1_after_idle"] = timed_after_idle(b1, IDLE_CALLS, IDLE_GAP_S)
    return row


#: A line scores one part at a time: batch-1 latency is also timed with this idle gap
#: before each call (back-to-back calls keep caches and clocks warm; a gap does not).
IDLE_GAP_S = 0.2
IDLE_CALLS = 50


def timed_after_idle(fn: Callable[[], Any], calls: int, gap_s: float) -> dict[str, float]:
    """Median and p95 wall time (ms) of ``calls`` calls, each after ``gap_s`` seconds idle."""
    fn()
    times = []
    for _ in range(calls):
        time.sleep(gap_s)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)), "calls": calls, "gap_s": gap_s}


def time_decode(det: Detector, image: np.ndarray, work: Path, calls: int) -> dict[str, Any]:
    """Full against reduced-scale JPEG decoding of a camera-sized frame, alone and inside predict."""
    from PIL import Image

    from stmae.data import read_image

    path = work / "camera.jpg"
    Image.fromarray(image).resize((2448, 2048), Image.BILINEAR).save(path, quality=90)
    size = det.config.features.image_size
    n = max(10, calls // 10)
    row = {
        "image": "2448 x 2048 JPEG (quality 90)",
        "read_full": timed(lambda: read_image(path), n),
        "read_reduced": timed(lambda: read_image(path, reduce_to=size), n),
        "predict_reduced_decode": timed(lambda: det.predict(path), n),
        "predict_full_resolution": timed(lambda: det.predict(path, full_resolution=True), n),
        "reduced_shape": list(read_image(path, reduce_to=size).shape),
    }
    row["read_speedup"] = row["read_full"]["median_ms"] / row["read_reduced"]["median_ms"]
    return row


#: The tiled row's frame: 5.04 megapixels, a common industrial camera's resolution.
TILED_FRAME = (1944, 2592)
TILED_CALLS = 5  # calls per size after one warm-up: a 5 MP frame takes seconds


def time_tiled(det: Detector, image: np.ndarray, calls: int) -> dict[str, Any]:
    """One large frame at batch 1, squeezed against tiled (module docstring, ``tiled``)."""
    from PIL import Image

    from stmae.geometry import Geometry, score_split

    size = det.config.features.image_size
    geometry = Geometry(mode="tile", size=size, overlap=0.25)
    h, w = TILED_FRAME
    frames = []
    for area in (0.25, 0.5, 1.0):
        fh, fw = int(round(h * area ** 0.5)), int(round(w * area ** 0.5))
        frame = np.asarray(Image.fromarray(image).resize((fw, fh), Image.BILINEAR))
        tiles = geometry.layout(fh, fw).count

        def tiled(frame: np.ndarray = frame) -> None:
            score_split(det.score_uint8, geometry, [geometry.split(frame)], det.batch_size)

        t = timed(tiled, calls, warmup=1)
        mp = fh * fw / 1e6
        frames.append({
            "shape": [fh, fw], "megapixels": round(mp, 3), "tiles": tiles, "tiled": t,
            "ms_per_megapixel": t["median_ms"] / mp, "ms_per_tile": t["median_ms"] / tiles,
        })
    big = frames[-1]
    frame = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    squeezed = timed(lambda: det.predict(frame), calls, warmup=1)
    per_tile = [f["ms_per_tile"] for f in frames]
    return {
        "image": f"{w} x {h} RGB (a test image scaled up), {h * w / 1e6:.2f} MP, batch 1",
        "tile": size, "overlap": 0.25, "tile_batch": det.batch_size,
        "frames": frames,
        "squeezed": squeezed,
        "squeezed_ms_per_megapixel": squeezed["median_ms"] / big["megapixels"],
        "tiled_over_squeezed": big["tiled"]["median_ms"] / squeezed["median_ms"],
        "ms_per_tile_spread": max(per_tile) / min(per_tile),
    }


#: GPU targets (issue "One fast inference pipeline"): batch 64 and batch 1.
CUDA_BATCH = 64


def time_cuda(det: Detector, bf: Detector, images: list[np.ndarray], calls: int, device: torch.device) -> dict[str, Any]:
    """On a GPU: the pipeline alone on images already resized and resident on the device, at
    batch 1 (latency) and batch 64 (throughput), run eagerly and replayed from CUDA graphs
    (:class:`stmae_research.cuda_graphs.GraphedPipeline`), with the default precision and with
    ``infer.precision = bf16`` (backbone autocast, TF32 bank search); each graph's largest map
    difference from its eager run, and bf16's from fp32, relative to the threshold."""
    from stmae_research.cuda_graphs import GraphedPipeline

    size = det.config.features.image_size
    batch = to_tensor_batch([resize_image(im, size) for im in images_of_list(images, CUDA_BATCH)]).to(device)
    one = batch[:1].clone()
    t = det.threshold or 1.0
    out: dict[str, Any] = {"batch": CUDA_BATCH, "input": "float (N, 3, S, S) already on the GPU"}
    eager_maps = {}
    for prec, d in (("fp32", det), ("bf16", bf)):
        pipe = d.pipeline

        def eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode():
                res = pipe(x)
            sync(device)
            return res

        row: dict[str, Any] = {
            "eager_b1": timed(lambda: eager(one), calls),
            "eager_b64": throughput(lambda: eager(batch), CUDA_BATCH, repeats=20),
        }
        eager_maps[prec] = eager(batch)
        try:
            graphed = GraphedPipeline(pipe, batch_sizes=(1, CUDA_BATCH))

            def replay(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                res = graphed(x)
                sync(device)
                return res

            row["graph_b1"] = timed(lambda: replay(one), calls)
            row["graph_b64"] = throughput(lambda: replay(batch), CUDA_BATCH, repeats=20)
            g_maps, g_scores = replay(batch)
            row["graph_max_map_diff_over_threshold"] = float((g_maps - eager_maps[prec][0]).abs().max()) / t
            row["graph_max_score_diff_over_threshold"] = float((g_scores - eager_maps[prec][1]).abs().max()) / t
        except Exception as exc:  # noqa: BLE001 - recorded: a failed capture is a result too
            row["graph_error"] = f"{type(exc).__name__}: {exc}"
        out[prec] = row
    (fm, fs), (bm, bs) = eager_maps["fp32"], eager_maps["bf16"]
    out["bf16_parity_vs_fp32"] = {
        "max_map_diff_over_threshold": float((bm - fm).abs().max()) / t,
        "max_score_diff_over_threshold": float((bs - fs).abs().max()) / t,
        "label_agreement": float(((bs > t) == (fs > t)).float().mean()),
        "images": CUDA_BATCH,
    }
    best_b1 = min(r[k]["median_ms"] for r in (out["fp32"], out["bf16"]) for k in ("eager_b1", "graph_b1") if k in r)
    best_b64 = max(
        r[k]["images_per_second"] for r in (out["fp32"], out["bf16"]) for k in ("eager_b64", "graph_b64") if k in r
    )
    out["best_b1_ms"], out["best_b64_images_per_second"] = best_b1, best_b64
    out["targets"] = {"b1_ms_at_most": 2.0, "b64_images_per_second_at_least": 3000.0,
                      "b1_met": best_b1 <= 2.0, "b64_met": best_b64 >= 3000.0}
    return out


def images_of_list(images: list[np.ndarray], count: int) -> list[np.ndarray]:
    return [images[i % len(images)] for i in range(count)]


def parity(a: Detector, b: Detector, images: list[np.ndarray]) -> dict[str, float]:
    """How far detector ``b`` is from ``a`` on ``images``: map difference / threshold, label agreement."""
    pa, pb = a.predict(images), b.predict(images)
    diff = max(float(np.abs(x.anomaly_map - y.anomaly_map).max()) for x, y in zip(pa, pb))
    t = a.threshold or 1.0
    return {
        "max_map_diff_over_threshold": diff / t,
        "max_score_diff_over_threshold": max(abs(x.score - y.score) for x, y in zip(pa, pb)) / t,
        "label_agreement": float(np.mean([x.label == y.label for x, y in zip(pa, pb)])),
        "images": len(images),
    }


def time_stages(det: Detector, images: list[np.ndarray], calls: int) -> dict[str, Any]:
    """Per-image milliseconds of each stage of the map recipe at batch 1 and batch 32 (the
    pipeline alone, images already resized): where the time goes, and which stages batching
    speeds up. On a CPU a stage that is already compute-bound at batch 1 costs the same per
    image at batch 32, which caps the batch-32 gain."""
    size = det.config.features.image_size
    pipe = det.pipeline
    batch = to_tensor_batch([resize_image(im, size) for im in images[:32]])
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for label, x, n_calls in (("b1", batch[:1], calls), ("b32", batch, max(5, calls // 40))):
            n = x.shape[0]
            feats = pipe.features(x)
            grid = pipe.grid_maps(feats)
            stages: dict[str, Callable[[], Any]] = {"features": lambda: pipe.features(x)}
            if pipe.model is not None and pipe.infer.distance_weight < 1:  # stages the recipe skips are not timed
                stages["residual"] = lambda: pipe.residual(feats)
            if pipe.infer.distance_weight > 0:
                stages["distances"] = lambda: pipe.distances(feats)
            stages.update(postprocess=lambda: pipe.postprocess(grid), whole=lambda: pipe(x))
            out[label] = {k: timed(fn, n_calls)["median_ms"] / n for k, fn in stages.items()}
    out["b32_per_image_over_b1"] = {k: out["b32"][k] / out["b1"][k] for k in out["b1"]}
    out["note"] = "median ms per image; images already resized; residual = transformer on the K split pairs + residual"
    return out


def time_bank_search(det: Detector, images: list[np.ndarray], calls: int) -> dict[str, Any]:
    """The bank search alone on real test features: the bf16 search with its float32 check
    (:class:`stmae.model.memory.BankSearch`) against the float32 search, one image's patches
    (batch 1) and 32 images' patches, and how far each is from a float64 search."""
    from stmae.model.memory import BankSearch, nearest_distances

    size = det.config.features.image_size
    pipe = det.pipeline
    with torch.inference_mode():
        feats = pipe.features(to_tensor_batch([resize_image(im, size) for im in images[:32]]))
    rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).contiguous()
    one = rows[: feats.shape[2] * feats.shape[3]]
    bank = pipe.bank
    search = BankSearch(bank)
    truth = torch.cat([torch.cdist(rows[i : i + 4096].double(), bank.double()).amin(dim=1) for i in range(0, len(rows), 4096)])
    out: dict[str, Any] = {"bank_rows": int(bank.shape[0]), "queries_b1": int(one.shape[0]), "queries_b32": int(rows.shape[0])}
    with torch.inference_mode():
        out["bf16_b1"] = timed(lambda: search(one), calls)
        out["float32_b1"] = timed(lambda: nearest_distances(one, bank), calls)
        out["bf16_b32"] = timed(lambda: search(rows), 5)
        out["float32_b32"] = timed(lambda: nearest_distances(rows, bank), 5)
        out["bf16_max_abs_diff_vs_float64"] = float((search(rows).double() - truth).abs().max())
        out["float32_max_abs_diff_vs_float64"] = float((nearest_distances(rows, bank).double() - truth).abs().max())
    out["bf16_fell_back_to_float32"] = search.gave_up
    out["bf16_over_float32_b1"] = out["bf16_b1"]["median_ms"] / out["float32_b1"]["median_ms"]
    return out


def bench_preset(name: str, train: Sequence[Sample], test: Sequence[Sample], args: argparse.Namespace,
                 device: torch.device, work: Path) -> dict[str, Any]:
    cfg = preset_config(name)
    full_epochs = cfg.train.epochs
    epochs = full_epochs if name in args.full_fit else args.fit_epochs
    started = time.perf_counter()
    result = fit(list(train), work / name, cfg, train__epochs=epochs, train__device=str(device), quiet=True)
    fit_wall = time.perf_counter() - started
    meta = result.meta
    per_epoch = meta["train_seconds"] / epochs
    fixed = fit_wall - meta["train_seconds"]
    det = Detector.load(result.run_dir, device=str(device))
    images = images_of(test, 32)
    size = det.config.features.image_size
    x = to_tensor_batch([resize_image(images[0], size)]).to(device)
    pipe = det.pipeline
    with torch.inference_mode():
        extractor = timed(lambda: (pipe.extractor(x), sync(device)), args.calls)
    row: dict[str, Any] = {
        "preset": name,
        "fit": {
            "images": len(train),
            "epochs_run": epochs,
            "measured_seconds": round(fit_wall, 2),
            "whole_schedule_measured": epochs == full_epochs,
            "seconds_per_epoch": round(per_epoch, 3),
            "seconds_outside_training": round(fixed, 2),
            "preset_epochs": full_epochs,
            "extrapolated_seconds_for_preset_epochs": round(fixed + per_epoch * full_epochs, 1),
            "memory_bank_patches": (meta.get("memory") or {}).get("bank_patches"),
        },
        "extractor_b1": extractor,
        "fp32": time_detector(det, images, args.calls, device),
    }
    row["fp32"]["b1_over_extractor"] = row["fp32"]["predict_b1"]["median_ms"] / extractor["median_ms"]
    bf = Detector.load(result.run_dir, device=str(device))
    bf.config.infer.precision = "bf16"
    if device.type == "cpu":
        row["bf16"] = time_detector(bf, images, args.calls, device)
        row["bf16"]["b1_over_extractor"] = row["bf16"]["predict_b1"]["median_ms"] / extractor["median_ms"]
        row["bf16"]["parity_vs_fp32"] = parity(det, bf, images)
    else:
        b64 = images_of_list(images, CUDA_BATCH)
        row["fp32"]["predict_b64"] = throughput(lambda: (det.predict(b64, batch_size=CUDA_BATCH), sync(device)), CUDA_BATCH)
        row["cuda"] = time_cuda(det, bf, images, args.calls, device)
    if name == args.presets_list[0]:
        row["decode"] = time_decode(det, images[0], work, args.calls)
        if device.type == "cpu" and det.memory is not None:
            row["bank_search"] = time_bank_search(det, images, args.calls)
        if device.type == "cpu":
            row["stages"] = time_stages(det, images, args.calls)
        row["tiled"] = time_tiled(det, images[0], TILED_CALLS)
    row["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    row["run_dir"] = str(result.run_dir)
    return row


def bench_knn(train: Sequence[Sample], test: Sequence[Sample], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The kNN yardstick (the default preset's features and coreset ratio), timed like ST-MAE."""
    cfg = preset_config("default")
    started = time.perf_counter()
    bank = knn.fit_bank(list(train), cfg, coreset_ratio=cfg.fit.bank_coreset, device=device)
    fit_seconds = time.perf_counter() - started
    pipe = MapPipeline.knn(bank.extractor, bank.stats, bank.bank, cfg).to(device)
    images = images_of(test, 32)
    size = cfg.features.image_size

    def score(batch: list[np.ndarray]) -> None:
        x = to_tensor_batch([resize_image(im, size) for im in batch]).to(device)
        with torch.inference_mode():
            pipe(x)
        sync(device)

    b1 = timed(lambda: score(images[:1]), args.calls)
    b32 = throughput(lambda: score(images[:32]), 32)
    return {
        "fit_seconds": round(fit_seconds, 2),
        "bank_patches": int(bank.bank.shape[0]),
        "predict_b1": b1,
        "predict_b32": b32,
        "b32_over_b1_rate": b32["images_per_second"] / (1000.0 / b1["median_ms"]),
    }


def runtime_rows(run_dir: str, images: list[np.ndarray], threads: int) -> list[dict[str, Any]] | None:
    """onnxruntime / OpenVINO rows from benchmarks/speed_runtime.py, when it is there."""
    try:
        import speed_runtime  # type: ignore[import-not-found]
    except ImportError:
        return None
    return speed_runtime.runtime_rows(run_dir, images, threads)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Magnetic Tile in the MVTec layout")
    p.add_argument("--train", type=int, default=200, help="training images for the fits (default 200)")
    p.add_argument("--fit-epochs", type=int, default=2,
                   help="epochs run by the fits of presets not in --full-fit (default 2; the rest is extrapolated)")
    p.add_argument("--full-fit", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=["default"],
                   help="presets whose fit runs its whole schedule (default: default)")
    p.add_argument("--calls", type=int, default=200, help="timed batch-1 calls after warm-up (default 200)")
    p.add_argument("--presets", default="default,accurate")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/speed-<device type>.json")
    p.add_argument("--only-tiled", action="store_true",
                   help="time the tiled 5 MP row alone, on a --fit-epochs fit of the default preset "
                   "(default out: speed-tiled-<device type>.json)")
    return p.parse_args(argv)


def main_tiled(args: argparse.Namespace, train: Sequence[Sample], test: Sequence[Sample],
               device: torch.device, started: float) -> dict[str, Any]:
    """``--only-tiled``: the ``tiled`` row of the default preset, alone."""
    with tempfile.TemporaryDirectory(prefix="stmae-speed-") as tmp:
        cfg = preset_config("default")
        result = fit(list(train), Path(tmp) / "default", cfg, train__epochs=args.fit_epochs,
                     train__device=str(device), quiet=True)
        det = Detector.load(result.run_dir, device=str(device))
        row = time_tiled(det, images_of(test, 1)[0], TILED_CALLS)
    results = {"benchmark": "speed-tiled", "threads": args.threads, "preset": "default",
               "fit_epochs": args.fit_epochs, "train_images": len(train),
               "memory_bank_patches": (result.meta.get("memory") or {}).get("bank_patches"),
               "tiled": row, "provenance": provenance.collect(str(device), started=started)}
    write_results(args.out or HERE / "results" / f"speed-tiled-{device.type}.json", results, tiled_summary(row))
    return results


def write_results(out: Path, results: dict[str, Any], text: str) -> None:
    """Write the results JSON atomically and print its summary."""
    atomic_write_json(out, results)
    print(text)
    print(f"wrote {out}")


def tiled_summary(t: dict[str, Any]) -> str:
    lines = [f"tiled {t['image']}: squeezed {t['squeezed']['median_ms']:.0f} ms "
             f"({t['squeezed_ms_per_megapixel']:.0f} ms/MP); tiled {t['tiled_over_squeezed']:.1f}x that"]
    for f in t["frames"]:
        lines.append(f"  {f['shape'][0]} x {f['shape'][1]} ({f['megapixels']:.2f} MP, {f['tiles']} tiles): "
                     f"{f['tiled']['median_ms']:.0f} ms = {f['ms_per_megapixel']:.0f} ms/MP, {f['ms_per_tile']:.1f} ms/tile")
    lines.append(f"  ms per tile, largest / smallest over the three sizes: {t['ms_per_tile_spread']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.presets_list = [p.strip() for p in args.presets.split(",") if p.strip()]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.time()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: Magnetic Tile not found; pass --data DIR (MVTec layout)")
    ds = load_mvtec(args.data)
    idx = knn.subsample_indices(len(ds.train), args.train, seed=0)
    train = [ds.train[i] for i in idx]
    test = ds.test[:32]
    if args.only_tiled:
        return main_tiled(args, train, test, device, started)
    results: dict[str, Any] = {"benchmark": "speed", "threads": args.threads, "presets": {}}
    with tempfile.TemporaryDirectory(prefix="stmae-speed-") as tmp:
        for name in args.presets_list:
            print(f"[speed] {name} ...", flush=True)
            results["presets"][name] = bench_preset(name, train, test, args, device, Path(tmp))
        print("[speed] kNN yardstick ...", flush=True)
        results["knn"] = bench_knn(train, test, args, device)
        if device.type == "cpu":  # the exported graph's CPU engines
            first = next(iter(results["presets"].values()))
            rows = runtime_rows(first["run_dir"], images_of(test, 32), args.threads)
            if rows is not None:
                results["runtime"] = rows
    for row in results["presets"].values():
        row.pop("run_dir", None)
    results["provenance"] = provenance.collect(str(device), started=started)
    write_results(args.out or HERE / "results" / f"speed-{device.type}.json", results, summary(results))
    return results


def summary(results: dict[str, Any]) -> str:
    lines = []
    for name, row in results["presets"].items():
        for prec in ("fp32", "bf16"):
            if prec not in row:
                continue
            r = row[prec]
            lines.append(
                f"{name:9s} {prec}: b1 {r['predict_b1']['median_ms']:.1f} ms (p95 {r['predict_b1']['p95_ms']:.1f}), "
                f"{r['b1_over_extractor']:.2f}x extractor ({row['extractor_b1']['median_ms']:.1f} ms); "
                f"b32 {r['predict_b32']['images_per_second']:.1f} img/s = {r['b32_over_b1_rate']:.2f}x b1 rate; "
                f"b1 after {r['predict_b1_after_idle']['gap_s']:g} s idle {r['predict_b1_after_idle']['median_ms']:.1f} ms"
            )
        f = row["fit"]
        lines.append(
            f"{name:9s} fit: {f['measured_seconds']:.0f} s for {f['epochs_run']} epochs"
            + ("" if f["whole_schedule_measured"] else
               f"; {f['extrapolated_seconds_for_preset_epochs'] / 60:.1f} min extrapolated to {f['preset_epochs']} epochs")
        )
        if "decode" in row:
            d = row["decode"]
            lines.append(
                f"{name:9s} decode {d['image']}: read {d['read_full']['median_ms']:.0f} ms full, "
                f"{d['read_reduced']['median_ms']:.0f} ms reduced ({d['read_speedup']:.1f}x); predict "
                f"{d['predict_reduced_decode']['median_ms']:.0f} ms vs {d['predict_full_resolution']['median_ms']:.0f} ms "
                "at full resolution"
            )
        if "cuda" in row:
            c = row["cuda"]
            for prec in ("fp32", "bf16"):
                r = c[prec]
                graph = (f"graph b1 {r['graph_b1']['median_ms']:.2f} ms, b64 {r['graph_b64']['images_per_second']:.0f} img/s"
                         if "graph_b1" in r else f"graph failed: {r.get('graph_error')}")
                lines.append(
                    f"{name:9s} cuda {prec} pipeline: eager b1 {r['eager_b1']['median_ms']:.2f} ms, "
                    f"b64 {r['eager_b64']['images_per_second']:.0f} img/s; {graph}"
                )
            lines.append(
                f"{name:9s} cuda best: b1 {c['best_b1_ms']:.2f} ms (target <= 2), b64 "
                f"{c['best_b64_images_per_second']:.0f} img/s (target >= 3000); predict() b64 "
                f"{row['fp32']['predict_b64']['images_per_second']:.0f} img/s"
            )
        if "bank_search" in row:
            b = row["bank_search"]
            lines.append(
                f"{name:9s} bank search ({b['bank_rows']} rows): b1 bf16 {b['bf16_b1']['median_ms']:.1f} ms vs float32 "
                f"{b['float32_b1']['median_ms']:.1f} ms; b32 {b['bf16_b32']['median_ms']:.0f} vs "
                f"{b['float32_b32']['median_ms']:.0f} ms; from float64 {b['bf16_max_abs_diff_vs_float64']:.1e} vs "
                f"{b['float32_max_abs_diff_vs_float64']:.1e}"
            )
        if "tiled" in row:
            lines.append(f"{name:9s} " + tiled_summary(row["tiled"]))
        if "stages" in row:
            st = row["stages"]
            lines.append(f"{name:9s} stages, ms per image b1 -> b32: " + "; ".join(
                f"{k} {st['b1'][k]:.1f} -> {st['b32'][k]:.1f}" for k in st["b1"]))
    k = results["knn"]
    lines.append(f"kNN      : b1 {k['predict_b1']['median_ms']:.1f} ms, b32 {k['predict_b32']['images_per_second']:.1f} img/s, fit {k['fit_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
