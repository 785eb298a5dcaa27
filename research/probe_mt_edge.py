"""Research probes of the Magnetic Tile edge-crack gap: ideas the package has no setting for.

Why a separate script from ``ablation.py``: an ablation row is a set of config overrides of
the package, so it can only test what the package already offers. These probes change things
the package does not offer, to learn whether any of them would earn a setting:

``augment``
    More views of the same good images: the training features are extracted again from
    flipped (``flip``: horizontal, vertical, both) or all 8 dihedral views (``d8``) of every
    training image. Features of the *flipped image*, not flipped features, because the CNN
    is not flip-equivariant. Epochs are divided by the number of views, so each row makes
    the same passes per image as its unaugmented counterpart (a test of the data, not of a
    longer schedule).
``parts``
    The paper's decoupling has two halves, each reconstructed from the other. A P-way
    partition reconstructs each of P disjoint groups from the union of the others (P = 4:
    every patch from 75 % of its image instead of 50 %). It is still leakage-free: a patch's
    reconstruction never sees its own group (``tests/test_probe_script.py``). Training draws
    the groups by cutting the package's random split into P parts; scoring is tried with
    P = 2 and P = 4 on every trained model.
scoring
    How the K = 4 reconstructions are combined: the package's mean of the residuals, their
    minimum, or the residual of the mean reconstruction; and the residual restricted to the
    channels of one backbone layer.

The data are exactly ``ablation.py --protocol mt_edge``'s: validation images only, no test
image is read. Outputs ``research/results/probe_mt_edge.json`` and ``.md`` (rows merge).
CPU, 1 thread, ``fast`` preset, 30 base epochs (reduced, like the ablation).

Run: ``python research/probe_mt_edge.py --variants base,flip,partitions_4``.
"""

from __future__ import annotations

import copy
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from stmae_research import scoring
from stmae.data import Sample, resize_image
from stmae.features import FeatureStats, extract_features
from stmae import provenance
from stmae.fileio import atomic_write_json, atomic_write_text
from stmae.infer import Detector, build_model
from stmae.model import STMAE, feature_residual
from stmae.model.stmae import _expand
from stmae.train import make_config, train_model

HERE = Path(__file__).resolve().parent
import ablation as ab  # noqa: E402


#: Image views added to training (the identity is always there).
VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "rot180": lambda a: a[::-1, ::-1],
    "transpose": lambda a: a.transpose(1, 0, 2),
    "rot90": lambda a: a.transpose(1, 0, 2)[:, ::-1],
    "rot270": lambda a: a.transpose(1, 0, 2)[::-1],
    "antitranspose": lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
}
AUGMENT: dict[str, tuple[str, ...]] = {"none": (), "flip": ("hflip", "vflip", "rot180"), "d8": tuple(VIEWS)}

#: name -> (augment, training parts P, schedule multiplier); epochs are divided by the
#: number of views, so the passes per image stay equal.
VARIANTS: dict[str, tuple[str, int, int]] = {
    "base": ("none", 2, 1),
    "epochs_x4": ("none", 2, 4),
    "partitions_4": ("none", 4, 1),
    "flip": ("flip", 2, 1),
    "d8": ("d8", 2, 1),
    "flip_x4": ("flip", 2, 4),
}


def forward_groups(model: STMAE, feats: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Reconstruct each of P disjoint token groups (N, P, L/P) from the union of the others."""
    tokens = model.patchify(feats)
    n, length, dim = tokens.shape
    parts = groups.shape[1]
    if groups.shape != (n, parts, length // parts):
        raise ValueError(f"groups must have shape ({n}, P, {length} / P), got {tuple(groups.shape)}")
    target = torch.cat([groups[:, i] for i in range(parts)])
    visible = torch.cat([torch.cat([groups[:, j] for j in range(parts) if j != i], 1) for i in range(parts)])
    pred = model.decode(model.encode(tokens.repeat(parts, 1, 1), visible), visible, target)
    recon = tokens.new_zeros(n, length, dim)
    for i in range(parts):
        recon = recon.scatter(1, _expand(groups[:, i], dim), pred[i * n : (i + 1) * n])
    return model.unpatchify(recon)


class Partitioned(nn.Module):
    """An :class:`STMAE` trained on P-way partitions by the package's own ``train_model``.

    ``train_model`` hands every batch a random split (N, 2, L/2), a random permutation of the
    tokens per image; cutting it into P equal parts gives a random P-way partition.
    """

    def __init__(self, model: STMAE, parts: int) -> None:
        super().__init__()
        if model.num_tokens % parts:
            raise ValueError(f"{model.num_tokens} tokens do not split into {parts} equal groups")
        self.model, self.parts, self.num_tokens = model, parts, model.num_tokens

    def forward(self, feats: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
        return forward_groups(self.model, feats, split.reshape(feats.shape[0], self.parts, -1))


def view_features(cfg: Any, extractor: Any, samples: Sequence[Sample], views: Sequence[str]) -> torch.Tensor:
    """Features of every sample under every named view (view-major order)."""
    size = cfg.features.image_size
    parts = []
    for view in views:
        flipped = [Sample(path=None, label=0, defect_type="good", name=f"{view}/{i}",
                          array=np.ascontiguousarray(VIEWS[view](resize_image(s.load_image(), size))))
                   for i, s in enumerate(samples)]
        parts.append(extract_features(extractor, flipped, size, quiet=True))
    return torch.cat(parts)


@torch.no_grad()
def reconstructions(model: STMAE, feats: torch.Tensor, splits: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """K reconstructions of standardised features, one per test-time split (K, 2, L/2) cut into P groups."""
    out = []
    for split in splits:
        groups = split.reshape(parts, -1)
        out.append(torch.cat([forward_groups(model, c, groups.expand(len(c), -1, -1)) for c in torch.split(feats, 64)]))
    return out


def score_model(det: Detector, val: torch.Tensor, labels: np.ndarray, masks: np.ndarray,
                layer_slices: dict[str, slice]) -> dict[str, dict[str, Any]]:
    """Every scoring probe on one trained model -> {name: ablation.validation_row}."""
    x = det.stats.apply(val)
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, grid: torch.Tensor) -> None:
        maps, scores = scoring.postprocess(det, grid)
        rows[name] = ab.validation_row(labels, None, masks, maps, scores)

    for parts in (2, 4):
        recon = reconstructions(det.model, x, det.splits, parts)  # the detector's own K seeded splits
        resid = torch.stack([feature_residual(r, x, "mse_cos") for r in recon])
        add(f"P{parts}/mean", resid.mean(0))
        add(f"P{parts}/min", resid.min(0).values)
        add(f"P{parts}/recon_mean", feature_residual(torch.stack(recon).mean(0), x, "mse_cos"))
        if parts == 2:
            for layer, sl in layer_slices.items():
                add(f"P2/mean/{layer}", torch.stack([feature_residual(r[:, sl], x[:, sl], "mse_cos") for r in recon]).mean(0))
    return rows


def run(names: Sequence[str], out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    spec = ab.PROTOCOLS["mt_edge"]
    cfg0 = ab.protocol_config(spec)  # pins infer.distance_weight 0: the probes score the paper's map
    setup = {"val": spec["val"], "epochs": cfg0.train.epochs}
    results: dict[str, Any] = {
        "description": f"mt_edge validation (as ablation.py): {spec['val'] // 2} good + {spec['val'] // 2} images with "
                       f"{spec['defect']}; `{spec['preset']}` preset, {cfg0.train.epochs} base epochs, mse_cos residual, "
                       "max score, K = 4; CPU 1 thread (reduced). Rows: training probes; columns: scoring probes.",
        "setup": setup, "variants": {},
    }
    if out.exists():
        results["variants"] = ab.mergeable_variants(out, setup, provenance.collect("cpu"))
    (task_name, task), = ab.mt_task(cfg0.features.image_size, spec["val"], ab.PAINTERS["mt_edge"])
    cache = ab.FeatureCache()
    extractor = cache.extractor(cfg0)
    train = cache.get(cfg0, task_name, "train", task.train)
    val = cache.get(cfg0, task_name, "val", task.test)
    labels = np.array([s.label for s in task.test])
    bb = extractor.backbone
    bounds = np.cumsum([0] + [bb.channels[name] for name in bb.layers])
    layer_slices = {name: slice(int(a), int(b)) for name, a, b in zip(bb.layers, bounds[:-1], bounds[1:])}
    for name in names:
        started = time.time()
        augment, parts, mult = VARIANTS[name]
        views = AUGMENT[augment]
        feats = torch.cat([train, view_features(cfg0, extractor, task.train, views)]) if views else train
        epochs = max(1, round(cfg0.train.epochs * mult / (1 + len(views))))
        cfg = make_config(cfg0, {"train.epochs": epochs})
        stats = FeatureStats.from_features(feats)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, feats.shape[1])
        trained = model if parts == 2 else Partitioned(model, parts)
        t0 = time.perf_counter()
        losses = train_model(trained, stats.apply(feats), cfg.train, torch.device("cpu"), quiet=True)
        train_s = time.perf_counter() - t0
        det = Detector(extractor, model, stats, copy.deepcopy(cfg))
        rows = score_model(det, val, labels, task.masks, layer_slices)
        if name == "base":
            rows.update(ab.knn_scores(cfg, stats, train, val, labels, task.masks, ab._knn_module()))
        results["variants"][name] = {
            "augment": augment, "train_views": 1 + len(views), "parts": parts, "epochs": epochs,
            "passes_per_image": epochs * (1 + len(views)), "train_seconds": round(train_s, 1),
            "final_loss": losses[-1], "scores": rows, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "provenance": provenance.collect("cpu", started=started),
        }
        results["provenance"] = results["variants"][name]["provenance"]  # the latest call
        log(f"{name}: train {train_s:.0f} s, loss {losses[-1]:.3f}, P2/mean {rows['P2/mean']['image_auroc']:.3f}")
        atomic_write_json(out, results)
        atomic_write_text(out.with_suffix(".md"), render(results))
    return results


def render(results: dict[str, Any]) -> str:
    """Markdown: image / pixel AUROC per training probe (rows) and scoring probe (columns)."""
    variants = results["variants"]
    columns = list(dict.fromkeys(k for v in variants.values() for k in v["scores"]))
    legend = ("Columns: `P2` scores with the two halves (as the package), `P4` reconstructs each quarter of the "
              "patches from the other three at test time; `mean` is the mean of the K residuals (as the package), "
              "`min` their minimum, `recon_mean` the residual of the mean reconstruction; `/strideN` restricts the "
              "residual to that backbone layer's channels. Cells: image AUROC / pixel AUROC. `epochs (passes per "
              "image)`: epochs over the training set including the extra views, and the resulting passes per image.")
    lines = ["# Probes of the edge-crack gap (validation data only)", "", results["description"], "", legend, "",
             "| training probe | augment | P | epochs (passes per image) | final loss | "
             + " | ".join(columns) + " |", "|" + "---|" * (5 + len(columns))]
    for name, v in variants.items():
        cells = [f"{v['scores'][c]['image_auroc']:.3f} / {v['scores'][c]['pixel_auroc']:.3f}" if c in v["scores"] else ""
                 for c in columns]
        lines.append(f"| {name} | {v['augment']} | {v['parts']} | {v['epochs']} ({v['passes_per_image']}) | "
                     f"{v['final_loss']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return ab.probe_main(argv, __doc__, list(VARIANTS), HERE / "results" / "probe_mt_edge.json", run, render)


if __name__ == "__main__":
    main()
