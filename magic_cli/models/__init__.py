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

from magic_cli.contracts import Model, ModelBuilder
from magic_cli.errors import ConfigError
from magic_cli.models.cnn import cnn_small, resnet9
from magic_cli.models.hf import hf_causal_lm
from magic_cli.models.mlp import logreg, mlp
from magic_cli.models.transformer import transformer

MODELS: dict[str, ModelBuilder] = {
    "mlp": mlp,
    "logreg": logreg,
    "cnn_small": cnn_small,
    "resnet9": resnet9,
    "transformer": transformer,
    "hf_causal_lm": hf_causal_lm,
}


# What each model takes: feature vectors (N, F), images (N, C, H, W; the MLPs flatten them) or
# token ids (N, L).
MODEL_INPUTS = {"mlp": ("features", "images"), "logreg": ("features", "images"), "cnn_small": ("images",),
                "resnet9": ("images",), "transformer": ("tokens",), "hf_causal_lm": ("tokens",)}


def input_kind(x) -> str:
    """'tokens' (integer ids), 'images' (N, C, H, W) or 'features' (N, F) for a dataset's x_train."""
    if not x.is_floating_point():
        return "tokens"
    return {2: "features", 4: "images"}.get(x.dim(), f"{x.dim() - 1}-d inputs")


def build_model(options: dict, dataset):
    """The model named by options['name'] for `dataset`, refused if it cannot take its inputs."""
    name = options["name"]
    kind = input_kind(dataset.x_train)
    if kind not in MODEL_INPUTS[name]:
        suitable = ", ".join(m for m, kinds in MODEL_INPUTS.items() if kind in kinds) or "none built in"
        raise ConfigError(f"model={name} takes {' or '.join(MODEL_INPUTS[name])} but dataset={dataset.name} gives "
                          f"{kind}; choose a model for {kind} ({suitable})")
    opts = {k: v for k, v in options.items() if k != "name"}
    model = MODELS[name](dataset.input_shape, dataset.n_classes, **opts)
    if not isinstance(model, Model):
        import inspect

        try:
            where = f" in {inspect.getsourcefile(MODELS[name])}"
        except TypeError:
            where = ""
        raise ConfigError(f"model={name} ({getattr(MODELS[name], '__name__', 'builder')}{where}) returned "
                          f"{type(model).__name__}, which has no init/apply; a model builder must return a "
                          "magic_cli.contracts.Model")
    return model
