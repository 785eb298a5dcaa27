"""Scoring with glibc's allocator as it comes against the thresholds ``stmae`` sets (A/B).

Why: :mod:`stmae.allocator` raises glibc's mmap and trim thresholds for the whole process,
which the ``stmae`` command does at start. A process-wide setting needs its own evidence:
what it buys, what it costs in memory, and that it changes no value. The setting cannot be
undone inside a process, so each measurement runs in a fresh worker process, the two
settings alternating round by round on one fitted run (same machine, same minute):

- ``b1_ms``: median ``Detector.predict`` latency on one decoded image (back-to-back calls);
- ``b32_ms_per_image``: ``Detector.predict`` on 32 images at once, per image (median);
- ``faults_per_image_b1`` / ``_b32``: minor page faults per image (``ru_minflt``);
- ``peak_rss_mb`` and ``rss_growth_mb``: the worker's peak resident memory, and how much its
  resident memory grew over the last half of its batch-32 calls (a heap that fragments grows);
- ``maps_sha256``: a hash of the batch-32 maps and scores, equal in every worker when the
  setting changes no value.

Run: ``python benchmarks/allocator.py [--run RUN_DIR] [--data DIR]``. Without ``--run`` it first
fits the default preset on 200 good Magnetic Tile images (as ``benchmarks/speed.py`` does, a
few minutes). Writes ``benchmarks/results/allocator-cpu.json`` with its provenance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile"
MODES = ("glibc default", "stmae thresholds")


def rss_mb() -> float:
    """Resident memory now (statm), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(run_dir: Path, data: Path, calls: int, repeats: int, threads: int) -> dict[str, Any]:
    """One measurement in this process, with the allocator as the environment says."""
    from stmae.allocator import tune_allocator

    tuning = tune_allocator()  # before torch allocates anything, as the command does
    import torch

    from stmae import Detector
    from stmae.data import load_mvtec

    torch.set_num_threads(threads)
    det = Detector.load(run_dir, device="cpu")
    test = load_mvtec(data).test[:32]
    images = [s.load_image() for s in test]
    det.predict(images, batch_size=32)
    det.predict(images[0])
    b1: list[float] = []
    b32: list[float] = []
    f1 = f32 = 0
    rss: list[float] = []
    for _ in range(repeats):
        start, before = time.perf_counter(), faults()
        preds = det.predict(images, batch_size=32)
        b32.append(time.perf_counter() - start)
        f32 += faults() - before
        rss.append(rss_mb())
        for _ in range(calls // repeats):
            start, before = time.perf_counter(), faults()
            det.predict(images[0])
            b1.append(time.perf_counter() - start)
            f1 += faults() - before
    digest = hashlib.sha256()
    for p in preds:
        digest.update(np.ascontiguousarray(p.anomaly_map, dtype=np.float32).tobytes())
        digest.update(np.float64(p.score).tobytes())
    half = len(rss) // 2
    return {
        "allocator": tuning.as_dict(),
        "b1_ms": float(np.median(b1) * 1000.0),
        "b32_ms_per_image": float(np.median(b32) * 1000.0 / len(images)),
        "faults_per_image_b1": f1 / max(1, len(b1)),
        "faults_per_image_b32": f32 / (repeats * len(images)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "rss_growth_mb": rss[-1] - rss[half] if len(rss) > 1 else 0.0,
        "maps_sha256": digest.hexdigest(),
    }


def fit_default(data: Path, train_count: int, work: Path) -> Path:
    """The default preset on ``train_count`` good images, chosen as ``benchmarks/speed.py`` does."""
    sys.path.insert(0, str(HERE))
    import baseline_knn as knn

    from stmae import fit
    from stmae.config import preset
    from stmae.data import load_mvtec

    ds = load_mvtec(data)
    train = [ds.train[i] for i in knn.subsample_indices(len(ds.train), train_count, seed=0)]
    return Path(fit(train, work / "default", preset("default"), quiet=True).run_dir)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        out[mode] = {
            key: float(np.median([r[key] for r in mine]))
            for key in ("b1_ms", "b32_ms_per_image", "faults_per_image_b1", "faults_per_image_b32", "peak_rss_mb", "rss_growth_mb")
        }
        out[mode]["b32_over_b1_rate"] = out[mode]["b1_ms"] / out[mode]["b32_ms_per_image"]
    a, b = out[MODES[0]], out[MODES[1]]
    out["tuned_over_default"] = {
        "b1_ms": b["b1_ms"] / a["b1_ms"],
        "b32_ms_per_image": b["b32_ms_per_image"] / a["b32_ms_per_image"],
        "peak_rss_mb": b["peak_rss_mb"] / a["peak_rss_mb"],
    }
    out["maps_identical"] = len({r["maps_sha256"] for r in rows}) == 1
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None, help="a fitted run folder (default: fit the default preset first)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Magnetic Tile in the MVTec layout")
    p.add_argument("--train", type=int, default=200, help="training images when fitting (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="worker pairs, alternating the two settings (default 3)")
    p.add_argument("--calls", type=int, default=100, help="batch-1 calls per worker (default 100)")
    p.add_argument("--repeats", type=int, default=8, help="batch-32 calls per worker (default 8)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "allocator-cpu.json")
    p.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.run, args.data, args.calls, args.repeats, args.threads)))
        return None
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: Magnetic Tile not found; pass --data DIR (MVTec layout)")
    from stmae import provenance

    started = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stmae-allocator-") as tmp:
        run_dir = args.run
        if run_dir is None:
            print(f"[allocator] fitting the default preset on {args.train} images ...", flush=True)
            run_dir = fit_default(args.data, args.train, Path(tmp))
        for round_ in range(args.rounds):
            for mode in MODES:
                env = dict(os.environ, STMAE_MALLOC_TUNING="1" if mode == MODES[1] else "0")
                for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
                    env.pop(name, None)
                cmd = [sys.executable, __file__, "--worker", mode, "--run", str(run_dir), "--data", str(args.data),
                       "--calls", str(args.calls), "--repeats", str(args.repeats), "--threads", str(args.threads)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"worker ({mode}) failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(mode=mode, round=round_)
                rows.append(row)
                print(f"[allocator] round {round_} {mode}: b1 {row['b1_ms']:.1f} ms, b32 "
                      f"{row['b32_ms_per_image']:.1f} ms/image, {row['faults_per_image_b32']:.0f} faults/image", flush=True)
    results = {"benchmark": "allocator", "threads": args.threads, "summary": summarise(rows), "rows": rows,
               "provenance": provenance.collect("cpu", started=started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    tmp_out.replace(args.out)
    s = results["summary"]
    for mode in MODES:
        m = s[mode]
        print(f"{mode:17s}: b1 {m['b1_ms']:.1f} ms, b32 {m['b32_ms_per_image']:.1f} ms/image "
              f"({m['b32_over_b1_rate']:.2f}x the b1 rate), peak RSS {m['peak_rss_mb']:.0f} MB")
    print(f"maps identical: {s['maps_identical']}; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
