"""Multi-layer perceptron and logistic regression on flattened inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from magic_cli.errors import ConfigError
from magic_cli.models.layers import activation, linear, linear_init
from magic_cli.models.layers import activation as check_activation


@dataclass(frozen=True)
class MLP:
    """Linear layers fc0..fcL with an activation between them; no buffers."""

    sizes: tuple  # (in_features, *hidden, n_classes)
    act: str

    def init(self, gen):
        params = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            linear_init(params, f"fc{i}", fan_in, fan_out, gen)
        return params, {}

    def apply(self, params, buffers, x, train: bool, taps=None):
        act = activation(self.act)
        h = x.flatten(1)  # (B, in_features)
        n_layers = len(self.sizes) - 1
        for i in range(n_layers):
            h = linear(h, params, f"fc{i}", taps)
            if i < n_layers - 1:
                h = act(h)
        return h, buffers  # (B, n_classes)


def mlp(input_shape: tuple, n_classes: int, *, hidden: list = (128,), activation: str = "gelu"):
    """MLP with hidden widths `hidden` and a smooth `activation` by default."""

    check_activation(activation)
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and h >= 1 for h in hidden):
        raise ConfigError(f"model.hidden must be a list of positive widths, e.g. [128], got {hidden!r}")
    return MLP(sizes=(math.prod(input_shape), *map(int, hidden), n_classes), act=activation)


def logreg(input_shape: tuple, n_classes: int):
    """Multinomial logistic regression: a single linear layer."""
    return MLP(sizes=(math.prod(input_shape), n_classes), act="gelu")
