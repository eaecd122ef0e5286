"""Shared pieces of the pure models: initialisers and activations."""

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

