"""The ``stmae`` command line: a thin Typer layer over the Python API.

Every verb maps to one library call (``fit`` -> :func:`stmae.fit`, ``predict`` ->
:meth:`stmae.Detector.predict`, ``test`` -> :func:`stmae.evaluate.evaluate`, ``demo`` ->
:func:`stmae.demo.run_demo`, ...); this module only parses options, prints and maps known
errors to a one-line message and exit code 2 (no traceback for a user's mistake).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from . import __version__
from .data.io import DEFAULT_MAX_PIXELS, SERVE_MAX_PIXELS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="ST-MAE: unsupervised visual anomaly detection (train on good images, find defects).",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stmae {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ST-MAE: unsupervised visual anomaly detection."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError

    try:
        from .backbones import WeightsError
        from .checkpoint import CheckpointError
        from .config import ConfigError
    except ModuleNotFoundError:  # no torch (an exported-model install): these cannot be raised
        return (DataError, ValueError, FileNotFoundError)
    return (DataError, ConfigError, CheckpointError, WeightsError, ValueError, FileNotFoundError)


def friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's known error types into ``error: <message>`` and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _user_errors() as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(code=130) from None
        except ModuleNotFoundError as exc:
            if exc.name != "torch":
                raise
            typer.secho(
                "error: this command needs torch, which is not installed: pip install 'stmae[torch]' "
                "(an exported model scores without it: stmae predict MODEL.onnx ...)",
                fg=typer.colors.RED, err=True,
            )
            raise typer.Exit(code=2) from None

    return wrapper


def _parse_sets(items: List[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (e.g. model.depth=6), got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
DEVICE = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default: the run's / auto).")
WEIGHTS = typer.Option(
    None, "--backbone-weights", help="torchvision-format weights file for backbones without packaged weights."
)


CONFIG = typer.Option(None, "--config", "-c", help="YAML config; options override it.")
PRESET = typer.Option(None, "--preset", help="Start from a preset: default, accurate (larger transformer, for a GPU), fast (40 epochs), demo, lowres.")
EPOCHS = typer.Option(None, "--epochs", help="Training epochs.")
SETS = typer.Option([], "--set", help="Any setting as KEY=VALUE, e.g. --set model.depth=6 (repeatable).")


SKIP = typer.Option(
    False, "--skip-unreadable", help="Skip (and list) unreadable image files instead of stopping at the first."
)


MAX_PIXELS = typer.Option(
    DEFAULT_MAX_PIXELS, "--max-pixels", min=1,
    help="Largest image accepted, in pixels (width x height, read from the header before decoding).",
)


def _open(data_dir: Path, skip_unreadable: bool, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Any:
    """Open a dataset folder; with skip_unreadable, list the files that were dropped."""
    from .data import open_dataset

    if not skip_unreadable:
        return open_dataset(data_dir, max_pixels=max_pixels)
    dataset = open_dataset(data_dir, skip_unreadable=True, max_pixels=max_pixels)
    for file, reason in dataset.skipped:
        typer.secho(f"skipped {file}: {reason}", fg=typer.colors.YELLOW, err=True)
    return dataset


def _base(config: Optional[Path], preset: Optional[str]) -> Any:
    """The base configuration: a YAML file or a preset name (not both), or None for defaults."""
    if config is not None and preset is not None:
        raise ValueError("use either --config or --preset, not both (put the preset's values in the YAML)")
    return config if config is not None else preset


def _overrides(epochs: Optional[int], device: Optional[str], sets: List[str]) -> dict[str, Any]:
    values: dict[str, Any] = {"train.epochs": epochs, "train.device": device, **_parse_sets(sets)}
    return {k.replace(".", "__"): v for k, v in values.items() if v is not None}


def _geometry_overrides(tile: int | None, overlap: float | None, scale: float | None, keep_aspect: bool) -> dict[str, Any]:
    """``--tile / --tile-overlap / --scale / --keep-aspect`` as ``features.*`` settings."""
    if keep_aspect and tile is not None:
        raise typer.BadParameter("give --tile or --keep-aspect, not both", param_hint="--keep-aspect")
    if scale is not None and tile is None:
        raise typer.BadParameter("--scale applies to tiles; give --tile too", param_hint="--scale")
    if overlap is not None and tile is None and not keep_aspect:
        raise typer.BadParameter("--tile-overlap applies to tiles; give --tile or --keep-aspect", param_hint="--tile-overlap")
    out: dict[str, Any] = {"features.tile_overlap": overlap}
    if tile is not None:
        out.update({"features.geometry": "tile", "features.tile": tile, "features.scale": scale})
    elif keep_aspect:
        out["features.geometry"] = "aspect"
    return out


@app.command()
@friendly
def fit(
    data_dir: Path = typer.Argument(..., help="MVTec-style category folder (uses train/good) or a folder of good images."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to write (config.yaml, model.safetensors, meta.json)."),
    config: Optional[Path] = CONFIG,
    preset: Optional[str] = PRESET,
    backbone: Optional[str] = typer.Option(None, help="Backbone name, e.g. efficientnet_lite0, vgg19, resnet18."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated backbone layers, e.g. stride4,stride8,stride16."),
    backbone_weights: Optional[Path] = WEIGHTS,
    image_size: Optional[int] = typer.Option(None, help="Input side in pixels."),
    tile: Optional[int] = typer.Option(
        None, "--tile", min=32,
        help="Cut images into tiles of this many pixels (after --scale) instead of squeezing them to --image-size; "
        "for large images with small defects. Recorded in the run: predict, test, export and serve tile alike.",
    ),
    tile_overlap: Optional[float] = typer.Option(None, "--tile-overlap", help="Least share of a tile neighbouring tiles share (default 0.25)."),
    scale: Optional[float] = typer.Option(None, "--scale", help="With --tile: scale images by this before tiling (e.g. 0.5)."),
    keep_aspect: bool = typer.Option(
        False, "--keep-aspect", help="Scale images so the shorter side is --image-size and tile the longer one (aspect ratio kept)."
    ),
    grid_size: Optional[int] = typer.Option(None, help="Feature grid side."),
    patch_size: Optional[int] = typer.Option(None, help="Feature patch side in grid cells."),
    epochs: Optional[int] = EPOCHS,
    batch_size: Optional[int] = typer.Option(None, help="Training batch size."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    seed: Optional[int] = typer.Option(None, help="Random seed (recorded in the run)."),
    distance_weight: Optional[float] = typer.Option(
        None, "--distance-weight", help="Weight of the nearest-good-patch distance map in the blend with the residual, 0-1 (default: the preset's, 0.8 for default; 0 = the paper's residual alone, 1 = the distance alone, no transformer)."
    ),
    threshold_rule: Optional[str] = typer.Option(
        None, "--threshold-rule", help="How held-out good images set the threshold: max (default), quantile:Q or fpr:F."
    ),
    device: Optional[str] = DEVICE,
    val_dir: Optional[Path] = typer.Option(
        None, "--val-dir", help="Good images that set the threshold (default: hold out 10% of the training images)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a stopped fit from the training state it saved in --out (same settings and images)."
    ),
    set_: List[str] = SETS,
    skip_unreadable: bool = SKIP,
    max_pixels: int = MAX_PIXELS,
    quiet: bool = QUIET,
) -> None:
    """Train ST-MAE on good images and write a run folder.

    Long fits save their training state in the run folder every few minutes; after an
    interruption, the same command with --resume continues from there.
    """
    from .train import fit as fit_api

    overrides: dict[str, Any] = {
        "backbone.name": backbone,
        "backbone.layers": layers,
        "backbone.weights": str(backbone_weights) if backbone_weights else None,
        "features.image_size": image_size,
        **_geometry_overrides(tile, tile_overlap, scale, keep_aspect),
        "features.grid_size": grid_size,
        "model.patch_size": patch_size,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "train.seed": seed,
        "train.device": device,
        "infer.distance_weight": distance_weight,
        "fit.threshold_rule": threshold_rule,
    }
    overrides.update(_parse_sets(set_))
    val = _open(val_dir, skip_unreadable, max_pixels) if val_dir is not None else None
    result = fit_api(_open(data_dir, skip_unreadable, max_pixels), out, _base(config, preset), val_data=val, quiet=quiet, resume=resume, **{k.replace(".", "__"): v for k, v in overrides.items()})
    m = result.meta
    if m.get("resumed_at_epoch") is not None:
        typer.echo(f"resumed the saved training at epoch {m['resumed_at_epoch']} of {m['epochs']}")
    typer.echo(
        f"trained on {m['n_train']} images ({m['n_val']} held out) "
        + (f"as {m['n_train_tiles']:,} tiles of {m['geometry']['tile']} px " if m.get("n_train_tiles") else "")
        + f"in {m['fit_seconds']:.1f} s on {m['device']}; "
        f"final loss {m['final_loss']:.4f}; threshold {m['calibration']['image_threshold']:.5g}"
    )
    if m.get("memory"):
        mem = m["memory"]
        banked = mem.get("held_out_images_banked") or 0
        typer.echo(
            f"memory: {mem['bank_patches']:,} of {mem['train_patches']:,} training patches kept "
            + (f"(with the {banked} held-out images, banked after calibration) " if banked else "")
            + f"({mem['seconds']:.1f} s), blended with the residual at weight {result.detector.config.infer.distance_weight:g}"
        )
    typer.echo(f"run folder: {result.run_dir}")


@app.command()
@friendly
def update(
    run_dir: Path = typer.Argument(..., help="Run folder written by `stmae fit` (or an earlier update)."),
    good: Optional[List[Path]] = typer.Argument(None, help="New good images: files and/or folders (or one MVTec-style category)."),
    from_log: Optional[Path] = typer.Option(
        None, "--from-log", help="Instead, fold in the images confirmed good (POST /feedback) in this prediction log."
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the new version here (default: replace RUN_DIR, atomically)."),
    device: Optional[str] = DEVICE,
    backbone_weights: Optional[Path] = WEIGHTS,
    skip_unreadable: bool = SKIP,
    max_pixels: int = MAX_PIXELS,
    quiet: bool = QUIET,
) -> None:
    """Add good images to a fitted run without retraining: extend its memory bank and re-set its thresholds.

    The new version is written as a whole (the old one stays loadable until it is complete);
    meta.json records it in model_version and history.
    """
    from .update import update as update_api
    from .update import update_from_log

    weights = str(backbone_weights) if backbone_weights else None
    if (from_log is None) == (not good):
        raise ValueError("give either new good images or --from-log FILE (one of the two)")
    if from_log is not None:
        result = update_from_log(run_dir, from_log, out=out, device=device or "auto", backbone_weights=weights, quiet=quiet)
    else:
        data: Any = [str(p) for p in good or []]
        if len(data) == 1 and Path(data[0]).is_dir():
            data = _open(Path(data[0]), skip_unreadable, max_pixels)
        result = update_api(run_dir, data, out=out, device=device or "auto", backbone_weights=weights, quiet=quiet)
    e = result.entry
    typer.echo(
        f"version {e['version']}: {e['images_added']} good images added ({e['images_banked']} banked, "
        f"{e['images_held_out']} held out for calibration); bank {e['bank_patches']:,} patches; "
        f"threshold {e['image_threshold_before']:.5g} -> {e['image_threshold_after']:.5g} over "
        f"{e['calibration_images']} held-out good images"
    )
    typer.echo(f"run folder: {result.run_dir}")


@app.command()
@friendly
def predict(
    run_dir: Path = typer.Argument(..., help="Run folder written by `stmae fit`, or an exported model (.onnx / .xml)."),
    paths: List[Path] = typer.Argument(..., help="Images and/or folders of images (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for predictions.csv, skipped.csv and heatmaps/."),
    threshold: Optional[float] = typer.Option(None, help="Override the run's image threshold."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Write a heat-map PNG per image."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image (default: skip and list it)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Skip images with more pixels than this (read from the header)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per batch (default: the run's)."),
    device: Optional[str] = DEVICE,
    backbone_weights: Optional[Path] = WEIGHTS,
    engine: Optional[str] = typer.Option(
        None, "--engine", help="onnxruntime or openvino: score with the exported model (stmae export) instead of torch."
    ),
    log: Optional[Path] = typer.Option(
        None, "--log", help="Also record every scored image in this SQLite prediction log (created if missing)."
    ),
    quiet: bool = QUIET,
) -> None:
    """Score images: streams predictions.csv (path, score, normalized, label, threshold), skipped.csv and heat maps.

    Unreadable files are skipped and listed in skipped.csv (exit code 0); --strict makes the
    first one fatal (exit code 2). An exported model (or --engine) runs without torch.
    """
    from .batch import predict_to_folder
    from .runtime import is_exported_model, open_model

    if engine is not None or is_exported_model(run_dir):
        detector: Any = open_model(run_dir, engine=engine)
    else:
        from .infer import Detector

        weights = str(backbone_weights) if backbone_weights else None
        detector = Detector.load(run_dir, device=device or "auto", backbone_weights=weights)
    from .predlog import PredictionLog, model_identity

    prediction_log = PredictionLog(log) if log is not None else None
    try:
        summary = predict_to_folder(
            detector, list(paths), out, heatmaps=heatmaps, threshold=threshold, strict=strict,
            max_pixels=max_pixels, batch_size=batch_size, quiet=quiet,
            log=prediction_log, model_name=model_identity(detector, run_dir),
        )
    finally:
        if prediction_log is not None:
            prediction_log.close()
    for skip in summary.skipped:
        typer.secho(f"skipped {skip.item}: {skip.reason}", fg=typer.colors.YELLOW, err=True)
    limit = "none" if summary.threshold is None else f"{summary.threshold:.5g}"
    typer.echo(
        f"{summary.scored} images scored, {summary.flagged} flagged anomalous (threshold {limit}), "
        f"{len(summary.skipped)} skipped; wrote {summary.predictions_csv}"
        + (f" and {summary.skipped_csv}" if summary.skipped else "")
        + (f"; logged to {log}" if log is not None else "")
    )


@app.command()
@friendly
def watch(
    run_dir: Path = typer.Argument(..., help="Run folder written by `stmae fit`, or an exported model (.onnx / .xml)."),
    inbox: Path = typer.Argument(..., help="Folder the camera software writes images into."),
    log: Optional[Path] = typer.Option(None, "--log", help="SQLite prediction log to record every image in."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="CSV file to append one row per image to."),
    sort: Optional[str] = typer.Option(None, "--sort", help="move or link each scored file into INBOX/good/ or INBOX/anomalous/."),
    webhook: List[str] = typer.Option([], "--webhook", help="POST one JSON object per image to this URL (repeatable)."),
    mqtt: List[str] = typer.Option([], "--mqtt", help="Publish one JSON message per image to mqtt://host:port/topic, QoS 1 (repeatable)."),
    settle: float = typer.Option(1.0, "--settle", help="Seconds a file's size and time must stand still before it is scored."),
    poll: float = typer.Option(1.0, "--poll", help="Seconds between scans of the folder (events wake it earlier)."),
    no_events: bool = typer.Option(False, "--no-events", help="Poll only (for filesystems without change events)."),
    device: Optional[str] = DEVICE,
    engine: Optional[str] = typer.Option(None, "--engine", help="onnxruntime or openvino: score with the exported model."),
) -> None:
    """Score every image that lands in INBOX, once: log, CSV, sorting and webhook / MQTT messages. Ctrl+C stops."""
    from .predlog import PredictionLog
    from .runtime import is_exported_model, open_model
    from .watch import Watcher, make_sinks

    if engine is not None or is_exported_model(run_dir):
        model: Any = open_model(run_dir, engine=engine)
    else:
        from .infer import Detector

        model = Detector.load(run_dir, device=device or "auto")
    sinks = make_sinks(webhook, mqtt)
    plog = PredictionLog(log) if log is not None else None
    watcher = Watcher(model, inbox, model_path=run_dir, log=plog, csv_path=csv_path, sort=sort, sinks=sinks,
                      settle=settle, poll=poll, use_events=not no_events,
                      on_result=lambda m: typer.echo(f"{m['path']}: " + (f"error {m['error']}" if m["error"] else
                                                     f"score {m['score']:.5g} label {m['label']}")))
    typer.echo(f"watching {inbox} with {run_dir} ({len(sinks)} sink(s)); Ctrl+C stops")
    try:
        stats = watcher.run()
    except KeyboardInterrupt:
        watcher.close()
        stats = watcher.stats
    finally:
        if plog is not None:
            plog.close()
    left = ", ".join(f"{n}: {k} undelivered" for n, k in stats.undelivered.items())
    typer.echo(f"{stats.scored} scored, {stats.flagged} flagged, {stats.errors} unreadable" + (f"; {left}" if left else ""))


@app.command()
@friendly
def test(
    run_dir: Path = typer.Argument(..., help="Run folder written by `stmae fit`."),
    data_dir: Path = typer.Argument(..., help="Dataset folder with a test split (MVTec/BTAD layout or Folder)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: RUN_DIR/test)."),
    examples_per_type: int = typer.Option(4, help="Images per defect type shown in report.html."),
    device: Optional[str] = DEVICE,
    backbone_weights: Optional[Path] = WEIGHTS,
    strict: bool = typer.Option(
        False, "--strict", help="Stop at the first unreadable image or mask (exit 2) instead of skipping it."
    ),
    max_pixels: int = MAX_PIXELS,
    eval_size: Optional[str] = typer.Option(
        None, "--eval-size",
        help="Where pixel metrics are computed: model (masks resized to the map, the usual benchmark protocol) "
        "or native (maps resized to each mask's own size, so thin defects a resize would delete still count). "
        "Default: model for a run that squeezes its images, native for one that tiles or keeps the aspect ratio.",
    ),
    pixel_budget: int = typer.Option(
        250_000_000, "--pixel-budget", min=1,
        help="Most pixels held for the pixel metrics (8 bytes each); beyond it normal pixels are subsampled at one "
        "seeded rate, which keeps pixel AUROC and AUPRO unbiased (results.json: pixel_fraction).",
    ),
    skip_unreadable: bool = typer.Option(
        False, "--skip-unreadable", hidden=True, help="Accepted for old scripts; skipping is the default."
    ),
    quiet: bool = QUIET,
) -> None:
    """Evaluate a run on a labelled test split: results.json, scores.csv, skipped.csv, report.html.

    Unreadable images (empty, truncated, not an image, over --max-pixels) are skipped, each
    listed with its reason in skipped.csv, and the exit code stays 0; --strict stops instead.
    """
    from .evaluate import EVAL_SIZES

    if eval_size is not None and eval_size not in EVAL_SIZES:
        raise typer.BadParameter(f"must be one of {', '.join(EVAL_SIZES)}, not {eval_size!r}", param_hint="--eval-size")
    from .data import open_dataset
    from .evaluate import evaluate
    from .infer import Detector
    from .report import SKIPPED_FILE, write_evaluation

    del skip_unreadable  # the old opt-in is now the default
    dataset = open_dataset(data_dir, max_pixels=max_pixels)
    weights = str(backbone_weights) if backbone_weights else None
    detector = Detector.load(run_dir, device=device or "auto", backbone_weights=weights)
    evaluation = evaluate(
        detector, dataset, examples_per_type=examples_per_type, quiet=quiet, skip_unreadable=not strict,
        eval_size=eval_size, pixel_budget=pixel_budget,
    )
    target = out or Path(run_dir) / "test"
    results = write_evaluation(
        evaluation, target, title=f"stmae test: {dataset.name}", extra={"dataset": str(data_dir), "run": str(run_dir)}
    )
    for file, reason in evaluation.skipped:
        typer.secho(f"skipped {file}: {reason}", fg=typer.colors.YELLOW, err=True)
    _print_metrics(results)
    if evaluation.pixel_fraction < 1.0:
        typer.echo(f"pixel metrics at {evaluation.eval_size} size over all defect pixels and {evaluation.pixel_fraction:.1%} of the normal pixels (--pixel-budget)")
    typer.echo(
        f"{results['n_images']} images scored, {len(evaluation.skipped)} skipped (listed in {target / SKIPPED_FILE}); "
        f"wrote {target / 'results.json'}, {target / 'scores.csv'}, {target / 'report.html'}"
    )


def _print_metrics(results: dict[str, Any]) -> None:
    keys = ["image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max", "image_ap", "pixel_ap"]
    parts = []
    for k in keys:
        v = results.get(k)
        parts.append(f"{k} {'n/a' if v is None else f'{v:.4f}'}")
    typer.echo("  ".join(parts) + f"  (n_images {results.get('n_images')})")


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Output folder."),
    epochs: Optional[int] = typer.Option(None, help="Override the demo's training epochs."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = QUIET,
) -> None:
    """Build the built-in texture set, train, evaluate, write results.json and heat maps."""
    from .demo import DEMO_TARGETS, run_demo

    results = run_demo(out, epochs=epochs, device=device, quiet=quiet)
    _print_metrics(results)
    typer.echo(f"finished in {results['total_seconds']:.0f} s; results in {out / 'results.json'}, heat maps in {out / 'report_images'}, report {out / 'report.html'}")
    if not results["passed_targets"]:
        typer.secho(f"below the demo targets {DEMO_TARGETS}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=1)


@app.command()
@friendly
def benchmark(
    root: Path = typer.Argument(..., help="MVTec-style root holding <category>/train/good, test/, ground_truth/."),
    out: Path = typer.Option(Path("benchmark_out"), "--out", "-o", help="Output folder."),
    categories: str = typer.Option("all", help="Comma-separated categories, or 'all'."),
    config: Optional[Path] = CONFIG,
    preset: Optional[str] = PRESET,
    epochs: Optional[int] = EPOCHS,
    device: Optional[str] = DEVICE,
    set_: List[str] = SETS,
    quiet: bool = QUIET,
) -> None:
    """Fit + test every category; writes summary.md and summary.json with a mean row."""
    from .protocols import benchmark as run

    summary = run(root, out, categories, _base(config, preset), quiet=quiet, log=typer.echo, **_overrides(epochs, device, set_))
    typer.echo((out / "summary.md").read_text())
    typer.echo(f"wrote {out / 'summary.md'} and {out / 'summary.json'} ({len(summary['rows'])} categories)")


@app.command()
@friendly
def oneclass(
    protocol: str = typer.Argument(..., help="fashion-mnist, mnist, cifar10 or folder."),
    data: Path = typer.Argument(..., help="Dataset folder (or the MNIST CSV file)."),
    normal_class: str = typer.Option("all", "--normal-class", help="Class index or name, comma list, or 'all'."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Use at most K training images per class."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", help="Use a random subset of K test images."),
    out: Path = typer.Option(Path("oneclass_out"), "--out", "-o", help="Output folder."),
    config: Optional[Path] = CONFIG,
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Preset (default: lowres for fashion-mnist/mnist/cifar10, default for folder)."
    ),
    epochs: Optional[int] = EPOCHS,
    device: Optional[str] = DEVICE,
    seed: int = typer.Option(0, help="Seed for subsets and splits."),
    set_: List[str] = SETS,
    quiet: bool = QUIET,
) -> None:
    """One-class protocol: train on one class, test on the whole test split; one row per class."""
    from .protocols import oneclass as run

    summary = run(
        protocol, data, out, normal_class, _base(config, preset), train_limit=train_limit, test_limit=test_limit,
        seed=seed, quiet=quiet, log=typer.echo, **_overrides(epochs, device, set_),
    )
    typer.echo((out / "summary.md").read_text())
    typer.echo(f"wrote {out / 'summary.md'} and {out / 'summary.json'} ({len(summary['rows'])} classes)")


@app.command()
@friendly
def serve(
    model: Path = typer.Argument(..., help="Run folder written by `stmae fit` (or an exported model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 = every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    max_request_mb: float = typer.Option(32.0, "--max-request-mb", help="Largest request body accepted, in MiB."),
    max_pixels: int = typer.Option(SERVE_MAX_PIXELS, "--max-pixels", help="Largest image accepted, in pixels (width x height)."),
    workers: int = typer.Option(1, "--workers", help="Threads that score requests (requests queue for them)."),
    device: Optional[str] = DEVICE,
    log: Optional[Path] = typer.Option(
        None, "--log", help="SQLite prediction log (default: MODEL.predictions.sqlite beside the model); GET /history reads it."
    ),
    no_log: bool = typer.Option(False, "--no-log", help="Keep no prediction log."),
) -> None:
    """Serve a model over HTTP: POST /predict, GET /history, GET /health, GET /info, a web page at /, docs at /docs."""
    from .serve import serve as run
    from .serve.server import default_log_path

    plog = None if no_log else (log or default_log_path(model))
    run(model, host=host, port=port, max_request_mb=max_request_mb, max_pixels=max_pixels, workers=workers,
        device=device or "auto", log=typer.echo, prediction_log=plog)


@app.command()
@friendly
def export(
    run_dir: Path = typer.Argument(..., help="Run folder written by `stmae fit`."),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx or openvino."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="The .onnx / .xml file to write (default: model.onnx / model.xml in RUN_DIR)."
    ),
    input_layout: str = typer.Option("uint8_nhwc", "--input", help="Graph input: uint8_nhwc or float_nchw."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (>= 17)."),
    backbone_weights: Optional[Path] = WEIGHTS,
) -> None:
    """Export a run as one ONNX / OpenVINO graph: images in, anomaly map and scores out."""
    from .export import export_model

    weights = str(backbone_weights) if backbone_weights else None
    path = export_model(run_dir, out, format, opset=opset, input=input_layout, backbone_weights=weights)  # type: ignore[arg-type]
    extra = f" (+ {path.with_suffix('.bin').name})" if path.suffix == ".xml" else ""
    typer.echo(f"wrote {path}{extra} and {path.name}.json; predict with: stmae predict {path} IMAGES... --out DIR")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="stmae")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
