"""The built-in texture set, trained exactly as ``stmae demo`` trains it.

Why a module of its own: it is the protocol anyone can reproduce without downloading data;
its rows come from the same ST-MAE + kNN pair as Magnetic Tile's.
"""

from __future__ import annotations

import inspect
from typing import Any

from .common import Context
from .magnetic_tile import _mvtec_pair


def run_demo(settings: dict[str, Any], ctx: Context) -> dict[str, Any]:
    import stmae
    from stmae.data import load_mvtec
    from stmae.data.synthetic import DemoSpec, make_demo_dataset
    from stmae.demo import demo_config

    root = make_demo_dataset(ctx.work_dir / "demo", DemoSpec())
    dataset = load_mvtec(root)
    cfg = demo_config(settings["epochs"], ctx.device)  # exactly what `stmae demo` trains
    # Like `stmae demo`: where the generated set has its own validation crops and fit() takes
    # them, they set the threshold (older versions hold out 10 % of train/good instead).
    val_dir = root / "validation" / "good"
    use_val = val_dir.is_dir() and "val_data" in inspect.signature(stmae.fit).parameters
    rows = _mvtec_pair("demo", "demo", "Demo textures", dataset, ctx.work_dir / "demo" / "run", cfg, "demo",
                       settings["coreset"], ctx, "", val_data=val_dir if use_val else None)
    return {"data": "stmae.data.synthetic.make_demo_dataset (DemoSpec defaults)", "rows": rows}
