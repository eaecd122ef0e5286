"""Datasets (a closed registry: name -> builder) and the seeded batch schedule.

A builder takes the run's seed and its config options (keyword-only) and returns a
`Dataset` of tensors: the deterministic train/test split, with features standardised by
statistics of the training split only. The batch schedule is a pure function of
(seed, epoch) and never of the data weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from magic_cli.contracts import DatasetBuilder  # noqa: F401  (the type of the registry's entries)
from magic_cli.data.cifar import cifar10
from magic_cli.data.files import arrays, image_folder, table, text_file, token_ids
from magic_cli.data.tabular import breast_cancer, digits, wine
from magic_cli.data.text import text_chars
from magic_cli.errors import ConfigError


@dataclass
class Dataset:
    """Tensors of one dataset. x_*: (N, *input_shape) float features or images, or (N, L) long
    token ids; y_*: (N,) long class ids, or (N, L) next-token ids."""

    name: str
    x_train: "object"
    y_train: "object"
    x_test: "object"
    y_test: "object"
    n_classes: int
    # Optional pure augmentation: (x_batch, example_ids, seed, step) -> x_batch.
    augment: Callable | None = None

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


DATASETS: dict[str, "DatasetBuilder"] = {
    "digits": digits,
    "breast_cancer": breast_cancer,
    "wine": wine,
    "cifar10": cifar10,
    "text_chars": text_chars,
    "arrays": arrays,
    "table": table,
    "image_folder": image_folder,
    "token_ids": token_ids,
    "text_file": text_file,
}



def load_dataset(options: dict, seed: int, dtype) -> Dataset:
    """Build the dataset named by options['name'] and cast its features to `dtype`."""
    opts = {k: v for k, v in options.items() if k != "name"}
    ds = DATASETS[options["name"]](seed, **opts)
    if ds.x_train.is_floating_point():
        ds.x_train, ds.x_test = ds.x_train.to(dtype), ds.x_test.to(dtype)
    return ds


def batch_schedule(n_train: int, batch_size: int, epochs: int, seed: int):
    """Example ids of every training step: LongTensor (T, B), T = epochs * (n_train // B).

    Epoch e visits a permutation drawn from derive_seed(seed, "order", e); the last partial
    batch of each epoch is dropped so that every step has exactly the nominal batch size.
    """
    import torch

    from magic_cli.determinism import generator

    per_epoch = n_train // batch_size
    if per_epoch == 0:
        raise ConfigError(f"train.batch_size={batch_size} is larger than the training split ({n_train})")
    steps = []
    for epoch in range(epochs):
        perm = torch.randperm(n_train, generator=generator(seed, "order", epoch))
        steps.append(perm[: per_epoch * batch_size].view(per_epoch, batch_size))
    return torch.cat(steps)
