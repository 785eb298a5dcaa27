"""How should the residual and the memory be combined? Chosen on real defects (``mt_val``), reported on ``mt_test``.

Why: painted validation defects rated the median-calibrated blend above the memory alone;
Magnetic Tile's real defects say the opposite (issue "Detection quality, round 2"). This
script splits the Magnetic Tile test set into two seeded halves, stratified by defect type
with the good images included (:func:`stmae_research.protocols.split_real_defects`), trains ONE model,
and scores it many ways from the same grid maps:

- ``memory``: the distance to the nearest good patch alone (what a kNN would give);
- ``residual``: the ST-MAE residual alone;
- ``median s``: today's blend, each map divided by its median over held-out good images,
  memory share s;
- ``quantile s``: each map mapped to ``(m - q90) / (q995 - q90)`` with the 0.90 and 0.995
  quantiles of held-out good images' grid cells (as EfficientAD combines its two maps), share s;
- ``gated s``: ``(1 - s) * max(r', 0) + s * d'`` on the quantile scale: the residual adds
  evidence only where it exceeds its good-image 0.90 quantile;
- ``max``: the larger of the two quantile-scaled maps;
- ``split``: the image score of one variant with the map of another.

Every choice is made on ``mt_val`` only; ``mt_test`` and the full test split are reported
next to it. The kNN yardstick runs on the same split in the same run.

Run: ``python research/blend_val.py [--data DIR] [--preset fast] [--epochs 40] [--threads 2]``
(about 15 min on 2 CPU threads); writes ``research/results/blend_val.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

from stmae_research import knn  # noqa: E402

import stmae  # noqa: E402
from stmae import provenance  # noqa: E402
from stmae.config import preset as preset_config  # noqa: E402
from stmae.data import load_mvtec  # noqa: E402
from stmae.evaluate import mask_at  # noqa: E402
from stmae.features import extract_features  # noqa: E402
from stmae.metrics import aupro, auroc  # noqa: E402
from stmae.model.memory import BLEND_QUANTILES  # noqa: E402
from stmae.pipeline import MapPipeline, blend, blend_scales, postprocess  # noqa: E402
from stmae_research.protocols import split_real_defects  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile"
MT_SUBSAMPLE_SEED = 42  # the 200-image protocol's training subset (benchmarks/quality.py)
AUPRO_THRESHOLDS = 500


def metrics(grid: torch.Tensor, labels: np.ndarray, masks: np.ndarray, cfg: Any, score_grid: torch.Tensor | None = None) -> dict[str, float]:
    """Image AUROC and pixel AUROC exact; AUPRO on 500 quantile thresholds (a research shortcut:
    the exact curve over 19 M pixels takes minutes per variant on two busy cores)."""
    maps, scores = postprocess(grid, cfg.infer, cfg.features.image_size)
    if score_grid is not None:
        _, scores = postprocess(score_grid, cfg.infer, cfg.features.image_size)
    m = maps.numpy()
    return {
        "image_auroc": round(auroc(labels, scores.numpy()), 4),
        "pixel_auroc": round(auroc(masks.ravel(), m.ravel()), 4),
        "aupro": round(aupro(masks, m, num_thresholds=AUPRO_THRESHOLDS), 4),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--preset", default="fast")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=REPO / ".devdata" / "blend_val")
    p.add_argument("--out", type=Path, default=HERE / "results" / "blend_val.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    ds = load_mvtec(args.data)
    keep = knn.subsample_indices(len(ds.train), 200, MT_SUBSAMPLE_SEED)
    train = [ds.train[i] for i in keep]
    cfg = preset_config(args.preset).override({"train.epochs": args.epochs, "train.device": "cpu"})
    run = args.work / "run"
    if (run / "meta.json").is_file():
        det = stmae.load(run, device="cpu")
        fit_seconds = det.meta.get("fit_seconds")
    else:
        result = stmae.fit(train, run, cfg, quiet=False, resume=True)
        det, fit_seconds = result.detector, result.meta["fit_seconds"]
    cfg = det.config
    val_names = set(det.meta["val_images"])
    calib = [s for s in train if (s.name or str(s.path)) in val_names]
    fit_train = [s for s in train if (s.name or str(s.path)) not in val_names]
    parts = split_real_defects(ds.test, seed=0)
    size = cfg.features.image_size

    pipe: MapPipeline = det.pipeline
    grids: dict[str, dict[str, torch.Tensor]] = {}
    truth: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sets = {"mt_val": parts["mt_val"], "mt_test": parts["mt_test"]}
    with torch.inference_mode():
        for name, samples in sets.items():
            feats = extract_features(det.extractor, samples, size, quiet=True, desc=name)
            x = pipe.standardize(feats)
            grids[name] = {
                "residual": torch.cat([pipe.residual(c) for c in torch.split(x, 16)]),
                "distance": torch.cat([pipe.distances(c) for c in torch.split(x, 16)]),
                "package": torch.cat([pipe.grid_maps(c) for c in torch.split(x, 16)]),
            }
            truth[name] = (np.array([s.label for s in samples]), np.stack([mask_at(s, size) for s in samples]))

    # Every blend is the package's (stmae.pipeline.blend) with the scales the fit stored: the
    # quantiles of the held-out images measured against the bank *before* they joined it.
    # (Rows of this script before 1c514a8 measured them against the final bank, which holds
    # those images: the distance's quantiles shrank towards 0 and every blend leaned on it.)
    median, quantile = blend_scales(det.memory, "median"), blend_scales(det.memory, "quantile")

    def variants(g: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        r, d = g["residual"], g["distance"]

        def mix(share: float, gate: bool = False) -> torch.Tensor:
            return blend(r, d, share, quantile, gate=gate)

        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {"memory": (d, None), "residual": (r, None)}
        out["median 0.8"] = (blend(r, d, 0.8, median), None)
        for s in (0.5, 0.8, 0.9):
            out[f"quantile {s}"] = (mix(s), None)
        out["split: map quantile 0.5, score memory"] = (mix(0.5), d)
        # The residual as added evidence only: below its good-image 0.90 quantile it adds nothing.
        for s in (0.5, 0.8):
            out[f"gated {s}"] = (mix(s, gate=True), None)
        out["max"] = (torch.maximum(mix(0.0), mix(1.0)), None)
        # One share for the image score, another for the map (issue: keep each part's strength).
        out["split: map quantile 0.9, score quantile 0.5"] = (mix(0.9), mix(0.5))
        out["split: map gated 0.5, score quantile 0.5"] = (mix(0.5, gate=True), mix(0.5))
        return out

    # The stages this script blends must give the package's own grid maps at the run's setting.
    own = cfg.infer
    for split in ("mt_val", "mt_test"):
        g = grids[split]
        mine = blend(g["residual"], g["distance"], own.memory, blend_scales(det.memory, own.blend), gate=own.blend == "gated")
        if not torch.allclose(mine, g["package"], rtol=1e-4, atol=1e-4):
            raise SystemExit(f"{split}: the script's {own.blend} {own.memory} blend differs from the package's grid maps")

    rows: dict[str, dict[str, Any]] = {}
    for split in ("mt_val", "mt_test"):
        labels, masks = truth[split]
        for name, (grid, score_grid) in variants(grids[split]).items():
            rows.setdefault(name, {})[split] = metrics(grid, labels, masks, cfg, score_grid)
            print(f"{split} {name:45s} {rows[name][split]}", flush=True)

    bank = knn.fit_bank(fit_train, cfg, coreset_ratio=cfg.fit.bank_coreset)
    kpipe = MapPipeline.knn(bank.extractor, bank.stats, bank.bank, cfg)
    for split in ("mt_val", "mt_test"):
        labels, masks = truth[split]
        feats = extract_features(bank.extractor, sets[split], size, quiet=True)
        with torch.inference_mode():
            grid = torch.cat([kpipe.grid_maps(kpipe.standardize(c)) for c in torch.split(feats, 16)])
        rows.setdefault("kNN yardstick", {})[split] = metrics(grid, labels, masks, cfg)
        print(f"{split} kNN {rows['kNN yardstick'][split]}", flush=True)

    def mean_val(name: str) -> float:
        return float(np.mean(list(rows[name]["mt_val"].values())))

    candidates = [n for n in rows if n not in ("kNN yardstick",)]
    best = max(candidates, key=mean_val)
    result = {
        "script": "research/blend_val.py",
        "protocol": {
            "train": f"{len(train)} Magnetic Tile train/good images (seeded subsample, seed {MT_SUBSAMPLE_SEED}); "
            f"{len(calib)} held out by fit for calibration",
            "mt_val": f"{len(parts['mt_val'])} test images (seeded half, stratified by defect type, good included)",
            "mt_test": f"{len(parts['mt_test'])} test images (the other half)",
            "model": f"preset {args.preset}, {args.epochs} epochs, K = {cfg.infer.num_pairs}, coreset {cfg.fit.bank_coreset}",
            "quantiles": BLEND_QUANTILES,
            "metrics": f"image and pixel AUROC exact; AUPRO on {AUPRO_THRESHOLDS} quantile thresholds",
        },
        "fit_seconds": fit_seconds,
        "model_code_revision": det.meta.get("code_revision"),  # a run folder found in --work is scored, not refitted
        "rows": rows,
        "chosen_on_mt_val": {"variant": best, "mean_of_three_metrics": round(mean_val(best), 4)},
        "provenance": provenance.collect("cpu", started=started),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"chosen on mt_val: {best}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
