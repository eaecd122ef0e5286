"""Convolutional networks with BatchNorm, in the smooth form metagradients need: BatchNorm
before each (smooth) activation, average pooling instead of max pooling, a scaled-down
final layer. BatchNorm running statistics are buffers of the training state."""

from __future__ import annotations

from dataclasses import dataclass

from magic_cli.errors import ConfigError
from magic_cli.models.layers import (
    activation,
    batch_norm,
    batch_norm_init,
    conv2d,
    conv_init,
    linear,
    linear_init,
    pool_all,
)


def _conv_bn_act(x, params, buffers, new_buffers, name, train, act, pool: bool = False, taps=None):
    import torch.nn.functional as F

    x = conv2d(x, params, f"{name}.conv", taps)
    if pool:
        x = F.avg_pool2d(x, 2)
    x = batch_norm(x, params, buffers, new_buffers, f"{name}.bn", train)
    return act(x)


def _init_block(params, buffers, name, c_in, c_out, gen):
    conv_init(params, f"{name}.conv", c_in, c_out, 3, gen)
    batch_norm_init(params, buffers, f"{name}.bn", c_out)


@dataclass(frozen=True)
class SmallCNN:
    """conv-BN-act, then `depth - 1` x (conv, 2x2 avg pool, BN, act), global pool, linear."""

    in_channels: int
    n_classes: int
    channels: tuple  # widths of the conv blocks
    act: str
    pool: str
    head_scale: float

    def init(self, gen):
        params, buffers = {}, {}
        c_in = self.in_channels
        for i, c in enumerate(self.channels):
            _init_block(params, buffers, f"block{i}", c_in, c, gen)
            c_in = c
        linear_init(params, "head", c_in, self.n_classes, gen, scale=self.head_scale)
        return params, buffers

    def apply(self, params, buffers, x, train: bool, taps=None):
        act, new_buffers = activation(self.act), {}
        for i in range(len(self.channels)):  # x: (B, C, H, W), halved by each pooled block
            x = _conv_bn_act(x, params, buffers, new_buffers, f"block{i}", train, act, pool=i > 0, taps=taps)
        return linear(pool_all(x, self.pool), params, "head", taps), new_buffers  # (B, n_classes)


@dataclass(frozen=True)
class ResNet9:
    """The fast CIFAR ResNet-9 (Page 2018 / airbench shape) with a width multiplier:

        prep conv(64w) -> layer1 conv(128w)+pool + residual(2 convs) -> layer2 conv(256w)+pool
        -> layer3 conv(512w)+pool + residual(2 convs) -> global pool -> linear * head_scale
    """

    in_channels: int
    n_classes: int
    width: float
    act: str
    pool: str
    head_scale: float

    def _widths(self):
        return [max(1, int(round(c * self.width))) for c in (64, 128, 256, 512)]

    def init(self, gen):
        c0, c1, c2, c3 = self._widths()
        params, buffers = {}, {}
        for name, c_in, c_out in [("prep", self.in_channels, c0), ("layer1", c0, c1), ("res1a", c1, c1),
                                  ("res1b", c1, c1), ("layer2", c1, c2), ("layer3", c2, c3), ("res3a", c3, c3),
                                  ("res3b", c3, c3)]:
            _init_block(params, buffers, name, c_in, c_out, gen)
        linear_init(params, "head", c3, self.n_classes, gen, scale=self.head_scale)
        return params, buffers

    def apply(self, params, buffers, x, train: bool, taps=None):
        act, nb = activation(self.act), {}
        block = lambda h, name, pool=False: _conv_bn_act(h, params, buffers, nb, name, train, act, pool, taps)  # noqa: E731
        x = block(x, "prep")
        x = block(x, "layer1", pool=True)
        x = x + block(block(x, "res1a"), "res1b")
        x = block(x, "layer2", pool=True)
        x = block(x, "layer3", pool=True)
        x = x + block(block(x, "res3a"), "res3b")
        return linear(pool_all(x, self.pool), params, "head", taps), nb


def _check(act: str, pool: str, **positive):
    activation(act)
    for key, value in positive.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        ok = all(isinstance(v, (int, float)) and v > 0 for v in values)
        if not ok or (isinstance(value, (list, tuple)) and not value):
            raise ConfigError(f"model.{key} must be positive (a list of widths for channels), got {value!r}")
    if pool not in ("avg", "lse", "max"):
        raise ConfigError(f"model.pool={pool!r} is not valid; choose one of: avg, lse, max")


def cnn_small(input_shape: tuple, n_classes: int, *, channels: list = (16, 32), activation: str = "gelu",
              pool: str = "avg", head_scale: float = 1.0):
    """A small CNN for CPU-sized runs: len(channels) conv blocks with BatchNorm."""
    if len(input_shape) != 3:
        raise ConfigError(f"model=cnn_small needs image inputs (C, H, W), got shape {input_shape}")
    _check(activation, pool, channels=channels, head_scale=head_scale)
    return SmallCNN(input_shape[0], n_classes, tuple(int(c) for c in channels), activation, pool, float(head_scale))


def resnet9(input_shape: tuple, n_classes: int, *, width: float = 1.0, activation: str = "gelu", pool: str = "avg",
            head_scale: float = 0.125):
    """ResNet-9 with BatchNorm before each activation; `width` multiplies the channel counts."""
    if len(input_shape) != 3:
        raise ConfigError(f"model=resnet9 needs image inputs (C, H, W), got shape {input_shape}")
    _check(activation, pool, width=width, head_scale=head_scale)
    return ResNet9(input_shape[0], n_classes, float(width), activation, pool, float(head_scale))
