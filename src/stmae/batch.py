"""Scoring a batch of inputs into a folder: predictions.csv, skipped.csv and heat maps.

Why a library function: ``stmae predict`` is a thin layer over it, and the same function
serves a run folder (torch) and an exported model (onnxruntime / OpenVINO), so both write
byte-identical CSV rows for the same scores.

Streaming: rows are written (and flushed) as predictions arrive, into
``predictions.csv.partial``; the finished file is renamed to ``predictions.csv``. An
interrupted run therefore leaves its rows so far under a name no script mistakes for a
complete result. A bad input never stops the batch unless ``strict``: it is listed with its
reason in ``skipped.csv``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .fileio import atomic_write, csv_cell, safe_name
from .mapops import resize_map
from .predlog import Entry, PredictionLog
from .prediction import Skipped
from .report import panel, save_png
from .scorer import Scorer

COLUMNS = ("path", "score", "normalized", "label", "threshold")


@dataclass
class BatchSummary:
    """What a batch did: counts, the skipped inputs and the files written."""

    scored: int = 0
    flagged: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    threshold: float | None = None
    predictions_csv: Path | None = None
    skipped_csv: Path | None = None


def predict_to_folder(
    model: Scorer,
    images: Any,
    out: str | os.PathLike,
    *,
    heatmaps: bool = True,
    threshold: float | None = None,
    strict: bool = False,
    max_pixels: int | None = None,
    batch_size: int | None = None,
    quiet: bool = True,
    log: PredictionLog | None = None,
    model_name: tuple[str, int] = ("model", 1),
) -> BatchSummary:
    """Score ``images`` (paths, folders, arrays ... see :mod:`stmae.inputs`) into folder ``out``.

    Writes ``predictions.csv`` (columns path, score, normalized, label, threshold and, with
    heat maps, heatmap), ``skipped.csv`` (path, reason) and ``heatmaps/<name>.png``.
    ``strict`` makes the first bad input raise DataError instead of being skipped. With
    ``log``, every scored image is also recorded there (:mod:`stmae.predlog`) under
    ``model_name`` = (name, version), without waiting for the write.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(COLUMNS) + (["heatmap"] if heatmaps else [])
    partial = out / "predictions.csv.partial"
    summary = BatchSummary(threshold=model.threshold if threshold is None else threshold)
    seen: dict[str, int] = {}
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        stream = model.iter_predict(
            images, threshold=threshold, on_error="raise" if strict else "skip", max_pixels=max_pixels,
            keep_images=heatmaps, batch_size=batch_size, quiet=quiet,
        )
        for pred in stream:
            if isinstance(pred, Skipped):
                summary.skipped.append(pred)
                continue
            row = pred.row()
            if pred.path is None:
                row["path"] = f"<input {summary.scored + len(summary.skipped)}>"
            if heatmaps:
                name = _unique_name(row["path"], seen)
                if pred.image is not None:  # kept by iter_predict(keep_images=True)
                    shown = resize_map(pred.anomaly_map, pred.image.shape[:2])
                    save_png(out / "heatmaps" / f"{name}.png", panel(pred.image, shown, pred.pixel_threshold or pred.threshold))
                    row["heatmap"] = f"heatmaps/{name}.png"
            writer.writerow([csv_cell(row.get(c)) for c in columns])
            handle.flush()
            if log is not None:
                log.record(Entry(
                    source=str(row["path"]), score=pred.score, normalized=pred.normalized, label=pred.label,
                    threshold=pred.threshold, model=model_name[0], model_version=model_name[1],
                    path=None if pred.path is None else str(pred.path),
                    heatmap=str(out / row["heatmap"]) if row.get("heatmap") else None,
                ))
            summary.scored += 1
            summary.flagged += int(pred.label == 1)
    os.replace(partial, out / "predictions.csv")
    summary.predictions_csv = out / "predictions.csv"
    summary.skipped_csv = out / "skipped.csv"
    _write_skipped(summary.skipped_csv, summary.skipped)
    return summary


def _write_skipped(path: Path, skipped: list[Skipped]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            for s in skipped:
                writer.writerow([s.item, s.reason])

    atomic_write(path, write)


def _unique_name(path: str, seen: dict[str, int]) -> str:
    """``<parent>_<stem>`` of a path, made unique with a counter (heat-map file names)."""
    p = Path(path)
    base = f"{p.parent.name}_{p.stem}" if p.parent.name else p.stem
    base = safe_name(base, empty="image")
    count = seen.get(base, 0)
    seen[base] = count + 1
    return base if count == 0 else f"{base}_{count}"


__all__ = ["BatchSummary", "COLUMNS", "predict_to_folder"]
