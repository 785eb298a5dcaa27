"""Which map should the pixel output show? Chosen on real defects (``mt_val``), reported on ``mt_test``.

Why: the image score and the pixel map ask different things of the residual. Ranking images
needs a residual that is quiet on good images (``mse_cos``, high only where magnitude *and*
direction disagree); localising a defect needs one that is high over its whole extent. The
issue on detection quality saw the split on another data set (the residual localised better,
the memory ranked images better) and put "a different share for the map than for the image
score" in scope. This script keeps the image score as the default has it (``infer.residual``,
``infer.blend``, ``infer.distance_weight``) and scores the *pixel map* many ways from one trained model:
residual kind (``mse_cos``, ``mse``, ``cos``) x blend (``quantile``, ``gated``) x memory share
(0.5 ... 0.9), plus the memory alone and the same-run kNN yardstick.

Every pixel residual is put on the scale of the held-out good images' grid cells (their 0.90
and 0.995 quantiles, as :meth:`stmae.model.PatchMemory.calibrate` does), and the distance keeps
the scale the fit stored (measured before those images joined the bank). The script checks that
its blend at the run's own settings equals the package's :meth:`MapPipeline.grid_pair`, both maps.

Choice rule (mt_val only): the best mean of pixel AUROC and AUPRO among the rows at the run's
memory share (so that one ``--distance-weight`` moves both maps) that are at or above the memory alone
on both. The other shares are reported to show what a second share would buy.

Run: ``python research/pixel_map_val.py [--run RUN] [--work DIR] [--data DIR] [--threads 2]``:
scores the run folder ``RUN`` (fitted on the 200-image protocol's images, e.g. by
``benchmarks/quality.py``), or fits the default preset into ``DIR/run`` first (about 5 min on
2 CPU threads). Writes ``research/results/pixel_map_val.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from stmae.config import preset as preset_config  # noqa: E402
from stmae.data import load_mvtec  # noqa: E402
from stmae.evaluate import mask_at  # noqa: E402
from stmae.features import extract_features  # noqa: E402
from stmae.metrics import aupro, auroc  # noqa: E402
from stmae.model.memory import _quantile_range  # noqa: E402
from stmae.pipeline import MapPipeline, blend, blend_scales, postprocess  # noqa: E402
from stmae_research.protocols import split_real_defects  # noqa: E402

KINDS = ("mse_cos", "mse", "cos")
BLENDS = ("quantile", "gated")
SHARES = (0.5, 0.6, 0.7, 0.8, 0.9)


def pixel_metrics(grid: torch.Tensor, masks: np.ndarray, cfg: Any) -> dict[str, float]:
    """Pixel AUROC exact; AUPRO on 500 quantile thresholds (as research/blend_val.py)."""
    maps = postprocess(grid, cfg.infer, cfg.features.image_size)[0].numpy()
    return {
        "pixel_auroc": round(auroc(masks.ravel(), maps.ravel()), 4),
        "aupro": round(aupro(masks, maps, num_thresholds=AUPRO_THRESHOLDS), 4),
    }


def image_auroc(grid: torch.Tensor, labels: np.ndarray, cfg: Any) -> float:
    return round(auroc(labels, postprocess(grid, cfg.infer, cfg.features.image_size)[1].numpy()), 4)


def mean_residuals(pipe: MapPipeline, feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw features -> every residual kind of :data:`KINDS`, averaged over the K split pairs, from one transformer call per chunk."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    with torch.inference_mode():
        for chunk in torch.split(feats, 16):
            x = pipe.standardize(chunk)
            recon, xs = pipe.reconstructions(x)
            for kind in KINDS:  # the package's own per-kind residual, averaged over the K pairs
                out[kind].append(pipe._mean_residual(recon, xs, kind, x.shape[0]))
    return {k: torch.cat(v) for k, v in out.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--run", type=Path, default=None, help="a run folder fitted on the 200-image protocol (else fit one)")
    p.add_argument("--work", type=Path, default=REPO / ".devdata" / "pixel_map_val")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "pixel_map_val.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    ds = load_mvtec(args.data)
    keep = knn.subsample_indices(len(ds.train), 200, MT_SUBSAMPLE_SEED)
    train = [ds.train[i] for i in keep]
    run = args.run or args.work / "run"
    if (run / "meta.json").is_file():
        det = stmae.load(run, device="cpu")
    else:
        cfg = preset_config("default").override({"train.device": "cpu"})
        det = stmae.fit(train, run, cfg, quiet=False, resume=True).detector
    cfg = det.config
    val_names = set(det.meta["val_images"])
    calib = [s for s in train if (s.name or str(s.path)) in val_names]
    if len(calib) != len(val_names):
        raise SystemExit(f"{run}: its held-out images are not among the 200-image protocol's training images")
    size = cfg.features.image_size
    pipe: MapPipeline = det.pipeline
    share, score_blend = cfg.infer.distance_weight, cfg.infer.blend
    if not 0.0 < share < 1.0:
        raise SystemExit(f"{run}: infer.distance_weight is {share}; this study needs a blend")

    # The pixel residuals' scales, from the held-out good images (as the fit measures them).
    calib_res = mean_residuals(pipe, extract_features(det.extractor, calib, size, quiet=True))
    ranges = {kind: _quantile_range(r) for kind, r in calib_res.items()}
    if det.memory.pixel_residual_range is not None:  # the fit's own: the script must measure the same
        own = pipe.pixel_residual
        if not np.allclose(ranges[own], det.memory.pixel_residual_range, rtol=1e-4):
            raise SystemExit(f"the script's {own} range {ranges[own]} differs from the fit's {det.memory.pixel_residual_range}")

    parts = split_real_defects(ds.test, seed=0)
    sets = {"mt_val": parts["mt_val"], "mt_test": parts["mt_test"]}
    grids: dict[str, dict[str, Any]] = {}
    truth: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, samples in sets.items():
        feats = extract_features(det.extractor, samples, size, quiet=True, desc=name)
        with torch.inference_mode():
            dist = torch.cat([pipe.distances(pipe.standardize(c)) for c in torch.split(feats, 16)])
            pairs = [pipe.grid_pair(pipe.standardize(c)) for c in torch.split(feats, 16)]
        grids[name] = {
            "residual": mean_residuals(pipe, feats),
            "distance": dist,
            "package_pixel": torch.cat([a for a, _ in pairs]),
            "package_score": torch.cat([b for _, b in pairs]),
            "feats": feats,
        }
        truth[name] = (np.array([s.label for s in samples]), np.stack([mask_at(s, size) for s in samples]))

    def scales(kind: str) -> tuple[float, float, float, float]:
        mem = dataclasses.replace(det.memory, residual_range=ranges[kind])
        return blend_scales(mem, "quantile")

    def pixel_map(g: dict[str, Any], kind: str, mode: str, s: float) -> torch.Tensor:
        return blend(g["residual"][kind], g["distance"], s, scales(kind), gate=mode == "gated")

    # The script's blends are the package's maps at the run's own settings.
    for name, g in grids.items():
        score = blend(g["residual"][cfg.infer.residual], g["distance"], share,
                      blend_scales(det.memory, score_blend), gate=score_blend == "gated")
        pixel = pixel_map(g, pipe.pixel_residual, pipe.pixel_blend, share)
        for mine, theirs, what in ((score, g["package_score"], "score"), (pixel, g["package_pixel"], "pixel")):
            if not torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4):
                raise SystemExit(f"{name}: the script's {what} map differs from the package's grid_pair")

    rows: dict[str, dict[str, Any]] = {}

    def add(row: str, grid_of: Any) -> None:
        for name, g in grids.items():
            labels, masks = truth[name]
            grid = grid_of(g)
            rows.setdefault(row, {})[name] = {**pixel_metrics(grid, masks, cfg), "image_auroc_of_this_map": image_auroc(grid, labels, cfg)}
        print(f"{row:40s} {rows[row]}", flush=True)

    add("memory alone", lambda g: g["distance"])
    add(f"score map ({cfg.infer.residual}, {score_blend} {share}): one map", lambda g: g["package_score"])
    for kind in KINDS:
        add(f"{kind} alone", lambda g, k=kind: g["residual"][k])
        for mode in BLENDS:
            for s in SHARES:
                add(f"{kind} {mode} {s}", lambda g, k=kind, m=mode, s=s: pixel_map(g, k, m, s))

    image = {name: image_auroc(g["package_score"], truth[name][0], cfg) for name, g in grids.items()}
    bank = knn.fit_bank(train, cfg, coreset_ratio=cfg.fit.bank_coreset)  # all 200 banked, as quality.py's
    kpipe = MapPipeline.knn(bank.extractor, bank.stats, bank.bank, cfg)
    for name, g in grids.items():
        labels, masks = truth[name]
        with torch.inference_mode():
            grid = torch.cat([kpipe.grid_maps(kpipe.standardize(c)) for c in torch.split(g["feats"], 16)])
        rows.setdefault("kNN yardstick (all 200 banked)", {})[name] = {
            **pixel_metrics(grid, masks, cfg), "image_auroc_of_this_map": image_auroc(grid, labels, cfg),
        }
    print(f"kNN {rows['kNN yardstick (all 200 banked)']}", flush=True)

    memory_val = rows["memory alone"]["mt_val"]
    at_share = [f"{k} {m} {share}" for k in KINDS for m in BLENDS]
    candidates = [
        r for r in at_share
        if r in rows and all(rows[r]["mt_val"][m] >= memory_val[m] for m in ("pixel_auroc", "aupro"))
    ]

    def mean_val(r: str) -> float:
        return (rows[r]["mt_val"]["pixel_auroc"] + rows[r]["mt_val"]["aupro"]) / 2

    best = max(candidates, key=mean_val) if candidates else None
    result = {
        "script": "research/pixel_map_val.py",
        "protocol": {
            "train": f"{len(train)} Magnetic Tile train/good images (seeded subsample, seed {MT_SUBSAMPLE_SEED}); "
            f"{len(calib)} held out by fit for calibration",
            "mt_val": f"{len(sets['mt_val'])} test images (seeded half, stratified by defect type, good included)",
            "mt_test": f"{len(sets['mt_test'])} test images (the other half)",
            "image_score": f"the score map ({cfg.infer.residual}, {score_blend}, share {share}) in every row: "
            f"image AUROC {image}",
            "pixel_map": "each row's map; 'image_auroc_of_this_map' is what scoring images by it would give",
            "choice": f"best mean of pixel AUROC and AUPRO on mt_val among the rows at share {share} "
            "that are at or above the memory alone on both",
            "metrics": f"pixel AUROC exact; AUPRO on {AUPRO_THRESHOLDS} quantile thresholds",
        },
        "run": str(run),
        "model_code_revision": det.meta.get("code_revision"),
        "package_pixel_map": f"{pipe.pixel_residual} {pipe.pixel_blend} {share}",
        "rows": rows,
        "chosen_on_mt_val": {"row": best, "mean_pixel_auroc_aupro": None if best is None else round(mean_val(best), 4)},
        "provenance": provenance.collect("cpu", started=started),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"chosen on mt_val: {best}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
