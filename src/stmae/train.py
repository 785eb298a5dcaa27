"""Training: cache frozen-backbone features once, then train only the transformer.

Why cache: the backbone is frozen and training images are not augmented, so their features
never change; recomputing them every epoch would spend most of the time in the CNN.

A share of the good images (``fit.held_out``) is held out. Their scores calibrate the
decision threshold (the largest held-out good score), so a fresh run can label images
without ever having seen a defect. Callers can instead name their own validation images
(``val_data``), which is better when training images are near-duplicates of each other.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import save_run
from .config import PRESETS, Config, TrainConfig, preset
from .data import AnomalyDataset, DataError, Sample, open_dataset
from .features import FeatureStats, extract_sample_features
from .geometry import Geometry
from .device import autocast, resolve_device
from .build import build_extractor, build_model
from .fitting import fit_scoring
from .inputs import Item, expand, load_rgb
from .infer import Detector
from .pipeline import MapPipeline
from .model import STMAE, random_splits, reconstruction_loss
from .model.decoupling import SplitDrawer
from .provenance import code_revision
from .resume import STATE_FILE, TrainState, fingerprint, starting_state


@dataclass
class FitResult:
    """What :func:`fit` produced: the run folder, a ready detector and the training record."""

    run_dir: Path
    detector: Detector
    meta: dict[str, Any]
    losses: list[float] = field(default_factory=list)


def make_config(config: Config | str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """A validated config from a Config, a preset name, a YAML path or defaults, plus overrides."""
    if config is None:
        cfg = Config()
    elif isinstance(config, str) and config in PRESETS:
        cfg = preset(config)
    elif isinstance(config, Config):
        cfg = Config.from_dict(config.to_dict())  # copy: never mutate the caller's object
    else:
        cfg = Config.load(config)
    return cfg.override(overrides or {}).validate()


def training_samples(
    data: Any, minimum: int = 2
) -> tuple[list[Sample], str]:
    """Normal training samples and a description of where they came from.

    ``data``: a dataset folder or :class:`AnomalyDataset` (its ``train`` split), a list of
    :class:`Sample`, or anything ``predict`` accepts (:mod:`stmae.inputs`).
    """
    if isinstance(data, AnomalyDataset):
        samples, source = data.train, str(data.root or data.name)
    elif isinstance(data, (str, os.PathLike)):
        ds = open_dataset(data)
        samples, source = ds.train, str(data)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(s, Sample) for s in data):
        samples, source = list(data), "samples"
    else:
        samples, source = _samples_from_inputs(data), "in-memory images"
    if len(samples) < minimum:
        raise DataError(f"{source}: need at least {minimum} good images, found {len(samples)}")
    return samples, source


def _samples_from_inputs(data: Any) -> list[Sample]:
    """Good-image samples from anything ``predict`` accepts (:func:`stmae.inputs.expand`): paths,
    folders, PIL images, arrays, batches, tensors. Arrays are converted now, so an unusable one
    is named before training starts."""
    from PIL import Image

    samples = []
    for item in expand(data):
        if item.is_path:
            samples.append(Sample(Path(item.source), 0, "good", name=item.name))
        else:
            source = np.asarray(item.source.convert("RGB")) if isinstance(item.source, Image.Image) else item.source
            samples.append(Sample(None, 0, "good", array=load_rgb(Item(item.name, source, False)), name=item.name))
    return samples


def holdout_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) index arrays; at least one of each when fraction > 0."""
    if fraction <= 0:
        return np.arange(count), np.arange(0)
    n_val = min(count - 1, max(1, int(round(count * fraction))))
    perm = np.random.default_rng(seed).permutation(count)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up to ``base`` then cosine decay to 1% of it."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


#: A training loss: ``loss(reconstruction, features, hard_mining)`` -> scalar, where
#: ``hard_mining`` is ``train.hard_mining`` (so a replacement can mine hard cells alike).
LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def train_model(
    model: STMAE,
    feats: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    quiet: bool = False,
    *,
    loss: LossFn = reconstruction_loss,
    draw_splits: SplitDrawer = random_splits,
    after_step: Callable[[int], None] | None = None,
    state_path: str | os.PathLike | None = None,
    state_fingerprint: str = "",
    start: TrainState | None = None,
    save_every: float | None = None,
) -> list[float]:
    """Train ``model`` to reconstruct standardised features (N, C, G, G); returns epoch losses.

    Each step draws a fresh random split per image (the decoupling), so over training every
    patch is reconstructed from many different halves of its image.

    Three extension points, so that a training variant (the ablation study's, see
    docs/research.md) reuses this loop instead of copying it; their defaults
    are the package's training: ``loss`` (:data:`LossFn`, default
    :func:`~stmae.model.reconstruction_loss`), ``draw_splits`` (the per-step splits,
    :data:`~stmae.model.decoupling.SplitDrawer`, default per token), and ``after_step``,
    called with the 0-based index of every optimizer step just taken (e.g. to average the
    weights). A saved state holds none of them: resume with the same ones.

    With ``state_path``, the training state is written there (``stmae.resume``) at the
    first epoch boundary after every ``save_every`` seconds of training (default
    ``cfg.checkpoint_seconds``), and once more at the end if it was ever written,
    so the slow steps after training (the memory's coreset) are covered too. ``start`` (a
    loaded state) continues a stopped training from its epoch.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    n = feats.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total // 2)
    losses: list[float] = []
    step = 0
    first_epoch = 0
    earlier_seconds = 0.0
    if start is not None:
        model.load_state_dict(start.model)
        opt.load_state_dict(start.optimizer)
        gen.set_state(start.generator)
        torch.set_rng_state(start.torch_rng)
        step, first_epoch, losses, earlier_seconds = start.step, start.epoch, list(start.losses), start.train_seconds
    if save_every is None:
        save_every = cfg.checkpoint_seconds
    began = last_save = time.perf_counter()
    saved_epoch = start.epoch if start is not None else None  # long fits: keep the end state too

    def save_state(epoch: int) -> None:
        TrainState(
            fingerprint=state_fingerprint, epoch=epoch, step=step, model=model.state_dict(),
            optimizer=opt.state_dict(), generator=gen.get_state(), torch_rng=torch.get_rng_state(),
            losses=losses, train_seconds=earlier_seconds + time.perf_counter() - began,
        ).save(state_path)  # type: ignore[arg-type]

    bar = tqdm(range(first_epoch, cfg.epochs), desc="train", unit="epoch", disable=quiet, leave=False,
               initial=first_epoch, total=cfg.epochs)
    for epoch in bar:
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for first in range(0, n, cfg.batch_size):
            idx = order[first : first + cfg.batch_size]
            batch = feats[idx].to(device, non_blocking=True)
            split = draw_splits(len(idx), model.num_tokens, gen, device)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, warmup, cfg.lr)
            with autocast(device):
                value = loss(model(batch, split).float(), batch, cfg.hard_mining)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            if after_step is not None:
                after_step(step)
            running += value.item() * len(idx)
            step += 1
        losses.append(running / n)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if state_path is not None and time.perf_counter() - last_save >= save_every:
            save_state(epoch + 1)
            last_save, saved_epoch = time.perf_counter(), epoch + 1
    if state_path is not None and saved_epoch is not None and saved_epoch != cfg.epochs:
        save_state(cfg.epochs)
    model.eval()
    return losses


def _private_rng(func: Callable[..., FitResult]) -> Callable[..., FitResult]:
    """Run ``func`` with torch's global random generators forked and restored afterwards.

    ``fit`` seeds the global generator (weight initialisation draws from it) so that a seed
    gives one result; forking keeps that seeding from leaking into the caller's own random
    numbers, a process-wide side effect. CUDA generators are forked when CUDA is in use.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> FitResult:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            return func(*args, **kwargs)

    return wrapper


@_private_rng
def fit(
    data: str | os.PathLike | AnomalyDataset | Sequence[Sample],
    out_dir: str | os.PathLike,
    config: Config | str | os.PathLike | None = None,
    *,
    val_data: str | os.PathLike | AnomalyDataset | Sequence[Sample] | None = None,
    quiet: bool = False,
    resume: bool = False,
    **overrides: Any,
) -> FitResult:
    """Train ST-MAE on good images and write a run folder.

    Args:
        data: an MVTec-style category folder (its ``train/good`` is used), a folder of good
            images, an :class:`AnomalyDataset`, or a list of :class:`Sample`.
        out_dir: the run folder to write, replaced as a whole and atomically (other files in it
            are kept; see :func:`stmae.checkpoint.save_run`).
        config: a :class:`Config`, a preset name (``default``, ``accurate``, ``fast``, ``demo``,
            ``lowres``), a YAML file, or None for the defaults (= ``default``).
        val_data: good images to calibrate the threshold on (same forms as ``data``). Default:
            hold out ``fit.held_out`` of ``data``. Give them when training images are
            near-duplicates of each other (overlapping crops, video frames): held-out
            near-duplicates score too low and make the threshold too strict.
        quiet: no progress bars.
        resume: continue the training saved in ``out_dir`` by an earlier, stopped fit
            with the same settings and images (``stmae.resume``); without a saved state
            the fit starts from the beginning. A saved state from other settings or images
            raises :class:`~stmae.checkpoint.CheckpointError`. Long fits save their state
            every few minutes whether or not ``resume`` is given.
        **overrides: settings by name, e.g. ``epochs=50`` or ``features.image_size=128``
            (use ``__`` for the dot in Python keywords: ``features__image_size=128``).
    """
    cfg = make_config(config, {k.replace("__", "."): v for k, v in overrides.items()})
    samples, source = training_samples(data)
    if val_data is None:
        train_idx, val_idx = holdout_split(len(samples), cfg.fit.held_out, cfg.train.seed)
        threshold_source = "max score of held-out good images"
    else:
        val_samples, val_source = training_samples(val_data, minimum=1)
        train_idx = np.arange(len(samples))
        val_idx = np.arange(len(samples), len(samples) + len(val_samples))
        samples = samples + val_samples
        threshold_source = f"max score of the validation images in {val_source}"
    if not len(val_idx):
        threshold_source = "max score of training images (no held-out images)"
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    started = time.perf_counter()

    extractor = build_extractor(cfg).to(device)
    geometry = Geometry.from_features(cfg.features)
    cached = extract_sample_features(
        extractor, samples, geometry, batch_size=cfg.infer.batch_size, device=device, quiet=quiet
    )
    train_part = cached.select(train_idx)
    train_feats = train_part.feats
    stats = FeatureStats.from_features(train_feats)
    model = build_model(cfg, extractor.out_channels)
    state_path = Path(out_dir) / STATE_FILE
    state_id = fingerprint(cfg.to_dict(), [str(samples[i].path or samples[i].name) for i in train_idx])
    start = starting_state(state_path, state_id, resume)
    train_started = time.perf_counter()
    losses = train_model(
        model, stats.apply(train_feats), cfg.train, device, quiet=quiet,
        state_path=state_path, state_fingerprint=state_id, start=start,
    )
    # A resumed fit reports the training time of all its sessions, not only the last one.
    train_seconds = time.perf_counter() - train_started + (start.train_seconds if start else 0.0)

    scoring_started = time.perf_counter()
    pipe = MapPipeline(extractor, model, stats, cfg, check=False)
    held_part = cached.select(val_idx) if len(val_idx) else None
    tiled = geometry.tiled
    scoring = fit_scoring(
        pipe, train_feats, None if held_part is None else held_part.feats,
        train_layouts=train_part.layouts if tiled else None,
        held_out_layouts=held_part.layouts if tiled and held_part is not None else None, quiet=quiet,
    )
    scoring_seconds = round(time.perf_counter() - scoring_started, 3)
    calibration, memory = scoring.calibration, pipe.memory
    meta = _meta(cfg, extractor, source, samples, train_idx, val_idx, losses, device)
    meta["geometry"] = geometry.to_dict()
    if tiled:
        meta["n_train_tiles"] = int(len(train_feats))
        meta["input"] = (
            f"RGB, {'scaled so the shorter side is image_size' if geometry.mode == 'aspect' else f'scaled by {geometry.scale}'}"
            f", cut into {geometry.tile_side} px tiles (overlap >= {geometry.overlap}) resized to image_size, "
            "scaled to [0, 1] then backbone normalisation"
        )
    meta["calibration"] = calibration.to_dict()
    meta["calibration_scores"] = _score_summary(scoring.calibration_scores)
    meta["threshold_source"] = threshold_source.replace("max score", f"{cfg.fit.threshold_rule} rule over the scores", 1)
    meta["train_seconds"] = round(train_seconds, 3)
    if memory is not None:
        banked = scoring.held_out_images_banked
        meta["memory"] = {
            "bank_patches": int(memory.bank.shape[0]),
            # the patches the bank was chosen from (with fit.bank_held_out, the held-out images' too)
            "train_patches": int(
                (len(train_feats) + (len(held_part.feats) if banked and held_part is not None else 0))
                * train_feats.shape[2] * train_feats.shape[3]
            ),
            "held_out_images_banked": banked,
            "bank_patches_at_calibration": scoring.bank_patches_at_calibration,
            "residual_median": memory.residual_median,
            "distance_median": memory.distance_median,
            "pixel_residual_median": memory.pixel_residual_median,  # None: one map
            "seconds": scoring_seconds,  # statistics, bank, calibration and banking together
        }
    if start is not None:
        meta["resumed_at_epoch"] = start.epoch
    meta["fit_seconds"] = round(time.perf_counter() - started + (start.train_seconds if start else 0.0), 3)
    # The state is not carried into the new run folder: complete, it has nothing left to resume.
    run = save_run(out_dir, pipe, meta, drop=(STATE_FILE,))
    state_path.unlink(missing_ok=True)
    detector = Detector(pipe.extractor, pipe.model, pipe.feature_stats, cfg, meta=meta, device=device,
                        residual_stats=pipe.residual_stats, memory=pipe.memory, calibration=calibration)
    return FitResult(run_dir=run, detector=detector, meta=meta, losses=losses)


def _score_summary(scores: np.ndarray) -> dict[str, Any]:
    """The held-out good images' scores the calibration rests on (meta.json ``calibration_scores``)."""
    values = [float(v) for v in scores]
    return {"min": min(values), "mean": float(np.mean(values)), "max": max(values), "all": values}


def _meta(
    cfg: Config,
    extractor: Any,
    source: str,
    samples: Sequence[Sample],
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    losses: list[float],
    device: torch.device,
) -> dict[str, Any]:
    backbone = extractor.backbone
    return {
        "stmae_version": __version__,
        "code_revision": code_revision(),  # which code made the run (stmae.provenance)
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": {
            "name": backbone.info.name,
            "layers": list(backbone.layers),
            "channels": [backbone.channels[name] for name in backbone.layers],
            "strides": [backbone.strides[name] for name in backbone.layers],
            "weights_source": backbone.weights_source,
            "input_mean": list(backbone.info.mean),
            "input_std": list(backbone.info.std),
        },
        "image_size": cfg.features.image_size,
        "grid_size": cfg.features.grid_size,
        "feature_channels": extractor.out_channels,
        "input": "RGB, resized to image_size x image_size (bilinear), scaled to [0, 1] then backbone normalisation",
        "seed": cfg.train.seed,
        "data": source,
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "val_images": [samples[i].name or str(samples[i].path) for i in val_idx],
        "epochs": cfg.train.epochs,
        "final_loss": losses[-1],
        "losses": losses,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
