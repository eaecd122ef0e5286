"""Shared pieces of the pure models: initialisers, activations, linear layers with taps."""

from __future__ import annotations

import math
from typing import Callable

from magic_cli.errors import ConfigError


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
        raise ConfigError(f"model.activation={name!r} is not valid; choose one of: {', '.join(table)}")
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
    """For K-FAC (baselines.py): records each tapped layer's input, as (n, positions, features),
    and adds to its output a zero offset, made here, whose gradient is the gradient with respect
    to the layer's output ((n, positions, out) once reshaped by `output_grad`). A linear layer
    has one position per example, or per token (any leading dims but the batch are positions); a
    convolution one per output pixel, its input features the unfolded patch. `transposed` holds
    the layers whose weight is stored (in, out) (Hugging Face's Conv1D)."""

    def __init__(self, batch: int | None = None):
        self.batch = batch  # examples in the forward: every tapped input's first dim (None: not checked)
        self.inputs: dict = {}
        self.offsets: dict = {}
        self.transposed: set = set()

    def _check(self, name: str, h) -> None:
        if name in self.inputs:
            raise ConfigError(f"ekfac and source: layer {name} runs more than once in a forward (a shared "
                              "layer), which K-FAC taps do not cover; use another method")
        if self.batch is not None and h.shape[0] != self.batch:
            raise ConfigError(f"ekfac and source: layer {name} gets input {tuple(h.shape)} whose first dim is not "
                              f"the batch ({self.batch}); K-FAC taps need batch-first layers")

    def tap(self, name: str, h, out):
        import torch

        self._check(name, h)
        self.inputs[name] = h.reshape(h.shape[0], -1, h.shape[-1])
        self.offsets[name] = torch.zeros_like(out, requires_grad=True)
        return out + self.offsets[name]

    def tap_conv(self, name: str, x, out, kernel, padding, stride=1, dilation=1):
        import torch
        import torch.nn.functional as F

        self._check(name, x)
        self.inputs[name] = F.unfold(x, kernel, dilation=dilation, padding=padding,
                                     stride=stride).transpose(1, 2)  # (n, H'W', C k k)
        n, c, height, width = out.shape
        offset = torch.zeros(n, height * width, c, dtype=out.dtype, device=out.device, requires_grad=True)
        self.offsets[name] = offset
        return out + offset.transpose(1, 2).reshape(n, c, height, width)

    @staticmethod
    def output_grad(grad):
        """A gradient with respect to an offset as (n, positions, out)."""
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])


def conv2d(x, params: dict, name: str, taps=None, padding: int = 1):
    """F.conv2d with `name.weight` (no bias); with `taps`, its patches and output gradient are recorded."""
    import torch.nn.functional as F

    weight = params[f"{name}.weight"]
    out = F.conv2d(x, weight, padding=padding)
    return taps.tap_conv(name, x, out, weight.shape[-1], padding) if taps is not None else out


def conv_init(params: dict, name: str, c_in: int, c_out: int, k: int, gen) -> None:
    """Conv weight (c_out, c_in, k, k), U(+-1/sqrt(fan_in)) as torch.nn.Conv2d; no bias (BatchNorm follows)."""
    params[f"{name}.weight"] = uniform_((c_out, c_in, k, k), 1.0 / math.sqrt(c_in * k * k), gen)


def batch_norm_init(params: dict, buffers: dict, name: str, channels: int) -> None:
    import torch

    params[f"{name}.weight"] = torch.ones(channels, dtype=torch.float64)
    params[f"{name}.bias"] = torch.zeros(channels, dtype=torch.float64)
    buffers[f"{name}.running_mean"] = torch.zeros(channels, dtype=torch.float64)
    buffers[f"{name}.running_var"] = torch.ones(channels, dtype=torch.float64)


def batch_norm(x, params: dict, buffers: dict, new_buffers: dict, name: str, train: bool,
               momentum: float = 0.1, eps: float = 1e-5):
    """Pure BatchNorm over all dims but 1 (as torch.nn.BatchNorm1d/2d).

    Train mode normalises with the batch statistics and writes the updated running statistics
    into `new_buffers` (not detached: they are part of the differentiated training state);
    eval mode uses the running statistics.
    """
    import torch

    dims = [d for d in range(x.dim()) if d != 1]
    rm, rv = buffers[f"{name}.running_mean"], buffers[f"{name}.running_var"]
    if train:
        var, mean = torch.var_mean(x, dims, unbiased=False)
        n = x.numel() // x.shape[1]
        new_buffers[f"{name}.running_mean"] = (1 - momentum) * rm + momentum * mean
        new_buffers[f"{name}.running_var"] = (1 - momentum) * rv + momentum * var * (n / max(n - 1, 1))
    else:
        mean, var = rm, rv
        new_buffers[f"{name}.running_mean"], new_buffers[f"{name}.running_var"] = rm, rv
    return normalize(x, mean, var, params[f"{name}.weight"], params[f"{name}.bias"], eps)


def normalize(x, mean, var, weight, bias, eps: float):
    """weight * (x - mean) / sqrt(var + eps) + bias per channel (dim 1), folded into one
    per-channel scale and shift so that only one activation-sized op (and its derivatives) runs:
    the reverse pass's vmapped double backward is 1.4x faster on digits_cnn at 16 ids than with
    the four activation-sized ops of the formula written out."""
    import torch

    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


def pool_all(x, kind: str):
    """Global pooling of (B, C, H, W) -> (B, C): avg | lse (smooth max: log-mean-exp) | max."""
    import math as _math

    import torch

    if kind == "avg":
        return x.mean((2, 3))
    if kind == "lse":
        return torch.logsumexp(x.flatten(2), dim=2) - _math.log(x.shape[2] * x.shape[3])
    if kind == "max":
        return x.amax((2, 3))
    raise ConfigError(f"model.pool={kind!r} is not valid; choose one of: avg, lse, max")
