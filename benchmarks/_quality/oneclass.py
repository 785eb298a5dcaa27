"""The one-class protocols, Fashion-MNIST and MNIST: one normal class per fit, the table's
rows are means over the classes run.

Why a module of its own: both data sets run the same way (``stmae.protocols.oneclass`` for
ST-MAE, the kNN baseline per class); only the loader's protocol name and the path differ.
"""

from __future__ import annotations

from typing import Any

from .common import (
    DATA_PATHS, DATASETS, KNN, STMAE, STMAE_MEMORY, STMAE_RESIDUAL, Context, _epochs, _fmt, _knn, _limit, _mean, _pct,
    _row, _row_line, _stmae_config,
)

ONECLASS_SEED = 0


def _oneclass(key: str, protocol: str, settings: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from stmae.data import load_oneclass, oneclass_classes
    from stmae.protocols import oneclass
    from stmae_research.protocols import each_term_alone

    data = ctx.data_root / DATA_PATHS[key]
    classes = oneclass_classes(protocol, data, ONECLASS_SEED)
    # Class tokens (indices or names) go to stmae as given: the loader resolves them.
    if str(settings["classes"]).strip().lower() == "all":
        wanted = [str(i) for i in range(len(classes))]
    else:
        wanted = [c.strip() for c in str(settings["classes"]).split(",") if c.strip()]
    cfg = _stmae_config(settings["preset"], settings["epochs"], ctx)
    title = DATASETS[key]["title"]
    limits = {"train_limit": settings["train_limit"], "test_limit": settings["test_limit"]}

    ctx.log(f"  {title}: ST-MAE, classes {','.join(wanted)} ({_epochs(cfg.train.epochs)})")
    summary = oneclass(
        protocol, data, ctx.work_dir / key, wanted, cfg,
        seed=ONECLASS_SEED, quiet=ctx.quiet, log=lambda line: ctx.log("    " + line),
        columns=each_term_alone if settings.get("residual_row", True) else None, **limits,
    )
    st_rows = summary["rows"]

    ctx.log(f"  {title}: kNN baseline (greedy coreset {_pct(settings['coreset'])})")
    knn_rows = []
    for token in wanted:
        ds = load_oneclass(protocol, data, token, seed=ONECLASS_SEED, **limits)
        res = _knn(ds.train, ds.test, cfg, settings["coreset"], ctx)
        r = {
            "class": ds.name.split("-", 1)[1],  # "<source>-<class name>", as stmae.protocols.oneclass names rows
            **{k: res.get(k) for k in ("image_auroc", "image_ap", "image_f1max")},
            "n_train": res["n_train"],
            "n_test": res["n_images"],
            "bank_size": res["bank_size"],
            "fit_seconds": res["fit_seconds"],
            "predict_seconds": res["predict_seconds"],
        }
        knn_rows.append(r)
        ctx.log(f"    {r['class']}: image_auroc {_fmt(r['image_auroc'], 4)}  image_f1max {_fmt(r['image_f1max'], 4)}"
                f"  (fit {r['fit_seconds']:.0f} s)")

    n_test = st_rows[0]["n_test"]
    names = [r["class"] for r in st_rows]
    indices = [classes.index(n) for n in names]
    if len(wanted) == len(classes):
        class_note = f"all {len(classes)} classes"
    else:
        class_note = f"{len(wanted)} of {len(classes)} classes ({','.join(map(str, indices))})"
    held_out = f"{round(100 * cfg.fit.held_out):g} % held out for calibration"
    train_note = f"train {_limit(settings['train_limit'])}/class"
    common = f"mean of {class_note}; {train_note}; test {n_test}"
    row_name = f"{title}, mean"
    st_mean = {k: _mean([r.get(k) for r in st_rows]) for k in ("image_auroc", "image_f1max", "image_ap")}
    knn_mean = {k: _mean([r.get(k) for r in knn_rows]) for k in ("image_auroc", "image_f1max", "image_ap")}
    preset_note = (
        f"`{settings['preset']}`, {cfg.features.image_size} px, grid {cfg.features.grid_size}, {_epochs(cfg.train.epochs)}"
    )
    rows = [
        _row(key, key, row_name, STMAE, st_mean, _mean([r["fit_seconds"] for r in st_rows]), ctx.device_label,
             f"{preset_note}; mean of {class_note}; {train_note} ({held_out}); test {n_test}; fit s = mean per class",
             per_class=st_rows, mean=st_mean, config=summary["config"]),
        *_oneclass_alone_rows(key, row_name, st_rows, ctx, n_test),
        _row(key, key, row_name, KNN, knn_mean, _mean([r["fit_seconds"] for r in knn_rows]), ctx.device_label,
             f"same features; greedy coreset {_pct(settings['coreset'])}; {common}; fit s = mean per class",
             per_class=knn_rows, mean=knn_mean, coreset_ratio=settings["coreset"], bank="greedy k-center coreset"),
    ]
    return {
        "data": str(data),
        "protocol": {
            "oneclass": protocol,
            "classes": names,
            "class_indices": indices,
            "seed": ONECLASS_SEED,
            "train_limit": settings["train_limit"],
            "test_limit": settings["test_limit"],
            "n_test": n_test,
        },
        "rows": rows,
    }


def _oneclass_alone_rows(key: str, row_name: str, st_rows: list[dict[str, Any]], ctx: Context,
                        n_test: int) -> list[dict[str, Any]]:
    """The ST-MAE rows' models scored by the residual alone and the memory alone
    (``stmae.protocols.oneclass(..., columns=stmae_research.protocols.each_term_alone)``), as rows of their own; none when the
    protocol did not score them (no memory in the config, or ``residual_row`` off)."""
    rows = []
    for term, method, what in (("residual", STMAE_RESIDUAL, "0 (the paper's residual map)"),
                               ("memory", STMAE_MEMORY, "1 (the nearest-good-patch distance alone)")):
        field = f"image_auroc_{term}_alone"
        if any(field not in r for r in st_rows):
            continue
        per_class = [{"class": r["class"], "image_auroc": r[field]} for r in st_rows]
        mean = {"image_auroc": _mean([r[field] for r in st_rows])}
        rows.append(_row(key, key, row_name, method, mean, None, ctx.device_label,
                         f"the ST-MAE row's models scored with `infer.distance_weight` {what}; test {n_test}",
                         per_class=per_class, mean=mean))
        ctx.log("    " + _row_line(rows[-1]))
    return rows


def run_fashion_mnist(settings: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return _oneclass("fashion_mnist", "fashion-mnist", settings, ctx)


def run_mnist(settings: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return _oneclass("mnist", "mnist", settings, ctx)
