"""A user's own model for magic: a small ResNet-style torch.nn.Module with BatchNorm.

magic imports this file only because the experiment names it (`plugins:`); its source is part
of the training fingerprint. The module is ordinary PyTorch: magic makes it pure (BatchNorm's
running statistics become returned buffers) and initialises it under a seeded RNG.
"""

import torch
from torch import nn

from magic_cli.plugins import register_module


class Block(nn.Module):
    """conv -> BatchNorm -> GELU, twice, with an identity shortcut: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        h = nn.functional.gelu(self.bn1(self.conv1(x)))
        return nn.functional.gelu(x + self.bn2(self.conv2(h)))


class SmallResNet(nn.Module):
    """stem conv-BN-GELU (width), a residual block, 2x2 average pool, a residual block at 2x width,
    global average pool, a linear head scaled down at initialisation (smoother training)."""

    def __init__(self, in_channels: int, n_classes: int, width: int, head_scale: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.GELU())
        self.block1 = Block(width)
        self.widen = nn.Sequential(nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width))
        self.block2 = Block(2 * width)
        self.head = nn.Linear(2 * width, n_classes)
        with torch.no_grad():
            self.head.weight.mul_(head_scale)
            self.head.bias.mul_(head_scale)

    def forward(self, x):  # x: (B, C, 8, 8)
        x = self.block1(self.stem(x))
        x = self.block2(self.widen(nn.functional.avg_pool2d(x, 2)))  # (B, 2w, 4, 4)
        return self.head(x.mean((2, 3)))  # (B, n_classes)


@register_module("small_resnet")
def small_resnet(input_shape, n_classes, *, width: int = 8, head_scale: float = 0.25):
    """The factory magic calls: input_shape (C, H, W) and n_classes come from the dataset; the
    options after * are the YAML keys model.width and model.head_scale."""
    return SmallResNet(input_shape[0], n_classes, int(width), float(head_scale))
