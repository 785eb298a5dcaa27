"""Run folders: the self-describing checkpoint that ``predict``/``test`` need and nothing else.

A run folder holds

- ``config.yaml``        the complete effective configuration,
- ``model.safetensors``  the fitted scoring module's state_dict
                         (:meth:`stmae.pipeline.MapPipeline.fitted_state`): transformer
                         weights (``model.*``), feature statistics (``feature_stats.*``),
                         for the ``mahalanobis`` residual ``residual_stats.*``, and with
                         ``infer.distance_weight`` > 0 the memory bank and its blend statistics
                         (``memory.*``),
- ``meta.json``          backbone, layers, image size, normalisation, the calibration (the
                         one place the thresholds are written), seed, training summary and
                         stmae version.

Safetensors rather than pickle: loading a model someone sent you cannot execute code.

Atomic as a whole: :func:`save_run` writes the complete run into a hidden folder beside the
target, fsyncs every file and the folder, and only then puts it in place, in one atomic
exchange of the two folders (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames,
see :func:`save_run`). A fit killed at any moment therefore leaves either the previous run
or the new one, never new weights beside an old ``meta.json``. ``meta.json`` also records the
run format (:data:`RUN_SCHEMA`) and the SHA-256 of ``model.safetensors``, and
:func:`load_run` refuses a folder whose weights do not match it (copied over by hand, a
mix of two runs), an unknown format, or a ``meta.json`` with missing or mistyped keys.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import secrets
import shutil
import stat
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError, current_name
from .features import FeatureStats
from .model import PatchMemory, ResidualStats
from .fileio import atomic_write_json, fsync_dir, fsync_path, is_temp_name, sha256_file
from .thresholds import Calibration

if TYPE_CHECKING:
    from .pipeline import MapPipeline

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
#: The files that make a run; everything else in a run folder (``test/`` reports, notes)
#: is carried over unchanged when a fit overwrites the run.
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE)
#: Version of the run-folder format written into ``meta.json`` as ``run_schema``. 2: the
#: calibration is the only record of the thresholds (``meta["calibration"]``). Schema 1 (a
#: top-level ``threshold`` beside it) loads through :func:`migrate_meta`; folders without a
#: schema were written before stmae 0.1.0 recorded it and load without the weights check.
RUN_SCHEMA = 2
_STAGING = ".staging"  # suffix of the hidden folder a run is written into
_PREVIOUS = ".previous"  # suffix of the old run while the fallback (two renames) swaps


class CheckpointError(RuntimeError):
    """A run folder is missing, incomplete or unreadable; the message names the file."""


@dataclass
class RunContents:
    """Everything read back from a run folder."""

    config: Config
    model_state: dict[str, torch.Tensor]
    stats: FeatureStats
    meta: dict[str, Any]
    residual_stats: ResidualStats | None = None
    memory: PatchMemory | None = None
    calibration: Calibration | None = None


def save_run(
    run_dir: str | os.PathLike,
    pipeline: "MapPipeline",
    meta: dict[str, Any],
    *,
    drop: Collection[str] = (),
) -> Path:
    """Write a run folder atomically as a whole (see the module docstring).

    The run is written into ``.<name>.<random>.staging`` beside ``run_dir``; entries of an
    existing ``run_dir`` other than :data:`RUN_FILES`, the names in ``drop`` and leftover
    temp files are carried into it (hard links, copies across devices), the files and the
    folder are fsynced, and the staging folder then replaces ``run_dir``. Where the atomic
    exchange is unavailable (not Linux, or a filesystem without it) the old folder is first
    renamed to ``.<name>.<random>.previous``: a crash between the two renames leaves no
    ``run_dir`` but the complete old run under that name, and :func:`load_run` says so.
    ``meta`` gets ``run_schema`` and ``weights_sha256`` added (the caller's dict is not changed).

    Raises:
        CheckpointError: ``run_dir`` is a file, or is the current working folder (or holds
            it): replacing the folder a process works in would pull it from under it.
    """
    run = Path(run_dir)
    target = Path(os.path.realpath(run))  # a symlinked run folder: replace what it points to
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{run}: exists and is not a folder; choose another --out")
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == cwd or target in cwd.parents:
        raise CheckpointError(
            f"{run}: is the current folder or contains it; a run folder is replaced as a whole, "
            "so write it into a sub-folder (e.g. --out run)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(target, _STAGING)
    try:
        if target.is_dir():
            os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
            _carry_over(target, staging, set(RUN_FILES) | set(drop))
        _write_run_files(staging, pipeline, meta)
        fsync_dir(staging)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return run


def _write_run_files(folder: Path, pipeline: "MapPipeline", meta: dict[str, Any]) -> None:
    """The three run files, each fsynced, ``meta.json`` (with the weights' hash) last.

    The weights file is the pipeline's fitted state; the calibration goes into ``meta.json``.
    """
    pipeline.config.save(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    save_file(pipeline.fitted_state(), str(weights), metadata={"format": "stmae"})
    fsync_path(weights)
    cal = pipeline.calibration
    record = {
        **meta, "calibration": None if cal is None else cal.to_dict(),
        "run_schema": RUN_SCHEMA, "weights_sha256": sha256_file(weights),
    }
    atomic_write_json(folder / META_FILE, record)


def _new_sibling(target: Path, suffix: str) -> Path:
    """Create a new hidden folder beside ``target`` (mode 0777 less the umask, like mkdir)."""
    for _ in range(100):
        path = target.with_name(f".{target.name}.{secrets.token_hex(6)}{suffix}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise CheckpointError(f"{target}: no free temporary folder name beside it")


def _carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Hard-link (or copy) the entries of ``old`` that are not part of a run into ``new``."""
    for entry in old.iterdir():
        if entry.name in skip or is_temp_name(entry.name):
            continue
        dest = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dest)
        elif entry.is_dir():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(dest))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another device below, or a filesystem without hard links
        shutil.copy2(src, dst)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Make ``staging`` be ``target``; the old folder (if any) is removed afterwards."""
    if not target.exists():
        os.rename(staging, target)
        fsync_dir(target.parent)
        return
    if _exchange(staging, target):
        fsync_dir(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now the old run
        return
    previous = _new_sibling(target, _PREVIOUS)
    previous.rmdir()
    os.rename(target, previous)
    os.rename(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@lru_cache(maxsize=1)
def _renameat2() -> Any:
    """libc's ``renameat2`` (glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def load_run(run_dir: str | os.PathLike) -> RunContents:
    """Read a run folder written by :func:`save_run`.

    Only JSON, YAML (``safe_load``) and safetensors are read: nothing in a run folder can
    execute code. Raises :class:`CheckpointError` naming the file for anything missing,
    unreadable, of an unknown format (:func:`check_meta`) or not matching ``meta.json``.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"{run}: run folder not found (create one with `stmae fit`){_previous_hint(run)}")
    for name in (META_FILE, CONFIG_FILE, WEIGHTS_FILE):
        if not (run / name).is_file():
            raise CheckpointError(
                f"{run / name}: missing; {run} is not a complete stmae run folder "
                "(an interrupted `stmae fit` leaves no meta.json)"
            )
    try:
        meta = json.loads((run / META_FILE).read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{run / META_FILE}: unreadable ({exc})") from None
    check_meta(meta, run / META_FILE)
    meta = migrate_meta(meta)
    try:
        config = Config.load(run / CONFIG_FILE)
        # Settings added after a run was written take the value that run was scored with.
        given = _infer_keys(run / CONFIG_FILE)
        for key, then in _INFER_BEFORE_THE_OPTION.items():
            if key not in given:
                setattr(config.infer, key, then)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    except (OSError, ValueError, yaml.YAMLError) as exc:  # e.g. bytes that are not UTF-8
        raise CheckpointError(f"{run / CONFIG_FILE}: unreadable ({type(exc).__name__}: {exc})") from None
    try:
        tensors = load_file(str(run / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{run / WEIGHTS_FILE}: unreadable ({exc})") from None
    try:
        stats = FeatureStats(tensors.pop("feature_stats.mean"), tensors.pop("feature_stats.std"))
    except KeyError:
        raise CheckpointError(f"{run / WEIGHTS_FILE}: no feature statistics stored") from None
    residual_stats = None
    if "residual_stats.mean" in tensors and "residual_stats.precision" in tensors:
        residual_stats = ResidualStats(tensors.pop("residual_stats.mean"), tensors.pop("residual_stats.precision"))
    elif config.infer.residual == "mahalanobis":
        raise CheckpointError(
            f"{run / WEIGHTS_FILE}: config.yaml asks for the mahalanobis residual but no residual "
            "statistics are stored (refit with `stmae fit`)"
        )
    memory = None
    if "memory.bank" in tensors and "memory.medians" in tensors:
        memory = PatchMemory.from_tensors({k: tensors.pop(k) for k in list(tensors) if k.startswith("memory.")})
    elif config.infer.distance_weight > 0:
        raise CheckpointError(
            f"{run / WEIGHTS_FILE}: config.yaml sets infer.distance_weight = {config.infer.distance_weight} but no memory "
            "bank is stored (refit with `stmae fit`)"
        )
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    # Checked after the contents, whose errors say more precisely what is missing.
    if "weights_sha256" in meta and sha256_file(run / WEIGHTS_FILE) != meta["weights_sha256"]:
        raise CheckpointError(
            f"{run / WEIGHTS_FILE}: does not match {run / META_FILE} (its SHA-256 differs from the one "
            "recorded when the run was written): the folder mixes files of two runs or the weights were "
            "changed; refit with `stmae fit` or restore the run folder as a whole"
        )
    calibration = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
    return RunContents(
        config=config, model_state=state, stats=stats, meta=meta, residual_stats=residual_stats, memory=memory,
        calibration=calibration,
    )


def migrate_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A checked ``meta.json`` of any readable schema in the current shape (a copy).

    The one migration: schema 1 and unversioned runs kept the image threshold at the top
    level too (and the oldest ones only there). It becomes the calibration (rule ``max``,
    centre the median held-out score) where there is none, and the top-level copy is dropped.
    """
    out = dict(meta)
    threshold = out.pop("threshold", None)
    if not out.get("calibration") and threshold is not None:
        scores = (out.get("calibration_scores") or {}).get("all") or [threshold]
        t = float(threshold)
        out["calibration"] = Calibration("max", t, t, float(sorted(scores)[len(scores) // 2]), len(scores)).to_dict()
    return out


#: ``infer`` settings newer than some run folders, and how those older runs scored.
_INFER_BEFORE_THE_OPTION: dict[str, object] = {
    "distance_weight": 0.0, "blend": "median", "pixel_residual": "same", "pixel_blend": "same",
}


def _infer_keys(config_file: Path) -> set[str]:
    """The ``infer`` keys a run's config.yaml sets, by their current names (older runs lack
    the newer options)."""
    data = yaml.safe_load(config_file.read_text()) or {}
    infer = data.get("infer") if isinstance(data, dict) else None
    keys = {current_name(f"infer.{k}") for k in infer} if isinstance(infer, dict) else set()
    return {k.split(".", 1)[1] for k in keys if k.startswith("infer.")}


# Keys of meta.json that stmae reads back, with the JSON types they must have.
_NUMBER = (int, float)
_META_TYPES: dict[str, tuple[type, ...]] = {
    "run_schema": (int,),
    "weights_sha256": (str,),
    "threshold": (int, float, type(None)),
    "calibration": (dict, type(None)),
    "stmae_version": (str,),
    "image_size": (int,),
    "grid_size": (int,),
    "feature_channels": (int,),
    "seed": (int,),
    "n_train": (int,),
    "n_val": (int,),
    "epochs": (int,),
    "losses": (list,),
    "val_images": (list,),
    "calibration_scores": (dict,),
    "backbone": (dict,),
    "memory": (dict, type(None)),
    "final_loss": (int, float, type(None)),
    "fit_seconds": _NUMBER,
    "train_seconds": _NUMBER,
}
_REQUIRED = {2: ("run_schema", "weights_sha256", "calibration"), 1: ("run_schema", "weights_sha256", "threshold")}
_REQUIRED_LEGACY = ("threshold",)


def check_meta(meta: Any, where: str | os.PathLike) -> None:
    """Refuse a ``meta.json`` that this stmae cannot trust: not an object, an unknown
    ``run_schema``, a required key missing, or a known key of the wrong JSON type.

    Unknown extra keys are allowed (later versions of the same schema may add some).

    Raises:
        CheckpointError: naming ``where`` and the offending key.
    """
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(meta).__name__}; the file was changed")
    schema = meta.get("run_schema")
    if "run_schema" in meta and (type(schema) is not int or schema not in _REQUIRED):
        raise CheckpointError(
            f"{where}: unknown run format run_schema={schema!r} (this stmae {_version()} reads {', '.join(map(str, sorted(_REQUIRED)))}); "
            "the run was written by another stmae version or the file was changed"
        )
    if "run_schema" in meta:
        required = _REQUIRED[schema]
    else:  # written before run_schema: a calibration, or at least the threshold
        required = ("calibration",) if "calibration" in meta else _REQUIRED_LEGACY
    for key in required:
        if key not in meta:
            raise CheckpointError(f"{where}: required key {key!r} is missing; the file is incomplete or was changed")
    for key, types in _META_TYPES.items():
        if key not in meta:
            continue
        value = meta[key]
        bad_bool = isinstance(value, bool) and bool not in types  # JSON true is not a number
        if bad_bool or not isinstance(value, types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"{where}: key {key!r} is {value!r}, expected {wanted}; the file was changed")
    threshold = meta.get("threshold")
    if isinstance(threshold, float) and not math.isfinite(threshold):
        raise CheckpointError(f"{where}: key 'threshold' is {threshold}, expected a finite number or null")
    cal = meta.get("calibration")
    if cal:
        try:
            parsed = Calibration.from_dict(cal)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: key 'calibration' is not a calibration record; the file was changed") from None
        values = (parsed.image_threshold, parsed.pixel_threshold, parsed.center)
        if not all(math.isfinite(v) for v in values):
            raise CheckpointError(f"{where}: the calibration holds a non-finite threshold or centre; the file was changed")
    digest = meta.get("weights_sha256")
    if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
        raise CheckpointError(f"{where}: key 'weights_sha256' is not a SHA-256 hex digest; the file was changed")


def _version() -> str:
    from . import __version__

    return __version__


def _previous_hint(run: Path) -> str:
    """Where an overwrite interrupted between its two renames left the complete old run."""
    try:
        left = sorted(run.parent.glob(f".{run.name}.*{_PREVIOUS}"))
    except OSError:
        return ""
    if not left:
        return ""
    return f"; an interrupted overwrite left the previous complete run in {left[-1]}: rename it to {run}"
