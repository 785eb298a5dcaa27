"""VGG19 (no batch norm) with torchvision's exact module layout.

Keeping torchvision's ``features.N`` / ``classifier.N`` indices means the
official ``vgg19-dcbb9e9d.pth`` checkpoint loads unchanged. VGG's ReLU outputs
are the classic perceptual/anomaly-detection features; they are named
``reluB_C`` (block B, conv C) after the usual Caffe naming.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["VGG19", "VGG19_LAYERS"]

# Convolution widths per block; a 2x2 max-pool closes every block.
_BLOCKS = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))

# name -> (channels, stride) and the ``features`` index of that ReLU.
VGG19_LAYERS: dict[str, tuple[int, int]] = {
    "relu1_2": (64, 1),
    "relu2_2": (128, 2),
    "relu3_4": (256, 4),
    "relu4_4": (512, 8),
    "relu5_4": (512, 16),
}
_TAP_INDEX = {3: "relu1_2", 8: "relu2_2", 17: "relu3_4", 26: "relu4_4", 35: "relu5_4"}


def _features() -> nn.Sequential:
    """conv3x3+ReLU stacks with max-pools, indexed exactly like torchvision's ``vgg19().features``."""
    layers: list[nn.Module] = []
    in_channels = 3
    for widths in _BLOCKS:
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            in_channels = width
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class VGG19(nn.Module):
    """torchvision-compatible VGG19.

    ``forward``: normalised images (N, 3, H, W) -> ImageNet logits (N, 1000);
    ``taps`` lazily yields the named ReLU outputs (N, C, H/stride, W/stride).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _features()
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        # The Dropouts are inert (the backbone is always in eval mode) but keep
        # torchvision's classifier.0/3/6 indices for the checkpoint keys.
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 1000),
        )

    def taps(self, x: Tensor) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, feature)`` in network order; nothing past the last consumed tap runs."""
        for index, module in enumerate(self.features):
            x = module(x)
            if index in _TAP_INDEX:
                yield _TAP_INDEX[index], x

    def forward(self, x: Tensor) -> Tensor:
        """Normalised images (N, 3, H, W) -> logits (N, 1000)."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
