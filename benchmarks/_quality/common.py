"""What every part of the quality benchmark shares: where things are, the dataset and method
names, the run context, row building and number formatting.

Why a module of its own: the protocol modules build the rows that the targets, the renderers
and the merge code read, so the names and the row layout have one definition for all of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1]
REPO = BENCHMARKS.parent
RESULTS_DIR = BENCHMARKS / "results"

DOCS_PATH = REPO / "docs" / "results.md"
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"

#: Dataset keys in run order, with their ``--only`` letters and display names.
DATASETS: dict[str, dict[str, str]] = {
    "magnetic_tile": {"letter": "a", "title": "Magnetic Tile"},
    "fashion_mnist": {"letter": "b", "title": "Fashion-MNIST one-class"},
    "mnist": {"letter": "c", "title": "MNIST one-class (5k CSV)"},
    "demo": {"letter": "d", "title": "Demo textures"},
}

#: Where each dataset lives below ``--data-root``.
DATA_PATHS = {
    "magnetic_tile": Path("magnetic_tile") / "magnetic_tile",
    "fashion_mnist": Path("fashion_mnist"),
    "mnist": Path("mnist_5k") / "mnist_5k.csv.gz",
}

STMAE = "ST-MAE"
STMAE_RESIDUAL = "ST-MAE, residual only"  # the same trained model scored with infer.distance_weight = 0 (the paper's map)
STMAE_MEMORY = "ST-MAE, memory only"  # the same trained model scored with infer.distance_weight = 1 (the bank alone)
KNN = "kNN baseline"
KNN_SEED = 42
MT_PROTOCOLS = ("200", "full")  # Magnetic Tile training protocols, in table order
MT_ROW_PROTOCOL = {"mt200": "200", "mt_full": "full"}  # row key -> protocol


def knn_module() -> ModuleType:
    """The kNN yardstick (:mod:`stmae_research.knn`)."""
    from stmae_research import knn

    return knn


def git_state() -> dict[str, Any]:
    """``commit`` (short hash or None), ``dirty`` and ``modified`` (tracked files with uncommitted changes)."""
    from stmae.provenance import git_state as state

    got = state(REPO)
    return {"commit": got["commit"][:7] if got["commit"] else None, "dirty": got["dirty"], "modified": got["modified"]}


def describe_device(device: Any, threads: int) -> str:
    """``cpu (1 thread)`` or ``cuda:0 (NVIDIA H100 ...)``: the device column of every row."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


def _mean(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(ratio: float) -> str:
    return f"{100 * ratio:g} %"


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _limit(value: int | None) -> str:
    return "all" if value is None else str(value)


@dataclasses.dataclass
class Context:
    """What every dataset run needs besides its own settings."""

    data_root: Path
    work_dir: Path
    device: str  # as given (auto | cpu | cuda | cuda:N); passed to stmae as train.device
    torch_device: Any  # the resolved torch.device
    device_label: str
    quiet: bool
    log: Callable[[str], None] = print
    resume: bool = False  # continue stopped ST-MAE fits in work_dir; reuse finished ones


def _stmae_config(preset_name: str, epochs: int | None, ctx: Context, coreset: float | None = None) -> Any:
    """The preset with the run's epochs and device; ``coreset`` also sizes ST-MAE's memory bank
    (where the preset uses one) like the kNN's, so quick mode shrinks both alike."""
    from stmae.train import make_config

    return make_config(preset_name, {"train.epochs": epochs, "train.device": ctx.device,
                                     "fit.bank_coreset": coreset})


def _knn(train: Sequence[Any], test: Sequence[Any], cfg: Any, coreset: float, ctx: Context,
         subsets: dict[str, list[int]] | None = None) -> dict[str, Any]:
    return knn_module().knn_baseline(
        train, test, cfg, coreset_ratio=coreset, seed=KNN_SEED, quiet=ctx.quiet, device=ctx.torch_device,
        subsets=subsets,
    )


def _row(key: str, dataset: str, row: str, method: str, values: dict[str, Any], fit_seconds: float | None,
         device: str, settings: str, **details: Any) -> dict[str, Any]:
    return {
        "key": key,
        "dataset": dataset,
        "row": row,
        "method": method,
        "image_auroc": values.get("image_auroc"),
        "pixel_auroc": values.get("pixel_auroc"),
        "aupro": values.get("aupro"),
        "image_f1max": values.get("image_f1max"),
        "fit_seconds": fit_seconds,
        "device": device,
        "settings": settings,
        **details,
    }


def missing_data(key: str, data_root: Path) -> str | None:
    """Why ``key`` cannot run (its data is absent), or None."""
    if key not in DATA_PATHS:
        return None
    path = data_root / DATA_PATHS[key]
    if not path.exists():
        return f"data not found: {path}"
    return None


def default_out(quick: bool) -> Path:
    return RESULTS_DIR / ("quality_quick.json" if quick else "quality.json")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _row_line(row: dict[str, Any]) -> str:
    metrics = "  ".join(
        f"{name} {_fmt(row.get(k), 4)}"
        for k, name in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
                        ("image_f1max", "image F1-max"))
        if row.get(k) is not None
    )
    return f"{row['method']}: {metrics}  (fit {row.get('fit_seconds') or 0:.0f} s, {row.get('device')})"


def entry_provenance(results: dict[str, Any]) -> dict[str, Any]:
    """What a dataset entry records of the run that produced it (kept when files are merged):
    command, date, commit, uncommitted files, device, and (files written since provenance was
    recorded) the dirty flag, code revision and versions, which :func:`check_same_code` compares."""
    keys = ("command", "created", "commit", "modified", "device_label")
    out = {k: results.get(k) for k in keys}
    full = results.get("provenance") or {}
    for k in ("dirty", "code_revision", "versions"):
        if k in full:
            out[k] = full[k]
    return out
