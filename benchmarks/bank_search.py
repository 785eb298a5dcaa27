"""Nearest-good-patch search: the package's blocked matrix products against faiss-cpu.

Why: with the memory in the map, the bank search is the largest cost of predict on a CPU
(``benchmarks/speed.py``). The issue "One fast inference pipeline" asks to measure faiss
against the package's search and to adopt it only if it wins. What is timed, per bank size
(the 1 % and 10 % coresets of 200 Magnetic Tile-sized training images: 1,843 and 18,432
patches of 176 channels) and per query count (one 32 x 32 grid = 1,024 queries, i.e. batch 1;
32 grids = 32,768 queries, batch 32):

- ``torch``: :func:`stmae.model.memory.nearest_distances` (exact, float32);
- ``bf16``: :class:`stmae.model.memory.BankSearch`, what predict runs on a CPU with AMX: a
  bf16 product rules bank rows out, the rest are measured in float32 (exact; its largest
  difference from a float64 search is reported, and whether this CPU has AMX). On these
  tight random clusters bf16 cannot rule enough rows out, so it falls back to float32
  (``bf16_fell_back_to_float32``): this is its worst case. Its speed on real features is in
  ``benchmarks/speed.py`` (``bank_search``);
- ``faiss flat``: ``IndexFlatL2`` (exact, the same brute force in faiss's BLAS kernels);
- ``faiss hnsw``: ``IndexHNSWFlat`` (M 32, efSearch 64): approximate, reported with its
  recall (share of queries whose nearest patch it finds) and largest distance error.

Inputs are random clustered features with the real shapes (the speed of a brute-force search
does not depend on the values; HNSW recall does, so the clusters mimic a texture's patches).

Run: ``python benchmarks/bank_search.py [--threads 2] [--repeats 20]``; writes
``benchmarks/results/bank_search.json`` with its provenance. Needs ``faiss-cpu`` for the
faiss rows (they are left out, and the file says so, without it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from stmae import provenance
from stmae.fileio import atomic_write_json
from stmae.model.memory import BankSearch, bf16_matmul_is_fast, nearest_distances

HERE = Path(__file__).resolve().parent
CHANNELS = 176
BANKS = (1843, 18432)
QUERIES = (1024, 32768)


def clustered(rows: int, gen: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    pick = gen.integers(0, len(centres), rows)
    return (centres[pick] + 0.5 * gen.standard_normal((rows, CHANNELS))).astype(np.float32)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bank_search.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    try:
        import faiss  # type: ignore[import-not-found]

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss = None
    gen = np.random.default_rng(0)
    centres = 2.0 * gen.standard_normal((64, CHANNELS))
    rows: list[dict[str, Any]] = []
    for bank_rows in BANKS:
        bank = clustered(bank_rows, gen, centres)
        tb = torch.from_numpy(bank)
        tsq = (tb * tb).sum(dim=1)
        flat = hnsw = None
        if faiss is not None:
            flat = faiss.IndexFlatL2(CHANNELS)
            flat.add(bank)
            hnsw = faiss.IndexHNSWFlat(CHANNELS, 32)
            t0 = time.perf_counter()
            hnsw.add(bank)
            hnsw_build = time.perf_counter() - t0
            hnsw.hnsw.efSearch = 64
        for q_rows in QUERIES:
            q = clustered(q_rows, gen, centres)
            tq = torch.from_numpy(q)
            with torch.inference_mode():
                exact = nearest_distances(tq, tb, tsq).numpy()
                row: dict[str, Any] = {
                    "bank": bank_rows, "queries": q_rows,
                    "torch_ms": median_ms(lambda: nearest_distances(tq, tb, tsq), args.repeats),
                }
                t0 = time.perf_counter()
                search = BankSearch(tb)
                row["bf16_build_s"] = round(time.perf_counter() - t0, 4)
                row["bf16_ms"] = median_ms(lambda: search(tq), args.repeats)
                truth = np.concatenate([
                    torch.cdist(tq[i : i + 4096].double(), tb.double()).amin(dim=1).numpy()
                    for i in range(0, q_rows, 4096)
                ])
                row["bf16_max_abs_diff_vs_float64"] = float(np.abs(search(tq).numpy() - truth).max())
                row["torch_max_abs_diff_vs_float64"] = float(np.abs(exact - truth).max())
                row["bf16_over_torch"] = row["bf16_ms"] / row["torch_ms"]
                row["bf16_fell_back_to_float32"] = search.gave_up
            if flat is not None and hnsw is not None:
                row["faiss_flat_ms"] = median_ms(lambda: flat.search(q, 1), args.repeats)
                d_flat = np.sqrt(np.maximum(flat.search(q, 1)[0][:, 0], 0))
                row["faiss_flat_max_abs_diff"] = float(np.abs(d_flat - exact).max())
                row["faiss_hnsw_ms"] = median_ms(lambda: hnsw.search(q, 1), args.repeats)
                d_h, i_h = hnsw.search(q, 1)
                _, i_f = flat.search(q, 1)
                row["faiss_hnsw_recall"] = float(np.mean(i_h[:, 0] == i_f[:, 0]))
                row["faiss_hnsw_max_rel_error"] = float(np.max(np.sqrt(np.maximum(d_h[:, 0], 0)) / np.maximum(exact, 1e-6) - 1))
                row["faiss_hnsw_build_s"] = round(hnsw_build, 3)
                row["torch_over_faiss_flat"] = row["torch_ms"] / row["faiss_flat_ms"]
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    result = {
        "benchmark": "bank_search",
        "channels": CHANNELS,
        "threads": args.threads,
        "faiss": None if faiss is None else faiss.__version__,
        "amx": bf16_matmul_is_fast(),
        "note": None if faiss is not None else "faiss-cpu is not installed: torch rows only",
        "rows": rows,
        "provenance": provenance.collect("cpu", started=started),
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
