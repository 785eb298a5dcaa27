"""Pixel metrics of one fitted run at the model input size and at the masks' own size.

Why: ``stmae test`` resizes masks to the model input by default, which deletes thin defects
(a crack a few pixels tall on a line-camera frame) from the very masks it scores against.
This script fits a run once (or loads one) and evaluates the same maps both ways,
``--eval-size model`` and ``--eval-size native``, so the difference is the protocol alone.

    python benchmarks/eval_size.py ../shared/data/kolektorsdd/kolektorsdd \\
        --out benchmarks/results/eval_size_kolektorsdd.json
    python benchmarks/eval_size.py ../shared/data/kolektorsdd/kolektorsdd \\
        --set features.geometry=tile --set features.scale=0.5 --out benchmarks/results/tiled_kolektorsdd.json

(a tiled run's ``model`` protocol resizes each mask to its map, the scaled image's size).

Writes one JSON file with both metric sets, the run's settings and the provenance block
(command, commit, device with the CPU model, versions).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_ap")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="MVTec-style category folder with masks")
    p.add_argument("--out", type=Path, required=True, help="results JSON to write")
    p.add_argument("--run", type=Path, help="an already fitted run folder (default: fit one)")
    p.add_argument("--preset", default="default", help="preset of the fit (default: default)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the fit, e.g. features.geometry=tile (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--pixel-budget", type=int, default=None,
                   help="passed to evaluate (default: its own, PIXEL_BUDGET)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.time()
    import torch

    import stmae
    from stmae import provenance
    from stmae.config import preset
    from stmae.data import open_dataset
    from stmae.evaluate import PIXEL_BUDGET, evaluate
    from stmae.fileio import atomic_write_json

    torch.set_num_threads(args.threads)
    dataset = open_dataset(args.data)
    fit_seconds = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.run is None:
            cfg = preset(args.preset)
            if args.epochs:
                cfg.set("train.epochs", args.epochs)
            for item in args.sets:
                key, sep, value = item.partition("=")
                if not sep:
                    raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
                cfg.set(key.strip(), value.strip())
            cfg.validate()
            t0 = time.time()
            det = stmae.fit(args.data, Path(tmp) / "run", cfg, quiet=False).detector
            fit_seconds = round(time.time() - t0, 1)
        else:
            det = stmae.load(args.run, device="cpu")
        budget = args.pixel_budget or PIXEL_BUDGET
        results: dict[str, Any] = {}
        for size in ("model", "native"):
            t0 = time.time()
            ev = evaluate(det, dataset, quiet=False, eval_size=size, pixel_budget=budget)
            results[size] = {
                **{k: ev.metrics.get(k) for k in METRICS},
                "pixel_fraction": ev.pixel_fraction,
                "n_images": ev.metrics["n_images"],
                "seconds": round(time.time() - t0, 1),
            }
            print(size, {k: results[size][k] for k in METRICS}, flush=True)
    out = {
        "what": "one fitted run's metrics with masks resized to the model input (model) and at their own size (native)",
        "data": str(args.data),
        "preset": args.preset if args.run is None else None,
        "overrides": list(args.sets),
        "geometry": det.geometry.to_dict(),
        "run": str(args.run) if args.run else None,
        "config": det.config.to_dict(),
        "n_train": len(dataset.train),
        "fit_seconds": fit_seconds,
        "threads": args.threads,
        "pixel_budget": budget,
        "results": results,
        "provenance": provenance.collect("cpu", started=started),
    }
    atomic_write_json(args.out, out)
    print(f"written to {args.out}")
    return out


if __name__ == "__main__":
    main()
