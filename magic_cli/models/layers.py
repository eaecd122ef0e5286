"""Shared pieces of the pure models: initialisers, activations, linear layers with taps."""

from __future__ import annotations

import math
from typing import Callable


def uniform_(shape, bound: float, gen):
    """U(-bound, bound) in float64 from a seeded generator (torch.nn.Linear's default init)."""
    import torch

    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound


def linear_init(params: dict, name: str, fan_in: int, fan_out: int, gen, scale: float = 1.0) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    params[f"{name}.weight"] = uniform_((fan_out, fan_in), bound, gen) * scale
    params[f"{name}.bias"] = uniform_((fan_out,), bound, gen) * scale


def activation(name: str) -> Callable:
    import torch.nn.functional as F

    table = {"gelu": F.gelu, "relu": F.relu, "tanh": F.tanh, "softplus": F.softplus, "silu": F.silu}
    if name not in table:
        raise ValueError(f"model.activation={name!r} is not valid; choose one of: {', '.join(table)}")
    return table[name]



def linear(h, params: dict, name: str, taps=None):
    """F.linear with the parameters `name.weight`, `name.bias`. With `taps` (a Taps), records the
    layer's input and adds a zero offset to its output whose gradient is the pre-activation
    gradient: the two factors K-FAC needs (baselines.py)."""
    import torch.nn.functional as F

    out = F.linear(h, params[f"{name}.weight"], params.get(f"{name}.bias"))
    if taps is not None:
        out = taps.tap(name, h, out)
    return out


class Taps:
    """Records each linear layer's input and offsets its output by a given zero tensor."""

    def __init__(self, offsets: dict | None = None):
        self.inputs: dict = {}
        self.offsets = offsets or {}

    def tap(self, name: str, h, out):
        self.inputs[name] = h
        return out + self.offsets[name] if name in self.offsets else out
