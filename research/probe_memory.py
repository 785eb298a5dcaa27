"""Research probe: would a memory of good patches help the ST-MAE residual on Magnetic Tile?

Why this probe: on Magnetic Tile the kNN yardstick beats ST-MAE, and every recipe change
tried in ``ablation.py`` and ``probe_mt_edge.py`` plateaus below it. The working explanation
is that a good tile's fine texture cannot be predicted from the other half of the image, so
the residual of a good patch stays noisy, while the kNN retrieves a stored good patch with
the same texture. This script tests the two obvious ways to give ST-MAE such a memory,
without changing the package:

``guided<k>``
    Compare each patch with the good patches nearest its *reconstruction*: the score is
    the distance from the original feature to the closest of the k bank patches nearest the
    mean of the K reconstructions. k = 1 snaps the reconstruction onto the good-patch
    manifold before taking the residual; k = the bank size is the plain kNN. Still
    leakage-free: which bank patches are eligible depends only on the reconstruction, and
    the reconstruction never sees the patch.
``hybrid_w<w>``
    Sum of the kNN distance map and w times the ST-MAE residual map, each divided by its
    median over all validation grid positions first (label-free, so the two maps are on one
    scale; a deployment would take the medians from held-out good images).

``package`` (a variant, not a column)
    The blend as the package adopted it (``infer.distance_weight`` 0.8, i.e. ``hybrid_w0.25``
    rescaled): :func:`stmae.fit` on the same 200 training images, so 180 are trained on and
    banked and the medians come from the 20 held out, then :meth:`Detector.score_features`
    on each validation set. Columns ``package_memory`` and ``package_residual`` (the same
    model with ``infer.distance_weight`` 0). It checks that the package reproduces the probe's gain
    without the validation-position medians.

The bank is the kNN yardstick's (``baseline_knn.py``: greedy 10 % coreset of the
standardised training patches, seed 42), the residual is the package's (``mse_cos``, K = 4,
``Detector.grid_maps``), and maps become image scores with the package's smoothing and max.

Data: the three Magnetic Tile validation protocols of ``ablation.py`` (``mt_edge``, ``mt``,
``mt_extended``: validation images only, no test image is read). They share the training
images, so each schedule trains once and is scored on all three. ``fast`` preset, CPU,
1 thread (reduced, like the ablation). Outputs ``research/results/probe_memory.json`` and
``.md`` (rows merge).

Run: ``python research/probe_memory.py --variants base,epochs_x4,package``.
"""

from __future__ import annotations

import copy
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from stmae_research import scoring
from stmae.features import FeatureStats
from stmae import provenance
from stmae.fileio import atomic_write_json, atomic_write_text
from stmae.infer import Detector, build_model
from stmae.train import make_config, train_model

HERE = Path(__file__).resolve().parent
import ablation as ab  # noqa: E402

PROTOCOLS = ("mt_edge", "mt", "mt_extended")
#: name -> schedule multiplier of the protocols' 30 base epochs.
VARIANTS: dict[str, int] = {"base": 1, "epochs_x4": 4, "package": 1}
#: The package's memory share for the ``package`` variant (the presets' value).
PACKAGE_MEMORY = 0.8
GUIDED_K = (1, 16, 256, 1024)
HYBRID_W = (0.1, 0.25, 0.5, 1.0, 2.0)
#: Rows of queries per distance block, so (block x bank) float32 stays around 170 MB.
BLOCK = 2048


@torch.no_grad()
def mean_reconstruction(det: Detector, feats: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Mean of the K reconstructions (the detector's own test-time splits) of standardised features."""
    out = []
    for chunk in torch.split(feats, batch):
        recon = [det.model(chunk, split) for split in det.splits]
        out.append(torch.stack(recon).mean(0))
    return torch.cat(out)


def guided_distances(queries: torch.Tensor, recon: torch.Tensor, bank: torch.Tensor,
                     ks: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Nearest-bank distances of each query row, unconstrained and guided by its reconstruction.

    queries, recon: (Q, C); bank: (B, C) -> (distance to the nearest bank row (Q,) -- the kNN
    score --, {k: distance to the closest of the k bank rows nearest the reconstruction (Q,)}).
    A k at least the bank size gives the unconstrained distance again.
    """
    if queries.shape != recon.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and reconstructions {tuple(recon.shape)} differ")
    kmax = min(max(ks), len(bank))
    nearest = torch.empty(len(queries))
    guided = {k: torch.empty(len(queries)) for k in ks}
    for start in range(0, len(queries), BLOCK):
        dist = torch.cdist(queries[start:start + BLOCK], bank)
        nearest[start:start + BLOCK] = dist.amin(1)
        eligible = torch.cdist(recon[start:start + BLOCK], bank).topk(kmax, dim=1, largest=False).indices
        dist = dist.gather(1, eligible)  # columns in order of closeness to the reconstruction
        for k in ks:
            guided[k][start:start + BLOCK] = dist[:, :min(k, kmax)].amin(1)
    return nearest, guided


def hybrid(knn_map: torch.Tensor, resid_map: torch.Tensor, weight: float) -> torch.Tensor:
    """kNN map + weight x residual map, each divided by its median over all positions given."""
    return knn_map / knn_map.median().clamp_min(1e-12) + weight * resid_map / resid_map.median().clamp_min(1e-12)


def score_protocol(det: Detector, bank: torch.Tensor, val: torch.Tensor, labels: np.ndarray,
                   masks: np.ndarray | None, knn: Any) -> dict[str, dict[str, Any]]:
    """Every column on one validation set -> {column: ablation.validation_row}."""
    x = det.stats.apply(val)
    n, g = len(x), x.shape[-1]
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, grid: torch.Tensor) -> None:
        maps, scores = scoring.postprocess(det, grid)
        rows[name] = ab.validation_row(labels, None, masks, maps, scores)

    resid = torch.cat([scoring.grid_maps(det, c).cpu() for c in torch.split(x, 64)])
    add("residual", resid)
    nearest, guided = guided_distances(knn.patch_rows(x), knn.patch_rows(mean_reconstruction(det, x)), bank, GUIDED_K)
    knn_map = nearest.view(n, g, g)
    add("knn", knn_map)
    for k in GUIDED_K:
        add(f"guided{k}", guided[k].view(n, g, g))
    for w in HYBRID_W:
        add(f"hybrid_w{w:g}", hybrid(knn_map, resid, w))
    return rows


def run(names: Sequence[str], out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    specs = {p: ab.PROTOCOLS[p] for p in PROTOCOLS}
    first = specs[PROTOCOLS[0]]
    cfg0 = ab.protocol_config(first)  # pins infer.distance_weight 0: the residual column is the paper's map
    setup = {"val": first["val"], "epochs": cfg0.train.epochs}
    results: dict[str, Any] = {
        "description": f"Magnetic Tile validation protocols of ablation.py ({', '.join(PROTOCOLS)}): "
                       f"{first['val'] // 2} good + {first['val'] // 2} painted images each; `{first['preset']}` "
                       f"preset, {cfg0.train.epochs} base epochs, mse_cos residual, K = 4, max score; kNN bank: "
                       "greedy 10 % coreset; CPU 1 thread (reduced).",
        "setup": setup, "variants": {},
    }
    if out.exists():
        results["variants"] = ab.mergeable_variants(out, setup, provenance.collect("cpu"))
    knn = ab._knn_module()
    cache = ab.FeatureCache()
    tasks = {}
    for proto in PROTOCOLS:  # one task per protocol; the training images are the same
        (_, task), = ab.mt_task(cfg0.features.image_size, specs[proto]["val"], ab.PAINTERS[proto])
        tasks[proto] = task
    train_samples = tasks[PROTOCOLS[0]].train
    if any([(s.path, s.name) for s in t.train] != [(s.path, s.name) for s in train_samples] for t in tasks.values()):
        raise SystemExit("the MT protocols no longer share their training images; train per protocol")
    train = cache.get(cfg0, "magnetic_tile", "train", train_samples)
    stats = FeatureStats.from_features(train)
    standardised = stats.apply(train)
    t0 = time.perf_counter()
    bank = ab.coreset_bank(standardised)
    log(f"coreset: {len(bank)} of {len(train) * train.shape[-2] * train.shape[-1]} patches, "
        f"{time.perf_counter() - t0:.0f} s")
    vals = {p: cache.get(cfg0, f"magnetic_tile/{p}", "val", t.test) for p, t in tasks.items()}
    for name in names:
        started = time.time()
        if name == "package":
            results["variants"][name] = package_variant(cfg0, train_samples, tasks, vals, log)
            results["variants"][name]["provenance"] = results["provenance"] = provenance.collect("cpu", started=started)
            atomic_write_json(out, results)
            atomic_write_text(out.with_suffix(".md"), render(results))
            continue
        cfg = make_config(cfg0, {"train.epochs": cfg0.train.epochs * VARIANTS[name]})
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, train.shape[1])
        t0 = time.perf_counter()
        losses = train_model(model, standardised, cfg.train, torch.device("cpu"), quiet=True)
        train_s = time.perf_counter() - t0
        det = Detector(cache.extractor(cfg), model, stats, copy.deepcopy(cfg))
        scores = {p: score_protocol(det, bank, vals[p], np.array([s.label for s in tasks[p].test]),
                                    tasks[p].masks, knn) for p in PROTOCOLS}
        results["variants"][name] = {
            "epochs": cfg.train.epochs, "train_seconds": round(train_s, 1), "final_loss": losses[-1],
            "scores": scores, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "provenance": provenance.collect("cpu", started=started),
        }
        results["provenance"] = results["variants"][name]["provenance"]  # the latest call
        log(f"{name}: train {train_s:.0f} s, " + ", ".join(
            f"{p} residual {scores[p]['residual']['image_auroc']:.3f} knn {scores[p]['knn']['image_auroc']:.3f}"
            for p in PROTOCOLS))
        atomic_write_json(out, results)
        atomic_write_text(out.with_suffix(".md"), render(results))
    return results


def package_variant(cfg0: Any, train_samples: Sequence[Any], tasks: dict[str, Any], vals: dict[str, torch.Tensor],
                    log: Callable[[str], None]) -> dict[str, Any]:
    """The ``package`` variant: :func:`stmae.fit` with ``infer.distance_weight`` on, scored with and without it."""
    import tempfile

    import stmae

    cfg = make_config(cfg0, {"infer.distance_weight": PACKAGE_MEMORY})
    with tempfile.TemporaryDirectory() as tmp:
        fitted = stmae.fit(list(train_samples), Path(tmp) / "run", cfg, quiet=True)
    det = fitted.detector
    scores: dict[str, dict[str, Any]] = {}
    for proto, feats in vals.items():
        labels = np.array([s.label for s in tasks[proto].test])
        rows = {}
        for column, share in (("package_memory", PACKAGE_MEMORY), ("package_residual", 0.0)):
            det.config.infer.distance_weight = share
            rows[column] = ab.validation_row(labels, None, tasks[proto].masks, *scoring.score_features(det, feats))
        det.config.infer.distance_weight = PACKAGE_MEMORY
        scores[proto] = rows
    log("package: " + ", ".join(f"{p} memory {r['package_memory']['image_auroc']:.3f} residual "
                                f"{r['package_residual']['image_auroc']:.3f}" for p, r in scores.items()))
    return {
        "epochs": cfg.train.epochs, "train_seconds": fitted.meta["train_seconds"],
        "final_loss": fitted.meta["final_loss"], "memory": fitted.meta["memory"], "scores": scores,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def render(results: dict[str, Any]) -> str:
    """Markdown: one row per (schedule, protocol), image / pixel AUROC per column, plus the means."""
    variants = results["variants"]
    columns = list(dict.fromkeys(c for v in variants.values() for p in v["scores"].values() for c in p))
    legend = ("Columns: `residual` is the package's ST-MAE score; `knn` the kNN yardstick on the same bank; "
              "`guided<k>` the distance to the closest of the k bank patches nearest the reconstruction; "
              "`hybrid_w<w>` the kNN map plus w times the residual map (each divided by its median); "
              "`package_memory` / `package_residual` the `package` row's `stmae.fit` model (180 trained + 20 "
              "held out) scored with `infer.distance_weight` 0.8 / 0. "
              "Cells: image AUROC / pixel AUROC; the best image AUROC of a row in bold. `mean` rows: "
              "image AUROC averaged over the three protocols.")
    lines = ["# Memory probes: ST-MAE residual, kNN and their combinations (validation data only)", "",
             results["description"], "", legend, "",
             "| schedule (epochs) | protocol | " + " | ".join(columns) + " |", "|" + "---|" * (2 + len(columns))]
    for name, v in variants.items():
        for proto, cells in v["scores"].items():
            best = max(cells[c]["image_auroc"] for c in columns if c in cells)
            text = [(f"**{cells[c]['image_auroc']:.3f}**" if cells[c]["image_auroc"] == best
                     else f"{cells[c]['image_auroc']:.3f}") + f" / {cells[c]['pixel_auroc']:.3f}"
                    if c in cells else "" for c in columns]
            lines.append(f"| {name} ({v['epochs']}) | {proto} | " + " | ".join(text) + " |")
        means = [np.mean([p[c]["image_auroc"] for p in v["scores"].values()]) if all(c in p for p in v["scores"].values())
                 else None for c in columns]
        best = max(m for m in means if m is not None)
        lines.append(f"| {name} ({v['epochs']}) | mean | " + " | ".join(
            "" if m is None else (f"**{m:.3f}**" if m == best else f"{m:.3f}") for m in means) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return ab.probe_main(argv, __doc__, list(VARIANTS), HERE / "results" / "probe_memory.json", run, render)


if __name__ == "__main__":
    main()
