"""Benchmark protocols: many fits and tests in one call, one table out.

- :func:`benchmark`: every category of an MVTec-style root (MVTec AD, MPDD, ...): fit on ``train/good``, test on ``test/``, one row per category + mean.
- :func:`oneclass`: semantic one-class detection (Fashion-MNIST, MNIST, CIFAR-10,
  class-per-folder): train on one class, test on the whole test split, one row per class
  + mean. The test split is the same for every normal class, so its features are
  extracted once and reused (only the labels change), which is most of the work saved.

Both write ``<out>/<row>/run`` (the run folder) and ``<out>/<row>/test`` (results), and the
summary as ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .config import Config
from .data import AnomalyDataset, DataError, load_mvtec, load_oneclass, oneclass_classes
from .device import resolve_device
from .evaluate import evaluate
from .features import extract_features
from .fileio import atomic_write_json, atomic_write_text, safe_name
from .build import build_extractor
from .metrics import compute_metrics
from .report import markdown_table, write_evaluation
from .train import FitResult, fit, make_config

#: ``columns(fitted, test_features, labels) -> {column: value}``: extra columns of a one-class row.
ClassColumns = Callable[[FitResult, torch.Tensor, np.ndarray], dict[str, Any]]

LOWRES_PROTOCOLS = ("fashion-mnist", "mnist", "cifar10")
TABLE_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max", "image_ap", "pixel_ap")


def categories_of(root: str | os.PathLike) -> list[str]:
    """Sub-folders of ``root`` that look like MVTec-style categories (have ``train/good``)."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r}: benchmark root not found")
    found = sorted(p.name for p in r.iterdir() if (p / "train" / "good").is_dir())
    if not found:
        raise DataError(f"{r}: no category folders with train/good inside (expected <root>/<category>/train/good)")
    return found


def benchmark(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    categories: str | Sequence[str] = "all",
    config: Config | str | os.PathLike | None = None,
    *,
    quiet: bool = False,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Fit + test each category of an MVTec-style ``root``; returns and writes the summary."""
    available = categories_of(root)
    wanted = available if categories in ("all", ["all"]) else _as_list(categories)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DataError(f"{root}: unknown categories {unknown}; available: {available}")
    out = Path(out_dir)
    rows = []
    for name in wanted:
        started = time.perf_counter()
        dataset = load_mvtec(Path(root) / name)
        fitted = fit(dataset, out / name / "run", config, quiet=quiet, **overrides)
        evaluation = evaluate(fitted.detector, dataset, examples_per_type=4, quiet=quiet)
        results = write_evaluation(evaluation, out / name / "test", title=f"stmae benchmark: {name}")
        row = {"category": name, **{k: results.get(k) for k in TABLE_KEYS}}
        row.update(
            n_test=results["n_images"],
            fit_seconds=fitted.meta["fit_seconds"],
            seconds=round(time.perf_counter() - started, 1),
        )
        rows.append(row)
        log(_row_line(row, "category"))
    return _write_summary(out, rows, "category", {"root": str(root), "config": make_config(config, _dotted(overrides)).to_dict()})


def oneclass(
    protocol: str,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    normal_class: str | int | Sequence[str | int] = "all",
    config: Config | str | os.PathLike | None = None,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    log: Callable[[str], None] = print,
    columns: ClassColumns | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """One-class protocol: one row per normal class (image metrics) and a mean row.

    ``normal_class``: "all", an index or name, or a comma-separated list of them.
    ``config``: None picks the ``lowres`` preset for the 28-32 px sources (Fashion-MNIST,
    MNIST, CIFAR-10) and the defaults for the ``folder`` protocol.
    ``columns(fitted, test_features, labels)``: more columns for each class's row, from its
    fitted model and the shared test split's raw features and labels (no second extraction).
    """
    if config is None and protocol in LOWRES_PROTOCOLS:
        config = "lowres"
    cfg = make_config(config, _dotted(overrides))
    classes = oneclass_classes(protocol, data, seed)
    wanted = list(range(len(classes))) if normal_class in ("all", ["all"]) else _as_list(normal_class)
    test_feats: torch.Tensor | None = None
    out = Path(out_dir)
    rows = []
    for cls in wanted:
        started = time.perf_counter()
        ds = load_oneclass(protocol, data, cls, train_limit=train_limit, test_limit=test_limit, seed=seed)
        name = ds.name.split("-", 1)[1]  # "<source>-<class name>"
        if test_feats is None:  # identical test split for every normal class
            test_feats = _test_features(cfg, ds, quiet)
        fitted = fit(ds, out / safe_name(name) / "run", cfg, quiet=quiet)
        _, scores = fitted.detector.pipeline.score_cached(test_feats)
        labels = np.array([s.label for s in ds.test])
        metrics = compute_metrics(labels, scores.numpy())
        row = {"class": name, **{k: metrics[k] for k in ("image_auroc", "image_ap", "image_f1max")}}
        if columns is not None:
            row.update(columns(fitted, test_feats, labels))
        row.update(
            n_train=fitted.meta["n_train"],
            n_test=len(labels),
            fit_seconds=fitted.meta["fit_seconds"],
            seconds=round(time.perf_counter() - started, 1),
        )
        atomic_write_json(out / safe_name(name) / "results.json", {**metrics, **row})
        rows.append(row)
        log(_row_line(row, "class"))
    extra = {
        "protocol": protocol,
        "data": str(data),
        "train_limit": train_limit,
        "test_limit": test_limit,
        "seed": seed,
        "config": cfg.to_dict(),
    }
    return _write_summary(out, rows, "class", extra)


def _test_features(cfg: Config, dataset: AnomalyDataset, quiet: bool) -> torch.Tensor:
    """Features of the (shared) test split, extracted once."""
    device = resolve_device(cfg.train.device)
    extractor = build_extractor(cfg).to(device)
    return extract_features(
        extractor, dataset.test, cfg.features.image_size, batch_size=64, device=device, desc="test features", quiet=quiet
    )


def _write_summary(out: Path, rows: list[dict[str, Any]], key: str, extra: dict[str, Any]) -> dict[str, Any]:
    numeric = [k for k in rows[0] if k != key and all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows)]
    mean: dict[str, Any] = {key: "mean"}
    for k in numeric:
        vals = [r[k] for r in rows if r.get(k) is not None]
        # counts are not averaged: a mean of image counts reads like a count
        mean[k] = float(np.mean(vals)) if vals and not k.startswith("n_") else None
    summary = {**extra, "rows": rows, "mean": mean}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", markdown_table(rows + [mean], [key, *numeric]))
    return summary


def _row_line(row: dict[str, Any], key: str) -> str:
    parts = [f"{k} {v:.4f}" for k, v in row.items() if k in TABLE_KEYS and isinstance(v, float)]
    return f"{row[key]}: " + "  ".join(parts) + f"  ({row['seconds']:.0f} s)"


def _as_list(value: str | int | Sequence[str | int]) -> list[str]:
    if isinstance(value, (str, int)):
        return [v.strip() for v in str(value).split(",") if v.strip()]
    return [str(v) for v in value]


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("__", "."): v for k, v in overrides.items()}


__all__ = ["ClassColumns", "benchmark", "oneclass", "categories_of"]
