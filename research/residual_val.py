"""Can the residual earn its place? Design choices for the memory and the residual, chosen on ``mt_val``.

Why: with the quantile blend (``research/blend_val.py``) the default equals the memory alone
on Magnetic Tile's real defects, and the memory-bank search is most of predict's cost on a
CPU (``benchmarks/speed.py``). This script asks, on ``mt_val`` only (``mt_test`` and the
kNN yardstick reported next to it), the questions of the issue "Detection quality, round 2"
and of the speed issue that cannot be answered by timing alone:

1. **Memory size.** The greedy coreset picks patches one by one, and its picks do not
   depend on how many are wanted, so one 10 % selection gives the 5 %, 2 % and 1 % banks as
   its prefixes. How much does a smaller bank (10x faster to search) cost?
2. **Which layers the residual reads.** The transformer reconstructs all three Lite0
   depths; the residual can be read on the shallow texture layer (stride 4), the deeper
   ones (stride 8 + 16) or stride 16 alone, while the memory keeps all three.
3. **Training the residual differently** (one model each, same 40-epoch ``fast`` recipe):
   the ``accurate`` transformer size; feature jitter on the input (UniAD: Gaussian noise of
   std 0.5 or 1.0 on the standardised features, the target stays clean); a hard-mined loss
   (Dinomaly: the gradients of the easiest 90 % of grid cells scaled by 0.1); a cosine-only
   loss per layer group (Dinomaly), scored by the per-group cosine distance; a variance
   head (:func:`variance_head`) whose predicted log-variance is scored as an extra signal,
   alone and blended as a third map, and for reference as the residual's divisor; towards
   the paper's scale, a 200-epoch schedule and a 64 x 64 grid (4 x 4 patches).
   Also: the held-out calibration images added to the bank after calibration (the kNN
   yardstick banks every training image; ST-MAE only those it trains on).
4. **Separate shares for the map and the image score**: the memory share of the pixel map
   and of the image score chosen apart (map by pixel AUROC + AUPRO, score by image AUROC).
5. **Per defect type**, which types the residual finds better than the memory (image AUROC
   of each type against the good images of ``mt_val``).

All blends are the package's quantile blend (``stmae.pipeline.blend``) with ranges from the
held-out good images of the fit. Training variants the package offers (hard mining:
``train.hard_mining``) are config overrides; the others are set up here, by patching the
loss or the model's input for the duration of one fit: they are research rows, and only
what wins moves into the package.

Also, with ``--kinds``, other residual kinds of each model's reconstructions (plain
squared error, cosine, Mahalanobis; alone, the first and the last localised better than the
default on ``mt_val`` in ``research/ablation.py --protocol mt_real``), each alone and
blended. ``--steps core`` leaves out the smaller banks of step 1, and steps 2 and 4.

Run: ``python research/residual_val.py [--data DIR] [--threads 2]`` (about 45 min on 2 CPU
threads); writes ``research/results/residual_val.json`` (or ``--out``) after every model, so a stopped run
shows what it has (and ``--work`` keeps the fitted models for the next call).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

from stmae_research import knn  # noqa: E402

import stmae  # noqa: E402
import stmae.train as stmae_train  # noqa: E402
from stmae import provenance  # noqa: E402
from stmae.config import preset as preset_config  # noqa: E402
from stmae.data import load_mvtec  # noqa: E402
from stmae.evaluate import mask_at  # noqa: E402
from stmae.fitting import fit_residual_stats  # noqa: E402
from stmae.features import extract_features  # noqa: E402
from stmae.metrics import aupro, auroc  # noqa: E402
from stmae.model import STMAE, feature_residual, reconstruction_loss  # noqa: E402
from stmae.model.stmae import _expand  # noqa: E402
from stmae.model.memory import BLEND_QUANTILES, greedy_coreset, nearest_distances, patch_rows  # noqa: E402
from stmae.pipeline import blend, postprocess  # noqa: E402
from stmae_research.protocols import split_real_defects  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile"
MT_SUBSAMPLE_SEED = 42  # the 200-image protocol's training subset (benchmarks/quality.py)
AUPRO_THRESHOLDS = 500
CORESETS = (0.1, 0.05, 0.02, 0.01)
#: Lite0's stride4 / stride8 / stride16 channels in the feature grid, in order (24, 40, 112).
LAYER_SLICES = {"stride4": slice(0, 24), "stride8": slice(24, 64), "stride16": slice(64, 176)}
LAYER_SETS = {
    "all": ("stride4", "stride8", "stride16"),
    "stride4": ("stride4",),
    "stride8+16": ("stride8", "stride16"),
    "stride16": ("stride16",),
}
SHARE = 0.9  # the default memory share


# ---------------------------------------------------------------------- training variants
def _group_cosine_loss(recon: torch.Tensor, feats: torch.Tensor, hard_mining: float = 0.0) -> torch.Tensor:
    """Dinomaly's cosine per layer group (``hard_mining``: the training loop's argument, unused here)."""
    return torch.stack([
        (1.0 - F.cosine_similarity(recon[:, s], feats[:, s], dim=1, eps=1e-6)).mean() for s in LAYER_SLICES.values()
    ]).mean()


@contextlib.contextmanager
def patched(loss: Callable[..., torch.Tensor] | None = None, jitter: float = 0.0) -> Iterator[None]:
    """Swap the training loss and/or add Gaussian input jitter to STMAE in training mode, for one fit.

    The loss goes in through :func:`stmae.train.train_model`'s ``loss`` hook, bound for the
    fits ``stmae.fit`` makes while the context lasts (``fit`` takes no loss of its own).
    """
    old_train, old_forward = stmae_train.train_model, STMAE.forward
    if loss is not None:
        stmae_train.train_model = functools.partial(old_train, loss=loss)  # type: ignore[assignment]
    if jitter > 0:
        def forward(self: STMAE, x: torch.Tensor, splits: torch.Tensor) -> torch.Tensor:
            if self.training:
                x = x + jitter * torch.randn_like(x)
            return old_forward(self, x, splits)
        STMAE.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        stmae_train.train_model = old_train  # type: ignore[assignment]
        STMAE.forward = old_forward  # type: ignore[method-assign]


# A variance head as an extra signal (not as a divisor). A linear head on the decoder's
# output tokens predicts each target cell's log expected squared error from the other half.
# Its input is detached and its loss (a Gaussian negative log-likelihood of the detached
# per-cell error) reaches only the head, so the reconstruction trains exactly as without it:
# its residual rows must equal the base model's, and the head is a pure add-on. Zero-initialised
# (no random draws), so the rest of the model starts from the same weights as well.
VARIANCE_OUT = {"on": False}  # scoring: forward returns the log-variance as an extra channel


@contextlib.contextmanager
def variance_out(on: bool = True) -> Iterator[None]:
    """Scoring with the head's log-variance as the reconstruction's last channel (training always has it)."""
    VARIANCE_OUT["on"] = on
    try:
        yield
    finally:
        VARIANCE_OUT["on"] = False


def _variance_loss(recon: torch.Tensor, feats: torch.Tensor, hard_mining: float = 0.0) -> torch.Tensor:
    """The package's loss on the reconstruction + the head's NLL on the detached per-cell error."""
    recon, log_var = recon[:, :-1], recon[:, -1]
    error = feature_residual(recon, feats, "mse").detach()
    nll = (log_var + error * torch.exp(-log_var)).mean()
    return reconstruction_loss(recon, feats, hard_mining) + nll


@contextlib.contextmanager
def variance_head() -> Iterator[None]:
    """STMAE with the variance head while the context lasts (fit, load and scoring)."""
    old_init, old_forward = STMAE.__init__, STMAE.forward

    def init(self: STMAE, *args: Any, **kwargs: Any) -> None:
        old_init(self, *args, **kwargs)
        self.var_head = torch.nn.Linear(self.head.in_features, self.patch_size**2)
        torch.nn.init.zeros_(self.var_head.weight)
        torch.nn.init.zeros_(self.var_head.bias)

    def forward(self: STMAE, feats: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "var_head") or not (self.training or VARIANCE_OUT["on"]):
            return old_forward(self, feats, split)
        seen: list[torch.Tensor] = []  # the decoder's output tokens, as the reconstruction head reads them
        hook = self.head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
        try:
            recon = old_forward(self, feats, split)
        finally:
            hook.remove()
        tokens, n, p, s = self.var_head(seen[0].detach()), feats.shape[0], self.patch_size, self.side
        if split.dim() == 2:
            split = split.unsqueeze(0).expand(n, -1, -1)
        out = tokens.new_zeros(n, self.num_tokens, p * p)
        out = out.scatter(1, _expand(split[:, 1], p * p), tokens[:n]).scatter(1, _expand(split[:, 0], p * p), tokens[n:])
        log_var = out.reshape(n, s, s, 1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, 1, s * p, s * p)
        return torch.cat([recon, log_var.to(recon.dtype)], dim=1)

    STMAE.__init__, STMAE.forward = init, forward  # type: ignore[method-assign]
    try:
        with patched(_variance_loss):
            yield
    finally:
        STMAE.__init__, STMAE.forward = old_init, old_forward  # type: ignore[method-assign]


#: name -> (preset, config overrides, patched loss, jitter, residual kind); all 40 epochs,
#: memory off in the fit (banks are built here). Variants the package offers are overrides;
#: the others are patched in for one fit (:func:`patched`).
MODELS: dict[str, tuple[str, dict[str, Any], Callable[..., torch.Tensor] | None, float, str]] = {
    "fast": ("fast", {}, None, 0.0, "mse_cos"),
    "accurate size": ("accurate", {}, None, 0.0, "mse_cos"),
    "hard-mined loss": ("fast", {"train.hard_mining": 0.9}, None, 0.0, "mse_cos"),
    "jitter 0.5": ("fast", {}, None, 0.5, "mse_cos"),
    "group cosine loss": ("fast", {}, _group_cosine_loss, 0.0, "group_cos"),
    "jitter 1.0": ("fast", {}, None, 1.0, "mse_cos"),
    "variance head": ("fast", {}, None, 0.0, "mse_cos"),  # set up by variance_head(), not a loss swap
    # towards the paper's scale, as far as a CPU affords it: a longer schedule; a 64 x 64 grid
    # (Lite0's stride-4 resolution at 256 px) with 4 x 4 patches, so the transformer keeps
    # 256 tokens; its memory rows stay on the 32 x 32 grid, upsampled for the blends
    "200 epochs": ("fast", {"train.epochs": 200}, None, 0.0, "mse_cos"),
    "grid 64": ("fast", {"features.grid_size": 64, "model.patch_size": 4}, None, 0.0, "mse_cos"),
}


# ---------------------------------------------------------------------- scoring helpers
def quantile_range(calib: torch.Tensor) -> tuple[float, float]:
    values = calib.flatten().float()
    lo, hi = (float(torch.quantile(values, q)) for q in BLEND_QUANTILES)
    return lo, max(hi - lo, 1e-12)


def residual_grid(recon: torch.Tensor, x: torch.Tensor, layers: Sequence[str], kind: str,
                  stats: Any = None) -> torch.Tensor:
    if kind == "group_cos":
        return torch.stack([
            1.0 - F.cosine_similarity(recon[:, LAYER_SLICES[n]], x[:, LAYER_SLICES[n]], dim=1, eps=1e-6) for n in layers
        ]).mean(dim=0)
    if kind == "mahalanobis":  # statistics fitted on all channels
        assert tuple(layers) == LAYER_SETS["all"], "the Mahalanobis residual reads all layers"
        return torch.cat([feature_residual(r, f, kind, stats) for r, f in zip(torch.split(recon, 64), torch.split(x, 64))])
    idx = torch.cat([torch.arange(176)[LAYER_SLICES[n]] for n in layers])
    return feature_residual(recon[:, idx], x[:, idx], kind)


def metrics(grid: torch.Tensor, truth: tuple[np.ndarray, np.ndarray, list[str]], cfg: Any,
            score_grid: torch.Tensor | None = None, pixels: bool = True) -> dict[str, float]:
    labels, masks, _ = truth
    maps, scores = postprocess(grid, cfg.infer, cfg.features.image_size)
    if score_grid is not None:
        _, scores = postprocess(score_grid, cfg.infer, cfg.features.image_size)
    out = {"image_auroc": round(auroc(labels, scores.numpy()), 4)}
    if pixels:
        m = maps.numpy()
        out["pixel_auroc"] = round(auroc(masks.ravel(), m.ravel()), 4)
        out["aupro"] = round(aupro(masks, m, num_thresholds=AUPRO_THRESHOLDS), 4)
    return out


def per_type(grid: torch.Tensor, truth: tuple[np.ndarray, np.ndarray, list[str]], cfg: Any) -> dict[str, float]:
    labels, _, types = truth
    _, scores = postprocess(grid, cfg.infer, cfg.features.image_size)
    s = scores.numpy()
    good = np.array([t == "good" for t in types])
    out = {}
    for t in sorted(set(types) - {"good"}):
        sel = good | np.array([x == t for x in types])
        out[t] = round(auroc(labels[sel], s[sel]), 4)
    return out


def mean3(m: dict[str, float]) -> float:
    return float(np.mean([m["image_auroc"], m["pixel_auroc"], m["aupro"]]))


# ---------------------------------------------------------------------- main
def fixed_mmap_threshold() -> None:
    """Keep glibc's mmap threshold fixed at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``).

    Why: glibc raises the threshold after large blocks are freed; the distance search's
    16 MB product blocks then come from the heap, interleaved with the small per-block
    results, and the heap fragments. This script's memory-size step grew past 21 GB that
    way (and hit a 14 GB ``ulimit -v`` twice); with the threshold fixed (as by the
    environment variable ``MALLOC_MMAP_THRESHOLD_``) the same step passed under that limit.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the training variants")
    p.add_argument("--kinds", default="mse_cos",
                   help="comma-separated residual kinds scored for each mse_cos model (mse, cos, mse_cos, mahalanobis)")
    p.add_argument("--steps", choices=("all", "core"), default="all",
                   help="core: skip the smaller coresets, the layer sets and the share sweep")
    p.add_argument("--work", type=Path, default=REPO / ".devdata" / "residual_val")
    p.add_argument("--out", type=Path, default=HERE / "results" / "residual_val.json")
    args = p.parse_args(argv)
    fixed_mmap_threshold()
    torch.set_num_threads(args.threads)
    started = time.time()
    ds = load_mvtec(args.data)
    keep = knn.subsample_indices(len(ds.train), 200, MT_SUBSAMPLE_SEED)
    train = [ds.train[i] for i in keep]
    parts = split_real_defects(ds.test, seed=0)
    base = preset_config("fast").override({"train.epochs": args.epochs, "train.device": "cpu", "infer.distance_weight": 0.0})
    size = base.features.image_size
    result: dict[str, Any] = {
        "script": "research/residual_val.py",
        "protocol": {
            "train": "200 Magnetic Tile train/good images (seeded subsample, seed 42); 20 held out by fit for calibration",
            "mt_val": f"{len(parts['mt_val'])} test images (stmae_research.protocols.split_real_defects, seed 0)",
            "mt_test": f"{len(parts['mt_test'])} test images (the other half)",
            "models": f"{args.epochs} epochs each, K = 1; 'fast' preset unless the row says otherwise",
            "blend": f"quantile blend (ranges from held-out good images), memory share {SHARE} unless stated",
            "metrics": f"image and pixel AUROC exact; AUPRO on {AUPRO_THRESHOLDS} quantile thresholds",
        },
        "rows": {},
        "fit_seconds": {},
    }
    rows: dict[str, dict[str, Any]] = result["rows"]

    def save() -> None:
        result["provenance"] = provenance.collect("cpu", started=started)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)

    def record(name: str, grids: dict[str, torch.Tensor], score_grids: dict[str, torch.Tensor] | None = None,
               pixels: bool = True) -> None:
        rows[name] = {
            split: metrics(grids[split], truth[split], base, None if score_grids is None else score_grids[split], pixels)
            for split in ("mt_val", "mt_test")
        }
        print(f"{name:55s} val {rows[name]['mt_val']}  test {rows[name]['mt_test']}", flush=True)

    # The first model's fit decides the held-out calibration images (same seed for every fit).
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    fitted: dict[str, Any] = {}

    def fit_model(name: str) -> Any:
        preset_name, overrides, loss, jitter, _ = MODELS[name]
        cfg = preset_config(preset_name).override(
            {"train.epochs": args.epochs, **overrides, "train.device": "cpu", "infer.distance_weight": 0.0})
        run = args.work / name.replace(" ", "_")
        with variance_head() if name == "variance head" else contextlib.nullcontext():
            if (run / "meta.json").is_file():
                det = stmae.load(run, device="cpu")
            else:
                with patched(loss, jitter):
                    det = stmae.fit(train, run, cfg, quiet=True, resume=True).detector
        result["fit_seconds"][name] = det.meta.get("fit_seconds")
        print(f"[fit] {name}: {det.meta.get('fit_seconds')} s", flush=True)
        return det

    first = fit_model(names[0])
    fitted[names[0]] = first
    val_names = set(first.meta["val_images"])
    calib = [s for s in train if (s.name or str(s.path)) in val_names]
    fit_train = [s for s in train if (s.name or str(s.path)) not in val_names]
    sets = {"calib": calib, "mt_val": parts["mt_val"], "mt_test": parts["mt_test"]}
    truth = {
        split: (np.array([s.label for s in sets[split]]), np.stack([mask_at(s, size) for s in sets[split]]),
                [s.defect_type or "good" for s in sets[split]])
        for split in ("mt_val", "mt_test")
    }
    pipe0 = first.pipeline
    with torch.inference_mode():
        raw = {k: extract_features(first.extractor, v, size, quiet=True, desc=k) for k, v in sets.items()}
        raw_train = extract_features(first.extractor, fit_train, size, quiet=True, desc="train")
        xs = {k: pipe0.standardize(v) for k, v in raw.items()}
        rows_train = patch_rows(pipe0.standardize(raw_train))

    # 1. memory size: one greedy selection, its prefixes
    t0 = time.perf_counter()
    order = greedy_coreset(rows_train, int(CORESETS[0] * rows_train.shape[0]), seed=base.train.seed)
    result["coreset_seconds_10pct"] = round(time.perf_counter() - t0, 1)
    dist: dict[float, dict[str, torch.Tensor]] = {}
    for ratio in CORESETS if args.steps == "all" else CORESETS[:1]:
        bank = rows_train[order[: int(ratio * rows_train.shape[0])]]
        sq = (bank * bank).sum(dim=1)
        with torch.inference_mode():
            dist[ratio] = {k: nearest_distances(patch_rows(x), bank, sq).view(x.shape[0], *x.shape[2:]) for k, x in xs.items()}
        record(f"memory alone, coreset {ratio:g} ({bank.shape[0]} patches)", dist[ratio])
    # 1b. the held-out calibration images join the bank once calibration is done: the kNN
    # yardstick banks all 200 images, ST-MAE only the 180 it trains on. The quantile ranges
    # stay those of the 180-image bank (the calibration images were unseen when scored).
    rows_all = torch.cat([rows_train, patch_rows(xs["calib"])])
    bank = rows_all[greedy_coreset(rows_all, int(CORESETS[0] * rows_all.shape[0]), seed=base.train.seed)]
    sq = (bank * bank).sum(dim=1)
    with torch.inference_mode():
        dist_all = {k: nearest_distances(patch_rows(xs[k]), bank, sq).view(xs[k].shape[0], *xs[k].shape[2:])
                    for k in ("mt_val", "mt_test")}
    dist_all["calib"] = dist[CORESETS[0]]["calib"]
    record(f"memory alone, calibration images added to the bank ({bank.shape[0]} patches)", dist_all)
    save()

    def blended(res: dict[str, torch.Tensor], d: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
        (r_lo, r_sc), (d_lo, d_sc) = quantile_range(res["calib"]), quantile_range(d["calib"])
        return {k: blend(res[k], d[k], share, (r_lo, r_sc, d_lo, d_sc)) for k in ("mt_val", "mt_test")}

    def three_way(d: dict[str, torch.Tensor], *others_and_shares: Any) -> dict[str, torch.Tensor]:
        """Memory, residual and a third map, each on its good cells' quantile scale, weighted."""
        *maps, shares = (d, *others_and_shares)
        scales = [quantile_range(m["calib"]) for m in maps]
        return {k: sum(w * (m[k] - lo) / sc for w, m, (lo, sc) in zip(shares, maps, scales))
                for k in ("mt_val", "mt_test")}

    # 2-3. each training variant: residual alone and blended, per layer set for the first model
    residuals: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        det = fitted.get(name) or fit_model(name)
        kind = MODELS[name][4]
        pipe = det.pipeline
        mxs, mdist, mdist_all = xs, dist[0.1], dist_all
        if det.config.features != first.config.features:  # e.g. a finer grid: its own features
            g = det.config.features.grid_size
            with torch.inference_mode():
                mxs = {k: pipe.standardize(extract_features(det.extractor, v, size, quiet=True, desc=k))
                       for k, v in sets.items()}
            # the memory stays on the first model's grid, upsampled to this one for the blends
            mdist, mdist_all = ({k: F.interpolate(v.unsqueeze(1), size=(g, g), mode="bilinear", align_corners=False)
                                 .squeeze(1) for k, v in d.items()} for d in (dist[0.1], dist_all))
        heads = name == "variance head"
        with torch.inference_mode(), variance_head() if heads else contextlib.nullcontext(), variance_out(heads):
            recon = {k: torch.cat([pipe.reconstructions(c)[0] for c in torch.split(x, 16)]) for k, x in mxs.items()}
        log_var = {}
        if heads:  # the head's channel off the reconstruction; its signals alone and blended
            log_var = {k: r[:, -1] for k, r in recon.items()}
            recon = {k: r[:, :-1] for k, r in recon.items()}
        layer_sets = LAYER_SETS if name == names[0] and args.steps == "all" else {"all": LAYER_SETS["all"]}
        for lname, layers in layer_sets.items():
            res = {k: residual_grid(recon[k], mxs[k], layers, kind) for k in mxs}
            residuals[f"{name} / {lname}"] = res
            record(f"residual alone: {name}, layers {lname}", res)
            record(f"blend {SHARE}: {name}, layers {lname}, coreset 0.1", blended(res, mdist, SHARE))
            if lname == "all":
                record(f"blend {SHARE}: {name}, layers all, calibration images added to the bank",
                       blended(res, mdist_all, SHARE))
        if heads:
            error = {k: feature_residual(recon[k], mxs[k], "mse") for k in mxs}
            res = residuals[f"{name} / all"]
            for label, signal in (("predicted log-variance", log_var),
                                  ("squared error / predicted variance (the divisor, for reference)",
                                   {k: error[k] * torch.exp(-log_var[k]) for k in mxs})):
                record(f"variance head: {label} alone", signal)
                record(f"blend {SHARE}: memory + {label}, calibration images added to the bank",
                       blended(signal, mdist_all, SHARE))
                record(f"blend 0.8 / 0.1 / 0.1: memory + residual + {label}, calibration images added to the bank",
                       three_way(mdist_all, res, signal, (0.8, 0.1, 0.1)))
        if kind == "mse_cos":
            # other residual kinds of the same reconstructions, alone and blended (all layers)
            for other in [k.strip() for k in args.kinds.split(",") if k.strip() and k.strip() != kind]:
                if other == "mahalanobis" and mxs is not xs:
                    continue  # its statistics come from the first model's grid
                stats = fit_residual_stats(det.pipeline, raw_train) if other == "mahalanobis" else None
                res = {k: residual_grid(recon[k], mxs[k], LAYER_SETS["all"], other, stats) for k in mxs}
                residuals[f"{name} / residual {other}"] = res
                record(f"residual alone: {name}, residual {other}", res)
                record(f"blend {SHARE}: {name}, residual {other}, coreset 0.1", blended(res, mdist, SHARE))
                record(f"blend {SHARE}: {name}, residual {other}, calibration images added to the bank",
                       blended(res, mdist_all, SHARE))
        save()
        del recon

    # 4. separate shares for map and score (first model, best layer set on mt_val)
    first_sets = [k for k in residuals if k.startswith(names[0] + " / ") and " / residual " not in k]
    best = max(first_sets, key=lambda k: mean3(rows[f"blend {SHARE}: {names[0]}, layers {k.split(' / ')[1]}, coreset 0.1"]["mt_val"]))
    res = residuals[best]
    for share in (0.5, 0.7, 0.8, 0.95) if args.steps == "all" else ():
        record(f"blend {share}: {best}, coreset 0.1", blended(res, dist[0.1], share))
    for score_share in (0.5, 0.7, 0.8) if args.steps == "all" else ():
        g_map, g_score = blended(res, dist[0.1], SHARE), blended(res, dist[0.1], score_share)
        record(f"map share {SHARE}, score share {score_share}: {best}", g_map, g_score)
    save()

    # 5. per defect type on mt_val: memory alone against residual alone (first model, best layers)
    result["per_type_mt_val"] = {
        "memory alone (coreset 0.1)": per_type(dist[0.1]["mt_val"], truth["mt_val"], base),
        f"residual alone ({best})": per_type(res["mt_val"], truth["mt_val"], base),
        f"blend {SHARE} ({best})": per_type(blended(res, dist[0.1], SHARE)["mt_val"], truth["mt_val"], base),
    }
    print(json.dumps(result["per_type_mt_val"], indent=1), flush=True)

    # the kNN yardstick on the same split (all fit-training images banked, coreset 0.1)
    bank = knn.fit_bank(fit_train, base, coreset_ratio=0.1)
    with torch.inference_mode():
        kx = {k: bank.stats.apply(raw[k]) for k in ("mt_val", "mt_test")}
        sq = (bank.bank * bank.bank).sum(dim=1)
        kd = {k: nearest_distances(patch_rows(x), bank.bank, sq).view(x.shape[0], *x.shape[2:]) for k, x in kx.items()}
    record("kNN yardstick (coreset 0.1)", kd)
    candidates = [n for n in rows if not n.startswith("kNN")]
    result["best_on_mt_val"] = max(candidates, key=lambda n: mean3(rows[n]["mt_val"]) if "aupro" in rows[n]["mt_val"] else -1)
    save()
    print(f"best on mt_val (mean of three): {result['best_on_mt_val']}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
