"""Pictures and files for people: heat maps, overlays, CSV/JSON results, the HTML report.

Heat maps are scaled by the run's threshold (score / (2 * threshold), clipped), not per
image: a good image then looks calm and a defect bright, and colours mean the same thing in
every picture. Without a threshold the image's own maximum is used.
"""

from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .fileio import atomic_write, atomic_write_json, atomic_write_text, csv_cell, safe_name

if TYPE_CHECKING:
    from .evaluate import Evaluation

# Jet-like colour ramp: dark blue -> blue -> cyan -> yellow -> red -> dark red.
_RAMP_POS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_RAMP_RGB = np.array(
    [[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]]
)


def colorize(amap: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """(H, W) float map -> (H, W, 3) uint8 colours; values scaled to [0, vmax]."""
    top = float(vmax) if vmax and vmax > 0 else float(amap.max()) or 1.0
    v = np.clip(amap / top, 0.0, 1.0)
    rgb = np.stack([np.interp(v, _RAMP_POS, _RAMP_RGB[:, c]) for c in range(3)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def display_max(threshold: float | None, amap: np.ndarray) -> float:
    """The map value drawn as the hottest colour: twice the threshold (threshold = mid-scale)."""
    return 2.0 * threshold if threshold and threshold > 0 else float(amap.max())


def overlay(image: np.ndarray, amap: np.ndarray, threshold: float | None, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured map over a uint8 (H, W, 3) image of the same size."""
    heat = colorize(amap, display_max(threshold, amap)).astype(np.float32)
    out = (1 - alpha) * image.astype(np.float32) + alpha * heat
    return out.round().astype(np.uint8)


def outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """Draw the boundary of a bool mask onto a copy of a uint8 (H, W, 3) image."""
    edge = mask & ~ndimage.binary_erosion(mask, iterations=1, border_value=0)
    out = image.copy()
    out[edge] = colour
    return out


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as PNG atomically."""
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def panel(
    image: np.ndarray, amap: np.ndarray, threshold: float | None, mask: np.ndarray | None = None
) -> np.ndarray:
    """Side by side: image (with ground-truth outline), heat map, overlay, predicted mask."""
    shown = outline(image, mask) if mask is not None and mask.any() else image
    heat = colorize(amap, display_max(threshold, amap))
    pred = amap > threshold if threshold is not None else np.zeros(amap.shape, bool)
    pred_rgb = np.repeat((pred * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if mask is not None and mask.any():
        pred_rgb = outline(pred_rgb, mask)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([shown, gap, heat, gap, overlay(image, amap, threshold), gap, pred_rgb], axis=1)


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write rows (dicts) as CSV with the given column order, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())



def html_report(
    path: str | os.PathLike,
    title: str,
    metrics: dict[str, Any],
    per_type: dict[str, dict[str, Any]],
    figures: Iterable[tuple[str, str, str]],
    notes: Sequence[str] = (),
) -> None:
    """A self-contained-enough HTML page: metric tables and (caption, type, image file) figures.

    Image files are referenced relative to the HTML file, so the folder can be moved as a whole.
    """
    base = Path(path).parent
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
        "figure{display:inline-block;margin:8px}figcaption{font-size:13px}"
        "img{image-rendering:pixelated}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts.append("<h2>Metrics</h2><table>")
    for key, value in metrics.items():
        parts.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(format_cell(value))}</td></tr>")
    parts.append("</table>")
    if per_type:
        cols = sorted({k for row in per_type.values() for k in row})
        parts.append("<h2>Per defect type</h2><table><tr><th>type</th>")
        parts += [f"<th>{html.escape(c)}</th>" for c in cols]
        parts.append("</tr>")
        for t, row in per_type.items():
            cells = "".join(f"<td>{html.escape(format_cell(row.get(c)))}</td>" for c in cols)
            parts.append(f"<tr><th>{html.escape(t)}</th>{cells}</tr>")
        parts.append("</table>")
    parts.append(
        "<h2>Examples</h2><p>Each row: image with ground-truth outline (green) | anomaly map "
        "(threshold = middle of the colour scale) | overlay | predicted mask (map &gt; threshold).</p>"
    )
    current = None
    for caption, group, image_file in figures:
        if group != current:
            parts.append(f"<h3>{html.escape(group)}</h3>")
            current = group
        rel = os.path.relpath(image_file, base)
        parts.append(
            f"<figure><img src='{html.escape(rel)}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))


def format_cell(value: Any, digits: int = 4) -> str:
    """A table cell: floats rounded, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """Rows of dicts as a GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


#: File name of the list of skipped inputs that batch commands write into their output folder.
SKIPPED_FILE = "skipped.csv"


def write_skipped(out_dir: str | os.PathLike, skipped: Sequence[tuple[str, str]]) -> Path:
    """Write ``skipped.csv`` (columns ``path``, ``reason``; header only when nothing was skipped)."""
    path = Path(out_dir) / SKIPPED_FILE
    write_csv(path, [{"path": f, "reason": r} for f, r in skipped], ["path", "reason"])
    return path


def write_evaluation(
    evaluation: "Evaluation",
    out_dir: str | os.PathLike,
    *,
    title: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``results.json``, ``scores.csv``, ``skipped.csv``, ``report.html`` and ``report_images/``.

    ``skipped.csv`` (columns path, reason) is written even when empty, so a script never
    reads a stale list from an earlier run. Returns the results dict that was written to
    ``results.json`` (``n_skipped`` and ``skipped`` included).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = dict(extra or {})
    results.update(evaluation.metrics)
    results["threshold"] = evaluation.threshold
    results["eval_size"] = evaluation.eval_size
    results["pixel_fraction"] = evaluation.pixel_fraction
    results["per_type"] = evaluation.per_type
    results["n_skipped"] = len(evaluation.skipped)
    results["skipped"] = [{"path": f, "reason": r} for f, r in evaluation.skipped]
    atomic_write_json(out / "results.json", results)
    write_skipped(out, evaluation.skipped)
    write_csv(out / "scores.csv", evaluation.records, ["name", "defect_type", "label", "score", "predicted"])
    figures = []
    for i in sorted(evaluation.examples, key=lambda k: (evaluation.records[k]["defect_type"], k)):
        image, amap, mask = evaluation.examples[i]
        rec = evaluation.records[i]
        file = out / "report_images" / f"{i:05d}_{safe_name(rec['defect_type'])}.png"
        save_png(file, panel(image, amap, evaluation.threshold, mask))
        verdict = "" if rec["predicted"] is None else (" flagged" if rec["predicted"] else " passed")
        figures.append((f"{rec['name']} score {rec['score']:.4g}{verdict}", rec["defect_type"], str(file)))
    notes = []
    if evaluation.metrics.get("pixel_auroc") is None:
        notes.append("Pixel metrics skipped: the test split has no ground-truth masks.")
    if evaluation.skipped:
        notes.append(f"{len(evaluation.skipped)} unreadable test images were skipped (listed in {SKIPPED_FILE}).")
    html_report(out / "report.html", title, {k: v for k, v in results.items() if not isinstance(v, (dict, list))},
                evaluation.per_type, figures, notes)
    return results


