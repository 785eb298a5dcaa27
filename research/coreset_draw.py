"""How much do the memory's maps move with the coreset draw alone? (Magnetic Tile, ``mt_val`` / ``mt_test``)

Why: with the same 200 training images, the kNN yardstick of ``benchmarks/quality.py`` kept
an AUPRO lead over the package's memory alone (0.7329 against 0.7287 on ``mt_test``). The two
banks differ only in how they are drawn: the package standardises with the statistics of
the images it trained on (180) and runs the greedy coreset with ``train.seed`` (0) over the
trained-on images, then the held-out ones. The yardstick standardises with all 200 and runs
the coreset with seed 42 in loader order. This script rebuilds the memory both ways for
several seeds and scores each bank *alone* (the distance map, no residual) on both halves.
If the spread over seeds is as large as the gap, the gap is the draw, not the method.

Run: ``python research/coreset_draw.py --run RUN [--data DIR] [--seeds 0,1,2,3,42] [--threads 2]``
with ``RUN`` a default run folder fitted on the 200-image protocol (e.g. by
``benchmarks/quality.py``). Writes ``research/results/coreset_draw.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

from stmae_research import knn  # noqa: E402
from blend_val import AUPRO_THRESHOLDS, DEFAULT_DATA, MT_SUBSAMPLE_SEED  # noqa: E402  (one protocol)

import stmae  # noqa: E402
from stmae import provenance  # noqa: E402
from stmae.fileio import atomic_write_json  # noqa: E402
from stmae.data import load_mvtec  # noqa: E402
from stmae.evaluate import mask_at  # noqa: E402
from stmae.features import FeatureStats, extract_features  # noqa: E402
from stmae.metrics import aupro, auroc  # noqa: E402
from stmae.model.memory import PatchMemory  # noqa: E402
from stmae.pipeline import MapPipeline, postprocess  # noqa: E402
from stmae_research.protocols import split_real_defects  # noqa: E402



def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--seeds", default="0,1,2,3,42")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "coreset_draw.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    ds = load_mvtec(args.data)
    train = [ds.train[i] for i in knn.subsample_indices(len(ds.train), 200, MT_SUBSAMPLE_SEED)]
    det = stmae.load(args.run, device="cpu")
    cfg = det.config
    size = cfg.features.image_size
    val_names = set(det.meta["val_images"])
    fit_order = [i for i, s in enumerate(train) if (s.name or str(s.path)) not in val_names]
    fit_order += [i for i, s in enumerate(train) if (s.name or str(s.path)) in val_names]
    feats = extract_features(det.extractor, train, size, quiet=True)
    parts = split_real_defects(ds.test, seed=0)
    sets = {k: parts[k] for k in ("mt_val", "mt_test")}
    test_feats = {k: extract_features(det.extractor, v, size, quiet=True) for k, v in sets.items()}
    truth = {k: (np.array([s.label for s in v]), np.stack([mask_at(s, size) for s in v])) for k, v in sets.items()}
    builds = {
        # (statistics, patch order, the seed the tool itself uses)
        "package (stats of the 180 trained-on images; trained-on, then held-out order)": (det.stats, fit_order, cfg.train.seed),
        "kNN yardstick (stats of all 200; loader order)": (FeatureStats.from_features(feats), list(range(len(train))), 42),
    }

    def score(stats: FeatureStats, bank: torch.Tensor) -> dict[str, dict[str, float]]:
        pipe = MapPipeline.knn(det.extractor, stats, bank, cfg)
        out = {}
        for name, f in test_feats.items():
            with torch.inference_mode():
                grid = torch.cat([pipe.grid_maps(pipe.standardize(c)) for c in torch.split(f, 16)])
            maps, scores = postprocess(grid, cfg.infer, size)
            labels, masks = truth[name]
            out[name] = {
                "image_auroc": round(auroc(labels, scores.numpy()), 4),
                "pixel_auroc": round(auroc(masks.ravel(), maps.numpy().ravel()), 4),
                "aupro": round(aupro(masks, maps.numpy(), num_thresholds=AUPRO_THRESHOLDS), 4),
            }
        return out

    rows: dict[str, Any] = {}
    stored = score(det.stats, det.memory.bank)
    rows["the run's own bank"] = stored
    print("the run's own bank", stored, flush=True)
    for build, (stats, order, own_seed) in builds.items():
        per_seed = {}
        for seed in seeds:
            memory = PatchMemory.fit(stats.apply(feats[order]), cfg.fit.bank_coreset, seed=seed)
            per_seed[str(seed)] = score(stats, memory.bank)
            print(build, seed, per_seed[str(seed)], flush=True)
        spread = {
            split: {m: [min(r[split][m] for r in per_seed.values()), max(r[split][m] for r in per_seed.values())]
                    for m in ("image_auroc", "pixel_auroc", "aupro")}
            for split in sets
        }
        rows[build] = {"tool_seed": own_seed, "per_seed": per_seed, "min_max": spread}
    result = {
        "script": "research/coreset_draw.py",
        "protocol": {
            "train": "the 200-image protocol's training images (seeded subsample, seed 42)",
            "scoring": "each bank alone: distance to the nearest bank patch, the run's smoothing and image score",
            "coreset": f"greedy, {cfg.fit.bank_coreset:g} of the patches, seeds {seeds}",
            "metrics": f"image and pixel AUROC exact; AUPRO on {AUPRO_THRESHOLDS} quantile thresholds",
        },
        "run": str(args.run),
        "model_code_revision": det.meta.get("code_revision"),
        "rows": rows,
        "provenance": provenance.collect("cpu", started=started),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
