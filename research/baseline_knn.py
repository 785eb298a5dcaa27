"""Run the PatchCore-style kNN yardstick alone (:mod:`stmae_research.knn`) and write its JSON.

Run: ``python research/baseline_knn.py [--data PATH] [--train-limit 200] [--seed 42]
[--coreset 0.1] [--image-size 256] [--grid-size 32] [--aggregate 3] [--out JSON] [--quiet]``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from stmae import provenance
from stmae.fileio import atomic_write_json
from stmae.data import load_mvtec
from stmae_research.knn import DEFAULT_DATA, PROJECTION_DIM, REFERENCE, REPO, knn_baseline, make_config, subsample_indices

RESULTS_PATH = REPO / "benchmarks" / "results" / "baseline_knn_magnetic_tile.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec-style category folder")
    p.add_argument("--train-limit", type=int, default=200, help="train/good images kept (<= 0: all)")
    p.add_argument("--seed", type=int, default=42, help="seeds the train subsample and the coreset")
    p.add_argument("--coreset", type=float, default=0.1, help="fraction of training patches in the bank")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--grid-size", type=int, default=32)
    p.add_argument("--aggregate", type=int, default=3, help="odd k of the k x k local mean (1 = off)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS_PATH, help="JSON results file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    cfg = make_config(args.image_size, args.grid_size, args.aggregate)
    dataset = load_mvtec(args.data)
    limit = args.train_limit if args.train_limit > 0 else None
    keep = subsample_indices(len(dataset.train), limit, args.seed)
    train = [dataset.train[i] for i in keep]

    results = knn_baseline(train, dataset.test, cfg, coreset_ratio=args.coreset, seed=args.seed, quiet=args.quiet)
    scores = results.pop("scores")
    per_type = results.pop("per_type")
    report = {
        "command": shlex.join(["python", "research/baseline_knn.py", *(sys.argv[1:] if argv is None else argv)]),
        "method": "kNN memory bank (PatchCore-style greedy coreset) on stmae features",
        "data": str(args.data),
        "protocol": {
            "train_subsample": (
                f"sorted(np.random.default_rng({args.seed}).choice({len(dataset.train)}, {len(keep)}, "
                "replace=False)) over dataset.train in loader order"
                if limit is not None and limit < len(dataset.train)
                else "all of train/good"
            ),
            "n_train_available": len(dataset.train),
            "train_images": [s.display_name for s in train],
            "test": "full test split",
        },
        "settings": {
            "seed": args.seed,
            "coreset_ratio": args.coreset,
            "coreset_projection_dim": PROJECTION_DIM,
            "distance": "L2 to nearest bank patch",
            "threads": args.threads,
            "config": {k: cfg.to_dict()[k] for k in ("backbone", "features", "infer")},
        },
        "device": "cpu",
        "timing_note": f"{args.threads} torch thread(s) on a 2-core machine shared with other jobs",
        "reference_before_this_repository": REFERENCE,
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "metrics": {k: v for k, v in results.items() if not k.endswith("seconds") and k != "predict_images_per_second"},
        "timings": {k: v for k, v in results.items() if k.endswith("seconds") or k == "predict_images_per_second"},
        "per_type": per_type,
        "scores": [{"name": s.display_name, "label": s.label, "score": sc} for s, sc in zip(dataset.test, scores)],
    }
    report["provenance"] = provenance.collect("cpu", started=started)
    atomic_write_json(args.out, report)
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max", "image_ap", "pixel_ap")
    print("  ".join(f"{k} {results[k]:.4f}" for k in keys if results.get(k) is not None))
    print(
        f"fit {results['fit_seconds']:.1f} s  predict {results['predict_seconds']:.1f} s "
        f"({results['predict_images_per_second']:.1f} img/s)  bank {results['bank_size']} of "
        f"{results['n_train_patches']} patches  -> {args.out}"
    )
    return report


if __name__ == "__main__":
    main()
