"""Small nn.Module plugins: one good MLP, and factories that go wrong in the ways a user's can."""

import torch
from torch import nn

from magic_cli.plugins import register_module


@register_module("returns_a_tensor")
def returns_a_tensor(input_shape, n_classes):
    return torch.zeros(3)


class WrongOutput(nn.Module):
    def __init__(self, n_in):
        super().__init__()
        self.fc = nn.Linear(n_in, 5)

    def forward(self, x):
        return self.fc(x)  # 5 outputs whatever the number of classes


@register_module("wrong_output")
def wrong_output(input_shape, n_classes):
    return WrongOutput(input_shape[0])


@register_module("with_dropout")
def with_dropout(input_shape, n_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.Dropout(0.5), nn.Linear(8, n_classes))


@register_module("mlp_module")
def mlp_module(input_shape, n_classes, *, hidden: int = 8):
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.GELU(), nn.Linear(hidden, n_classes))


@register_module("mlp_bn_module")
def mlp_bn_module(input_shape, n_classes, *, hidden: int = 8):
    """BatchNorm in a plugin: its running statistics come back as buffers (the compiled pass's case)."""
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                         nn.Linear(hidden, n_classes))
