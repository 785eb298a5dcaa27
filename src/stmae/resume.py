"""Saved training state, so a long fit that is stopped can continue where it stopped.

Why: the ``accurate`` preset trains for hours on a CPU on a full-size training set, and
even the default takes tens of minutes on a large training set: longer than a laptop stays awake or a shared machine's job slot lasts. ``fit`` therefore
writes the training state into the run folder every few minutes
(``train.checkpoint_seconds``, 300 by default; a few MB for the default model, ~40 MB for
``accurate``'s, well under a second) as ``train_state.pt`` (weights, optimizer moments, the step, the random generators
and the losses so far), always at an epoch boundary, and ``fit(...,
resume=True)`` (``stmae fit --resume``) continues from it. Because the state includes the
generator that draws the batches and the splits, a resumed fit on the same device produces
the same weights as one that was never stopped (``tests/test_resume.py``).

The state carries a fingerprint of everything that shapes training (the config without the
inference and device settings, the training images, and the code: package version and
:func:`stmae.provenance.code_revision`): resuming with other settings, other images or
other code is refused with a clear error naming the file instead of silently mixing two
trainings. The
file is deleted once the run folder is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import __version__
from .checkpoint import META_FILE, CheckpointError
from .fileio import atomic_write
from .provenance import code_revision

#: File name of the training state inside the run folder.
STATE_FILE = "train_state.pt"


def fingerprint(config: dict[str, Any], sample_ids: Sequence[str]) -> str:
    """SHA-256 of the training-relevant config, the training images (in order), the package
    version and the code revision (:func:`stmae.provenance.code_revision`).

    ``config`` is :meth:`Config.to_dict`; its ``infer`` section, ``train.device`` and
    ``train.checkpoint_seconds`` are left out because they do not change what is trained
    (resuming a CPU fit on a GPU is allowed). The version and code revision are in because
    a fit continued by other code is a model that no single version of the code trains: the
    state is refused instead.
    """
    relevant = {k: v for k, v in config.items() if k != "infer"}
    relevant["train"] = {k: v for k, v in relevant.get("train", {}).items() if k not in ("device", "checkpoint_seconds")}
    code = {"version": __version__, "code_revision": code_revision()}
    blob = json.dumps({"config": relevant, "samples": list(sample_ids), "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class TrainState:
    """Everything :func:`stmae.train.train_model` needs to continue after ``epoch`` epochs."""

    fingerprint: str
    epoch: int
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    generator: torch.Tensor
    torch_rng: torch.Tensor
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0  # training time spent before this state was saved, all sessions

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a save killed half-way leaves the previous state intact."""
        payload = {
            "format": "stmae-train-state-1",
            "fingerprint": self.fingerprint,
            "epoch": self.epoch,
            "step": self.step,
            "model": {k: v.detach().cpu() for k, v in self.model.items()},
            "optimizer": self.optimizer,
            "generator": self.generator,
            "torch_rng": self.torch_rng,
            "losses": list(self.losses),
            "train_seconds": float(self.train_seconds),
        }
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str) -> "TrainState":
        """Read a state; CheckpointError naming the file when it is unreadable or from another training."""
        p = Path(path)
        try:
            payload = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise CheckpointError(f"{p}: unreadable training state ({exc}); delete it to start afresh") from None
        if not isinstance(payload, dict) or payload.get("format") != "stmae-train-state-1":
            raise CheckpointError(f"{p}: not an stmae training state; delete it to start afresh")
        if payload["fingerprint"] != expected_fingerprint:
            raise CheckpointError(
                f"{p}: saved by a fit with other settings, other training images or other code (another "
                "stmae version or source); resume with the same code, config and data, or delete the file "
                "(or fit without --resume) to start afresh"
            )
        return cls(
            fingerprint=payload["fingerprint"],
            epoch=int(payload["epoch"]),
            step=int(payload["step"]),
            model=payload["model"],
            optimizer=payload["optimizer"],
            generator=payload["generator"],
            torch_rng=payload["torch_rng"],
            losses=[float(x) for x in payload["losses"]],
            train_seconds=float(payload.get("train_seconds", 0.0)),
        )


def starting_state(path: Path, expected_fingerprint: str, resume: bool) -> TrainState | None:
    """The state a fit starts from: the saved one when ``resume``, else None.

    Either way a surprise is said out loud (UserWarning): a saved state that a fit without
    ``resume`` is about to overwrite, or ``resume`` with nothing saved (and whether the run
    folder is already complete), since both mean hours of training done again.
    """
    if resume and path.is_file():
        return TrainState.load(path, expected_fingerprint)
    if path.is_file():
        warnings.warn(f"{path}: a stopped fit saved its training state here; starting afresh "
                      "(fit with resume=True, or `stmae fit --resume`, to continue it instead)", stacklevel=3)
    elif resume:
        finished = " (the run folder there is complete: nothing was stopped)" if (path.parent / META_FILE).is_file() else ""
        warnings.warn(f"{path}: no saved training state{finished}; training from the start", stacklevel=3)
    return None
