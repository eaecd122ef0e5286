"""Models as pure functions (a closed registry: name -> builder).

A model is two functions over explicit tensor dicts, so a training step never mutates
anything and can be differentiated with respect to its whole state:

    init(generator)                        -> (params, buffers)    float64, CPU
    apply(params, buffers, x, train: bool, taps=None) -> (outputs, new_buffers)

`outputs` are logits (B, n_classes). `buffers` (e.g. BatchNorm running statistics) are
returned updated in train mode and unchanged in eval mode. A builder takes the input
shape and number of classes, and its config options as keyword-only arguments. `taps`
(layers.Taps) exposes the inputs and output gradients of linear layers for EK-FAC.
"""

from __future__ import annotations

from typing import Callable

from magic_cli.models.cnn import cnn_small, resnet9
from magic_cli.models.mlp import logreg, mlp
from magic_cli.models.transformer import transformer

MODELS: dict[str, Callable] = {
    "mlp": mlp,
    "logreg": logreg,
    "cnn_small": cnn_small,
    "resnet9": resnet9,
    "transformer": transformer,
}


def build_model(options: dict, input_shape: tuple, n_classes: int):
    opts = {k: v for k, v in options.items() if k != "name"}
    return MODELS[options["name"]](input_shape, n_classes, **opts)
