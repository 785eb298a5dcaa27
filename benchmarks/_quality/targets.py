"""The issue's targets measured on the rows: met, missed or not run, and whether reduced
settings make a flag indicative only.

Why a module of its own: the tables, the docs page and the printed summary show the same
flags, computed once from the results alone.
"""

from __future__ import annotations

from typing import Any

from .common import KNN, MT_PROTOCOLS, STMAE, STMAE_MEMORY
from .settings import describe_reductions

#: anomalib PatchCore on Magnetic Tile, 200-image protocol: measured before this repository,
#: with anomalib on an H100, as recorded by the project (docs/results.md, "Reference figures").
PATCHCORE = {"image_auroc": 0.900, "pixel_auroc": 0.800, "aupro": 0.703}
ONECLASS_TARGETS = {"fashion_mnist": 0.95, "mnist": 0.99}  # issue "Detection quality, round 2"
METRIC_NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}


def _find_row(results: dict[str, Any], key: str, method: str) -> dict[str, Any] | None:
    for entry in results.get("datasets", {}).values():
        for row in entry.get("rows", []) or []:
            if row.get("key") == key and row.get("method") == method:
                return row
    return None


def _reduced_beyond_protocols(results: dict[str, Any], dataset: str) -> bool:
    """False when a dataset's only reduction is a Magnetic Tile protocol left out.

    Why: the targets are measured on the 200-image rows; a run that ran those with the full
    settings but skipped the full-train rows measured the targets exactly, not indicatively.
    """
    settings = (results.get("settings") or {}).get(dataset) or {}
    if dataset != "magnetic_tile" or not {"protocols", "preset", "epochs", "coreset"} <= settings.keys():
        return True
    return bool(describe_reductions({dataset: {**settings, "protocols": list(MT_PROTOCOLS)}}, [dataset]))


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets with measured values and a status: met, missed or not run."""
    reduced = results.get("reduced_settings") or {}
    out: list[dict[str, Any]] = []

    def add(row_key: str, target: str, metric: str, required: float | None, measured: float | None,
            reference: str) -> None:
        dataset = "magnetic_tile" if row_key.startswith("mt") else row_key
        if required is None or measured is None:
            status = "not run"
        else:
            status = "met" if measured >= required else "missed"
        out.append({
            "row": row_key, "target": target, "metric": metric, "reference": reference,
            "required": required, "measured": measured, "status": status,
            "indicative_only": dataset in reduced and _reduced_beyond_protocols(results, dataset),
        })

    st = _find_row(results, "mt200", STMAE)
    knn = _find_row(results, "mt200", KNN)
    for metric, value in PATCHCORE.items():
        add("mt200", f"Magnetic Tile 200: ST-MAE {METRIC_NAMES[metric]} >= PatchCore", metric, value,
            st and st.get(metric), "anomalib PatchCore (reference)")
    for metric in PATCHCORE:
        add("mt200", f"Magnetic Tile 200: ST-MAE {METRIC_NAMES[metric]} >= same-run kNN", metric,
            knn and knn.get(metric), st and st.get(metric), "kNN baseline, same run")
    # Issue "Detection quality, round 2": on the held-back real-defect half the default must be
    # at or above its own memory alone and the same-run kNN (settings were chosen on mt_val).
    mem = _find_row(results, "mt200", STMAE_MEMORY)
    for ref_row, ref_name in ((mem, "memory only, same model"), (knn, "kNN baseline, same run")):
        for metric in PATCHCORE:
            add("mt200", f"Magnetic Tile 200, mt_test: ST-MAE {METRIC_NAMES[metric]} >= {ref_name}", metric,
                _half(ref_row, "mt_test", metric), _half(st, "mt_test", metric), f"{ref_name}, mt_test")
    for key, value in ONECLASS_TARGETS.items():
        row = _find_row(results, key, STMAE)
        name = "Fashion-MNIST" if key == "fashion_mnist" else "MNIST"
        add(key, f"{name}: ST-MAE mean image AUROC >= {value:.2f}", "image_auroc", value,
            row and row.get("image_auroc"), "issue target")
    return out


def _half(row: dict[str, Any] | None, half: str, metric: str) -> float | None:
    """``row``'s ``metric`` on one half of the real-defect split (None when not measured)."""
    return ((row or {}).get("subsets") or {}).get(half, {}).get(metric)
