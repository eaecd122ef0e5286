"""A small causal transformer for character-level language modelling, in plain tensor math
(no fused attention kernels: the reverse pass needs their double backward)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from magic_cli.errors import ConfigError
from magic_cli.models.layers import activation, linear, linear_init, uniform_
from magic_cli.models.layers import activation as check


def layer_norm(x, params, name, eps=1e-5):
    import torch.nn.functional as F

    return F.layer_norm(x, x.shape[-1:], params[f"{name}.weight"], params[f"{name}.bias"], eps)


@dataclass(frozen=True)
class Transformer:
    """Pre-LayerNorm decoder: embeddings -> n_layers x (causal attention, MLP) -> LN -> head."""

    vocab: int
    context: int
    dim: int
    n_layers: int
    n_heads: int
    act: str

    def init(self, gen):
        import torch

        params = {"tok.weight": uniform_((self.vocab, self.dim), 1.0, gen) * 0.1,
                  "pos.weight": uniform_((self.context, self.dim), 1.0, gen) * 0.1}
        for i in range(self.n_layers):
            for ln in ("ln1", "ln2"):
                params[f"h{i}.{ln}.weight"] = torch.ones(self.dim, dtype=torch.float64)
                params[f"h{i}.{ln}.bias"] = torch.zeros(self.dim, dtype=torch.float64)
            linear_init(params, f"h{i}.qkv", self.dim, 3 * self.dim, gen)
            linear_init(params, f"h{i}.proj", self.dim, self.dim, gen, scale=1 / math.sqrt(2 * self.n_layers))
            linear_init(params, f"h{i}.fc", self.dim, 4 * self.dim, gen)
            linear_init(params, f"h{i}.out", 4 * self.dim, self.dim, gen, scale=1 / math.sqrt(2 * self.n_layers))
        params["lnf.weight"] = torch.ones(self.dim, dtype=torch.float64)
        params["lnf.bias"] = torch.zeros(self.dim, dtype=torch.float64)
        linear_init(params, "head", self.dim, self.vocab, gen)
        return params, {}

    def apply(self, params, buffers, x, train: bool, taps=None):
        import torch

        B, L = x.shape  # x: (B, L) token ids
        act = activation(self.act)
        h = params["tok.weight"][x] + params["pos.weight"][:L]  # (B, L, d)
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        hd = self.dim // self.n_heads
        for i in range(self.n_layers):
            a = layer_norm(h, params, f"h{i}.ln1")
            q, k, v = linear(a, params, f"h{i}.qkv", taps).split(self.dim, dim=-1)
            q, k, v = (t.view(B, L, self.n_heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hd)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, nh, L, L)
            att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
            y = (att @ v).transpose(1, 2).reshape(B, L, self.dim)
            h = h + linear(y, params, f"h{i}.proj", taps)
            m = layer_norm(h, params, f"h{i}.ln2")
            h = h + linear(act(linear(m, params, f"h{i}.fc", taps)), params, f"h{i}.out", taps)
        return linear(layer_norm(h, params, "lnf"), params, "head", taps), buffers  # (B, L, vocab)


def transformer(input_shape: tuple, n_classes: int, *, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                activation: str = "gelu"):
    """A causal transformer over token ids (B, L) with a vocabulary of n_classes."""
    if len(input_shape) != 1:
        raise ConfigError(f"model=transformer needs token sequences (L,), got shape {input_shape}")
    for key, value in (("dim", dim), ("n_layers", n_layers), ("n_heads", n_heads)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
    if dim % n_heads:
        raise ConfigError(f"model.dim={dim} must be a multiple of model.n_heads={n_heads}")

    check(activation)
    return Transformer(n_classes, input_shape[0], int(dim), int(n_layers), int(n_heads), activation)
