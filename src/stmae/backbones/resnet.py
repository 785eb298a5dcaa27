"""ResNet18 / ResNet50 / Wide-ResNet50-2 with torchvision's exact module layout.

Module names (``conv1``, ``layer1.0.downsample.0`` ...) match torchvision so the
official checkpoints load with ``strict=True``. Bottlenecks stride on the 3x3
conv ("ResNet v1.5"), like torchvision, because that is how those weights were
trained. Wide-ResNet50-2 is ResNet50 with twice the bottleneck width; its
outputs, and so the layer table, are the same as ResNet50's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["BASIC_LAYERS", "BOTTLENECK_LAYERS", "ResNet", "resnet18", "resnet50", "wide_resnet50_2"]

_STAGES = ("layer1", "layer2", "layer3", "layer4")

# name -> (channels, stride); layer1 follows the stride-4 stem.
BASIC_LAYERS: dict[str, tuple[int, int]] = {
    "layer1": (64, 4),
    "layer2": (128, 8),
    "layer3": (256, 16),
    "layer4": (512, 32),
}
BOTTLENECK_LAYERS: dict[str, tuple[int, int]] = {
    "layer1": (256, 4),
    "layer2": (512, 8),
    "layer3": (1024, 16),
    "layer4": (2048, 32),
}


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """1x1 projection for the shortcut when the block changes shape, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs: (N, C_in, H, W) -> (N, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand: (N, C_in, H, W) -> (N, 4*planes, H/stride, W/stride)."""

    expansion = 4
    width_factor = 1  # inner 3x3 width relative to ``planes``

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        width = planes * self.width_factor
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class WideBottleneck(Bottleneck):
    """Bottleneck with a 2x wider 3x3 conv (torchvision's ``width_per_group=128``); same output channels."""

    width_factor = 2


class ResNet(nn.Module):
    """torchvision-compatible ResNet.

    ``forward``: normalised images (N, 3, H, W) -> ImageNet logits (N, 1000);
    ``taps`` lazily yields ``layer1``..``layer4`` (N, C, H/stride, W/stride).
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], depths: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (name, depth) in enumerate(zip(_STAGES, depths, strict=True)):
            planes = 64 * 2**index
            blocks = [block(in_channels, planes, stride=1 if index == 0 else 2)]  # layer1 follows the max-pool
            in_channels = planes * block.expansion
            blocks += [block(in_channels, planes, stride=1) for _ in range(depth - 1)]
            self.add_module(name, nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, 1000)

    def taps(self, x: Tensor) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, feature)`` after each stage; nothing past the last consumed tap runs."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in _STAGES:
            x = self.get_submodule(name)(x)
            yield name, x

    def forward(self, x: Tensor) -> Tensor:
        """Normalised images (N, 3, H, W) -> logits (N, 1000)."""
        for _, features in self.taps(x):
            pass  # run every stage: ``features`` ends as layer4's output
        return self.fc(torch.flatten(self.avgpool(features), 1))


def resnet18() -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet50() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3))


def wide_resnet50_2() -> ResNet:
    return ResNet(WideBottleneck, (3, 4, 6, 3))
