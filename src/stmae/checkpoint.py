"""Run folders: the self-describing checkpoint that ``predict``/``test`` need and nothing else.

A run folder holds

- ``config.yaml``        the complete effective configuration,
- ``model.safetensors``  transformer weights (``model.*``), feature statistics
                         (``feature_stats.mean`` / ``feature_stats.std``) and, for the
                         ``mahalanobis`` residual, ``residual_stats.mean`` / ``.precision``,
                         and, with ``infer.memory`` > 0, the memory bank ``memory.bank`` and
                         its two calibration medians ``memory.medians``,
- ``meta.json``          backbone, layers, image size, normalisation, threshold, seed,
                         training summary and stmae version.

Safetensors rather than pickle: loading a model someone sent you cannot execute code.
``meta.json`` is written last, so a folder without it is an unfinished run and is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError
from .features import FeatureStats
from .model import PatchMemory, ResidualStats
from .fileio import atomic_write, atomic_write_json

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"


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


def save_run(
    run_dir: str | os.PathLike,
    config: Config,
    model: torch.nn.Module,
    stats: FeatureStats,
    meta: dict[str, Any],
    residual_stats: ResidualStats | None = None,
    memory: PatchMemory | None = None,
) -> Path:
    """Write a run folder atomically file by file, ``meta.json`` last."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    config.save(run / CONFIG_FILE)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["feature_stats.mean"] = stats.mean.cpu().contiguous()
    tensors["feature_stats.std"] = stats.std.cpu().contiguous()
    if residual_stats is not None:
        tensors["residual_stats.mean"] = residual_stats.mean.cpu().contiguous()
        tensors["residual_stats.precision"] = residual_stats.precision.cpu().contiguous()
    if memory is not None:
        tensors.update(memory.to_tensors())
    atomic_write(run / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "stmae"}))
    atomic_write_json(run / META_FILE, meta)
    return run


def load_run(run_dir: str | os.PathLike) -> RunContents:
    """Read a run folder written by :func:`save_run`; clear errors for anything missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"{run}: run folder not found (create one with `stmae fit`)")
    for name in (META_FILE, CONFIG_FILE, WEIGHTS_FILE):
        if not (run / name).is_file():
            raise CheckpointError(
                f"{run / name}: missing; {run} is not a complete stmae run folder "
                "(an interrupted `stmae fit` leaves no meta.json)"
            )
    try:
        meta = json.loads((run / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{run / META_FILE}: unreadable ({exc})") from None
    try:
        config = Config.load(run / CONFIG_FILE)
        if not _mentions_memory(run / CONFIG_FILE):
            # Written before infer.memory existed: those runs scored with the pure residual.
            config.infer.memory = 0.0
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
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
        memory = PatchMemory.from_tensors({k: tensors.pop(k) for k in ("memory.bank", "memory.medians")})
    elif config.infer.memory > 0:
        raise CheckpointError(
            f"{run / WEIGHTS_FILE}: config.yaml sets infer.memory = {config.infer.memory} but no memory "
            "bank is stored (refit with `stmae fit`)"
        )
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    return RunContents(
        config=config, model_state=state, stats=stats, meta=meta, residual_stats=residual_stats, memory=memory
    )


def _mentions_memory(config_file: Path) -> bool:
    """Whether a run's config.yaml sets ``infer.memory`` (False for runs older than the option)."""
    data = yaml.safe_load(config_file.read_text()) or {}
    infer = data.get("infer") if isinstance(data, dict) else None
    return isinstance(infer, dict) and "memory" in infer
