"""The Magnetic Tile protocols (the 200-image subsample and the full train split) and the
ST-MAE + kNN rows of one MVTec-layout data set.

Why a module of its own: :func:`_mvtec_pair` is the one place that fits ST-MAE (or reuses a
finished fit under ``--resume``), scores it (also each term alone, and on the real-defect
halves) and runs the baseline on the same images; the demo protocol runs through it too.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from .common import (
    DATA_PATHS, KNN, STMAE, STMAE_MEMORY, STMAE_RESIDUAL, Context, _epochs, _knn, _pct, _row, _row_line, _stmae_config,
    knn_module,
)

#: Magnetic Tile's test split cut into two seeded halves stratified by defect type
#: (stmae_research.protocols.real_defect_indices): settings are chosen on mt_val, figures reported on mt_test.
REAL_DEFECT_SEED = 0
MT_SUBSAMPLE_SEED = 42


def _finished_fit(run_dir: Path, cfg: Any, n_images: int) -> Any:
    """Under ``--resume``: the complete run folder of an earlier call with this very config
    and number of training images, as a FitResult, so a run stopped after a long fit (in
    the evaluation or the kNN) does not train again; None otherwise."""
    import stmae
    from stmae.checkpoint import META_FILE, CheckpointError
    from stmae.train import FitResult

    from stmae.provenance import code_revision
    from stmae_research.provenance import ProvenanceError

    if not (run_dir / META_FILE).is_file():
        return None
    try:
        detector = stmae.load(run_dir, device=cfg.train.device)
    except CheckpointError:
        return None
    meta = detector.meta
    if meta.get("code_revision") != code_revision():
        raise ProvenanceError(
            f"{run_dir}: a finished fit made by other code (code revision {meta.get('code_revision') or 'not recorded'}, "
            f"this code {code_revision()}); --resume reuses only fits of this very code: delete the folder "
            "or use another --work-dir"
        )
    if detector.config.to_dict() != cfg.to_dict() or meta.get("n_train", 0) + meta.get("n_val", 0) != n_images:
        return None
    return FitResult(run_dir=run_dir, detector=detector, meta=meta, losses=list(meta.get("losses", [])))


def _evaluate(det: Any, dataset: Any, ctx: Context, subsets: dict[str, list[int]] | None) -> tuple[Any, dict[str, Any]]:
    """``stmae.evaluate`` and, from the same pass, the metrics of each subset of the test split."""
    import stmae
    from stmae_research.protocols import evaluate_with_subsets

    if not subsets:
        return stmae.evaluate(det, dataset, quiet=ctx.quiet), {}
    return evaluate_with_subsets(det, dataset, subsets, quiet=ctx.quiet)


def _mvtec_pair(key: str, dataset_key: str, row_name: str, dataset: Any, run_dir: Path, cfg: Any, preset: str,
                coreset: float, ctx: Context, train_note: str, val_data: Path | None = None,
                residual_row: bool = True, subsets: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """ST-MAE (fit + evaluate) and kNN on one MVTec-style dataset -> two rows, four when
    ``residual_row`` and the config uses the memory (the same model with ``infer.distance_weight`` 0,
    and with ``infer.distance_weight`` 1). ``subsets`` (name -> test indices) adds each row's metrics
    on those parts of the test split (``subsets`` of the row), from the same scoring pass.

    ``val_data``: good images that set ST-MAE's threshold instead of a held-out share of the
    training images (threshold only: the reported metrics do not depend on it).
    """
    import stmae

    preset_note = f"{cfg.features.image_size} px, grid {cfg.features.grid_size}, {_epochs(cfg.train.epochs)}"
    ctx.log(f"  {row_name}: ST-MAE fit on {len(dataset.train)} images ({preset_note})")
    t0 = time.perf_counter()
    extra = {} if val_data is None else {"val_data": val_data}
    fitted = _finished_fit(run_dir, cfg, len(dataset.train)) if ctx.resume else None
    if fitted is not None:
        ctx.log(f"    reusing the finished fit in {run_dir} (--resume)")
    else:
        fitted = stmae.fit(dataset, run_dir, cfg, quiet=ctx.quiet, resume=ctx.resume, **extra)
    t1 = time.perf_counter()
    evaluation, evaluation_subsets = _evaluate(fitted.detector, dataset, ctx, subsets)
    eval_seconds = time.perf_counter() - t1
    meta = fitted.meta
    memory = meta.get("memory")
    if memory:
        preset_note += (f", memory {cfg.infer.distance_weight:g} (greedy coreset {_pct(cfg.fit.bank_coreset)}: "
                        f"{memory['bank_patches']:,} of {memory['train_patches']:,} patches)")
    if val_data is None:
        calibration = f"train {len(dataset.train)} ({meta['n_train']} fit + {meta['n_val']} held out for calibration)"
    else:
        calibration = f"train {meta['n_train']} + {meta['n_val']} separate validation images for calibration"
    st_settings = f"`{preset}` preset, {preset_note}; {calibration}{train_note}; test {len(dataset.test)}"
    st_row = _row(
        key, dataset_key, row_name, STMAE, evaluation.metrics, meta["fit_seconds"], ctx.device_label, st_settings,
        eval_seconds=round(eval_seconds, 1), total_seconds=round(time.perf_counter() - t0, 1),
        metrics=evaluation.metrics, per_type=evaluation.per_type, final_loss=meta.get("final_loss"),
        config=fitted.detector.config.to_dict(), subsets=evaluation_subsets,
    )
    ctx.log("    " + _row_line(st_row))
    rows = [st_row]
    if memory and residual_row:
        # The same model scored by each of its two terms alone: the paper's residual map
        # (infer.distance_weight 0) and the memory bank (infer.distance_weight 1), so the table shows what each
        # adds (scoring only; no second training).
        det = fitted.detector
        pixel = det.config.infer.pixel_residual
        residual_what = "0 (the paper's residual map)" if pixel in ("same", det.config.infer.residual) else (
            f"0 (the residual alone: `{det.config.infer.residual}` for the image score, `{pixel}` for the map)"
        )
        for share, method, what in ((0.0, STMAE_RESIDUAL, residual_what),
                                    (1.0, STMAE_MEMORY, "1 (the nearest-good-patch distance alone)")):
            det.config.infer.distance_weight = share
            t1 = time.perf_counter()
            alone, alone_subsets = _evaluate(det, dataset, ctx, subsets)
            fit_s = meta["fit_seconds"] - (memory.get("seconds") or 0.0) if share == 0.0 else meta["fit_seconds"]
            rows.append(_row(
                key, dataset_key, row_name, method, alone.metrics, round(fit_s, 3), ctx.device_label,
                f"the ST-MAE row's model scored with `infer.distance_weight` {what}; test {len(dataset.test)}",
                eval_seconds=round(time.perf_counter() - t1, 1), metrics=alone.metrics,
                per_type=alone.per_type, subsets=alone_subsets,
            ))
            ctx.log("    " + _row_line(rows[-1]))
        det.config.infer.distance_weight = cfg.infer.distance_weight

    ctx.log(f"  {row_name}: kNN baseline (greedy coreset {_pct(coreset)})")
    t0 = time.perf_counter()
    res = _knn(dataset.train, dataset.test, cfg, coreset, ctx, subsets)
    res.pop("scores", None)
    per_type = res.pop("per_type", None)
    knn_subsets = res.pop("subsets", None) or {}
    knn_settings = (
        f"same features; greedy coreset {_pct(coreset)} ({res['bank_size']:,} of {res['n_train_patches']:,} patches); "
        f"train {len(dataset.train)}{train_note}; test {len(dataset.test)}"
    )
    knn_row = _row(
        key, dataset_key, row_name, KNN, res, res["fit_seconds"], ctx.device_label, knn_settings,
        eval_seconds=round(res["predict_seconds"] + res["metric_seconds"], 1),
        total_seconds=round(time.perf_counter() - t0, 1), metrics=res, per_type=per_type, coreset_ratio=coreset,
        bank="greedy k-center coreset", subsets=knn_subsets,
    )
    ctx.log("    " + _row_line(knn_row))
    return rows + [knn_row]


def run_magnetic_tile(settings: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from stmae.data import load_mvtec

    data = ctx.data_root / DATA_PATHS["magnetic_tile"]
    dataset = load_mvtec(data)
    cfg = _stmae_config(settings["preset"], settings["epochs"], ctx, settings["coreset"])
    from stmae_research.protocols import real_defect_indices

    halves = real_defect_indices(dataset.test, seed=REAL_DEFECT_SEED)
    rows: list[dict[str, Any]] = []
    protocol_notes = {}
    for protocol in settings["protocols"]:
        if protocol == "200":
            keep = knn_module().subsample_indices(len(dataset.train), 200, MT_SUBSAMPLE_SEED)
            subset = dataclasses.replace(dataset, train=[dataset.train[i] for i in keep])
            note = (
                f"sorted(np.random.default_rng({MT_SUBSAMPLE_SEED}).choice({len(dataset.train)}, 200, "
                "replace=False)) over train/good in loader order"
            )
            protocol_notes["200"] = note
            pair = _mvtec_pair(
                "mt200", "magnetic_tile", "Magnetic Tile, 200-image protocol", subset,
                ctx.work_dir / "magnetic_tile_200", cfg, settings["preset"], settings["coreset"], ctx,
                " (seeded subsample)", residual_row=settings.get("residual_row", True), subsets=halves,
            )
        elif protocol == "full":
            protocol_notes["full"] = "all of train/good"
            pair = _mvtec_pair(
                "mt_full", "magnetic_tile", f"Magnetic Tile, full train ({len(dataset.train)})", dataset,
                ctx.work_dir / "magnetic_tile_full", cfg, settings["preset"], settings["coreset"], ctx, "",
                residual_row=settings.get("residual_row", True), subsets=halves,
            )
        else:
            raise ValueError(f"unknown Magnetic Tile protocol {protocol!r}")
        rows += pair
    return {
        "data": str(data),
        "protocol": {"train": protocol_notes, "test": f"full test split ({len(dataset.test)} images)",
                     "image_size": cfg.features.image_size,
                     "halves": f"stmae_research.protocols.real_defect_indices(test, seed={REAL_DEFECT_SEED}): "
                               f"mt_val {len(halves['mt_val'])} images (settings are chosen here), "
                               f"mt_test {len(halves['mt_test'])} (reported)"},
        "rows": rows,
    }
