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

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is imported only where it is used
    from torch import Generator, Tensor

    from magic_cli.data import Dataset

TensorDict = dict  # str -> Tensor


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
