"""The contracts between magic and the pieces it trains: models, datasets, output functions.

Built-ins and plugins (plugins.py) meet the same types. A model is two pure functions over
explicit tensor dicts, so a training step mutates nothing and can be differentiated with
respect to its whole state:

    init(generator)                          -> (params, buffers)      float64, CPU
    apply(params, buffers, x, train, taps)   -> (outputs, new_buffers)

`outputs` are logits (B, n_classes) or (B, L, n_classes) for sequences; `new_buffers` (e.g.
BatchNorm running statistics) are updated in train mode and unchanged in eval mode. `taps`
(models/layers.Taps) exposes linear layers' inputs and output gradients for EK-FAC; models
without linear-layer taps may refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:  # the contracts are read by config validation, which must not import torch
    from torch import Generator, Tensor

TensorDict = dict  # str -> Tensor
IGNORE = -100  # a target that is not supervised (padding, prompt tokens): Hugging Face's label convention


@dataclass
class Dataset:
    """Tensors of one dataset. x_*: (N, *input_shape) float features or images, or (N, L) long
    token ids; y_*: (N,) long class ids, or (N, L) next-token ids."""

    name: str
    x_train: "Tensor"
    y_train: "Tensor"
    x_test: "Tensor"
    y_test: "Tensor"
    n_classes: int
    # Optional pure augmentation: (x_batch, example_ids, seed, step) -> x_batch.
    augment: Callable | None = None
    # Optional, for showing examples (magic explain): the inputs as a person reads them, numpy
    # (x_train, x_test) before standardising, and the feature columns' names.
    raw: tuple | None = None
    columns: tuple | None = None
    # Optional, a plugin's own picture of one example (magic explain): show(x) -> an image, numpy
    # (H, W) or (H, W, 3) with values in [0, 1], or a str; x is one row of raw (else of x_*) as numpy.
    show: Callable | None = None

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


@runtime_checkable
class Model(Protocol):
    def init(self, gen: "Generator") -> tuple[TensorDict, TensorDict]: ...

    def apply(self, params: TensorDict, buffers: TensorDict, x: "Tensor", train: bool,
              taps: Any = None) -> tuple["Tensor", TensorDict]: ...


class ModelBuilder(Protocol):
    """Registry entry: (input_shape, n_classes, *, options from model.*) -> Model."""

    def __call__(self, input_shape: tuple, n_classes: int, **options: Any) -> Model: ...


class DatasetBuilder(Protocol):
    """Registry entry: (seed, *, options from dataset.*) -> Dataset (train/test tensors, seeded split)."""

    def __call__(self, seed: int, **options: Any) -> "Dataset": ...


class OutputFunction(Protocol):
    """Per-example loss or measured output: (logits (B, ...), targets (B, ...)) -> (B,)."""

    def __call__(self, logits: "Tensor", y: "Tensor") -> "Tensor": ...
