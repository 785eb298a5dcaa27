"""The full and quick settings of every dataset, the command-line overrides, and how a run's
settings depart from the full protocol.

Why a module of its own: the targets, the tables and ``--combine`` all ask whether a row was
measured with reduced settings; the answer is derived from these settings in one place.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Sequence

from .common import DATASETS, _epochs, _limit, _pct

FMNIST_FULL_TRAIN_LIMIT = 1000

#: Settings per mode. ``epochs`` None = the preset's; ``train_limit``/``test_limit`` None = all.
MODES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "magnetic_tile": {"protocols": ["200", "full"], "preset": "default", "epochs": None, "coreset": 0.1,
                          "residual_row": True},
        # 1,000 seeded training images per class (of 6,000): the issue allows a per-class limit,
        # and with it the ten classes fit about an hour on 2 CPU cores or one GPU call.
        "fashion_mnist": {
            "classes": "all", "train_limit": FMNIST_FULL_TRAIN_LIMIT, "test_limit": None,
            "preset": "lowres", "epochs": None, "coreset": 0.1,
        },
        "mnist": {
            "classes": "all", "train_limit": None, "test_limit": None,
            "preset": "lowres", "epochs": None, "coreset": 0.1,
        },
        "demo": {"preset": "demo", "epochs": None, "coreset": 0.1},
    },
    "quick": {
        # No residual-only row: scoring the test split a second time would break the 15 minutes.
        "magnetic_tile": {"protocols": ["200"], "preset": "fast", "epochs": 20, "coreset": 0.01,
                          "residual_row": False},
        "fashion_mnist": {
            "classes": "0,4,8", "train_limit": 200, "test_limit": 500,
            "preset": "lowres", "epochs": 15, "coreset": 0.1,
        },
        "mnist": {
            "classes": "0,4,8", "train_limit": 200, "test_limit": 500,
            "preset": "lowres", "epochs": 15, "coreset": 0.1,
        },
        "demo": {"preset": "demo", "epochs": 60, "coreset": 0.1},
    },
}


def _preset_epochs(preset_name: str) -> int:
    from stmae.config import preset

    return preset(preset_name).train.epochs


def describe_reductions(settings: dict[str, dict[str, Any]], datasets: Sequence[str]) -> dict[str, str]:
    """How ``settings`` differ from the full protocol (``MODES["full"]``): dataset key -> text.

    Derived from the settings actually used, so command-line overrides show up too; datasets
    run with the full settings are absent.
    """
    notes: dict[str, str] = {}
    for key in datasets:
        got, full = settings[key], MODES["full"][key]
        diffs = []
        if got.get("protocols") != full.get("protocols"):
            names = {"200": "200-image protocol", "full": "full train split"}
            diffs.append(
                f"{' + '.join(names[x] for x in got['protocols'])} only "
                f"(full: {' + '.join(names[x] for x in full['protocols'])})"
            )
        if got["preset"] != full["preset"]:
            diffs.append(f"ST-MAE `{got['preset']}` preset instead of `{full['preset']}`")
        got_epochs = got["epochs"] or _preset_epochs(got["preset"])
        full_epochs = full["epochs"] or _preset_epochs(full["preset"])
        if got_epochs != full_epochs:
            diffs.append(f"ST-MAE {_epochs(got_epochs)} instead of {full_epochs}")
        if got.get("residual_row", True) != full.get("residual_row", True):
            diffs.append("no ST-MAE residual-only row")
        if got["coreset"] != full["coreset"]:
            diffs.append(f"kNN (and ST-MAE memory) greedy coreset {_pct(got['coreset'])} instead of {_pct(full['coreset'])}")
        if "classes" in got:
            if str(got["classes"]).strip().lower() != str(full["classes"]):
                diffs.append(f"normal classes {got['classes']} only (full: {full['classes']})")
            if got["train_limit"] != full["train_limit"]:
                diffs.append(f"{_limit(got['train_limit'])} training images per class (full: {_limit(full['train_limit'])})")
            if got["test_limit"] != full["test_limit"]:
                diffs.append(f"{_limit(got['test_limit'])} seeded test images (full: {_limit(full['test_limit'])})")
        if diffs:
            notes[key] = f"{DATASETS[key]['title']}: " + "; ".join(diffs)
    return notes


def resolve_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The mode's settings with the command-line overrides applied."""
    settings = copy.deepcopy(MODES["quick" if args.quick else "full"])
    if getattr(args, "mt_protocols", None):
        settings["magnetic_tile"]["protocols"] = args.mt_protocols
    for s in settings.values():
        if args.epochs is not None:
            s["epochs"] = args.epochs
        if args.coreset is not None:
            s["coreset"] = args.coreset
        if "classes" in s:
            if args.classes is not None:
                s["classes"] = args.classes
            if args.train_limit is not None:
                s["train_limit"] = args.train_limit if args.train_limit > 0 else None
            if args.test_limit is not None:
                s["test_limit"] = args.test_limit if args.test_limit > 0 else None
    return settings
