"""``stmae demo``: build the texture set, train, evaluate, write results and heat maps.

The demo is the "does it work on my machine" check for a new user: offline, no data to
fetch, a few minutes on a laptop CPU, and it reports the same metrics a real benchmark
does. Its model is smaller than the default one (128 px crops, a 16 x 16 grid) so it
finishes quickly on two CPU cores; everything else is the standard pipeline.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .config import Config, preset
from .data import load_mvtec
from .data.synthetic import DemoSpec, make_demo_dataset
from .evaluate import evaluate
from .report import write_evaluation
from .train import fit

#: What the demo must reach (asserted by tests/test_pipeline.py::test_demo_reaches_its_targets at the
#: default settings, and printed by the CLI).
DEMO_TARGETS = {"image_auroc": 0.95, "pixel_auroc": 0.95}


def demo_config(epochs: int | None = None, device: str = "auto") -> Config:
    """The demo's configuration: the ``demo`` preset (128 px crops, 16 x 16 grid, CPU-sized)."""
    cfg = preset("demo")
    return cfg.override({"train.epochs": epochs, "train.device": device}).validate()


def run_demo(
    out_dir: str | os.PathLike = "demo_out",
    *,
    epochs: int | None = None,
    spec: DemoSpec = DemoSpec(),
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the whole demo into ``out_dir`` and return the results written to results.json.

    ``out_dir`` receives ``textures/`` (the generated data; ``textures/validation/good`` sets
    the threshold), ``run/`` (the trained model),
    ``results.json``, ``scores.csv``, ``report.html`` and ``report_images/`` (heat-map panels
    for every test image).
    """
    out = Path(out_dir)
    started = time.perf_counter()
    root = make_demo_dataset(out, spec)
    fitted = fit(root, out / "run", demo_config(epochs, device), val_data=root / "validation" / "good", quiet=quiet)
    dataset = load_mvtec(root)
    evaluation = evaluate(fitted.detector, dataset, examples_per_type=len(dataset.test), quiet=quiet)
    metrics = evaluation.metrics
    extra = {
        "dataset": "stmae built-in textures (brick, grass, gravel from scikit-image; drawn defects)",
        "n_train": fitted.meta["n_train"],
        "n_val": fitted.meta["n_val"],
        "fit_seconds": fitted.meta["fit_seconds"],
        "train_seconds": fitted.meta["train_seconds"],
        "device": fitted.meta["device"],
        "targets": DEMO_TARGETS,
        "passed_targets": all((metrics.get(k) or 0.0) >= v for k, v in DEMO_TARGETS.items()),
        "total_seconds": round(time.perf_counter() - started, 1),  # all but writing the report
    }
    return write_evaluation(evaluation, out, title="stmae demo: textures", extra=extra)
