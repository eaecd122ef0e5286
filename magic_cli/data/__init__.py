"""Datasets (a closed registry: name -> builder) and the seeded batch schedule.

A builder takes the run's seed and its config options (keyword-only) and returns a
`Dataset` of tensors: the deterministic train/test split, with features standardised by
statistics of the training split only. The batch schedule is a pure function of
(seed, epoch) and never of the data weights.
"""

from __future__ import annotations

from magic_cli.contracts import IGNORE, Dataset, DatasetBuilder
from magic_cli.data.cifar import cifar10
from magic_cli.data.files import arrays, image_folder, table, text_file, token_ids
from magic_cli.data.tabular import breast_cancer, digits, wine
from magic_cli.data.text import text_chars
from magic_cli.determinism import generator
from magic_cli.errors import ConfigError

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
    """Build the dataset named by options['name'], check what its builder returned, and cast its
    features to `dtype`."""
    opts = {k: v for k, v in options.items() if k != "name"}
    builder = DATASETS[options["name"]]
    ds = builder(seed, **opts)
    check_dataset(ds, options["name"], builder)
    if ds.x_train.is_floating_point():
        ds.x_train, ds.x_test = ds.x_train.to(dtype), ds.x_test.to(dtype)
    return ds


def _factory_name(name: str, builder) -> str:
    """'dataset=NAME (FUNCTION in FILE)': where a builder's result came from, for messages."""
    import inspect

    try:
        where = f" in {inspect.getsourcefile(builder)}"
    except TypeError:
        where = ""
    return f"dataset={name} ({getattr(builder, '__name__', 'builder')}{where})"


def check_dataset(ds, name: str, builder) -> None:
    """A dataset builder's result at the boundary: a Dataset of four tensors whose shapes, dtypes
    and labels agree; one line naming the dataset and its factory otherwise."""
    import torch

    who = _factory_name(name, builder)
    if not isinstance(ds, Dataset):
        raise ConfigError(f"{who} returned {type(ds).__name__}; a dataset builder must return "
                          "magic_cli.data.Dataset(name, x_train, y_train, x_test, y_test, n_classes)")
    for key in ("x_train", "y_train", "x_test", "y_test"):
        if not isinstance(getattr(ds, key), torch.Tensor):
            raise ConfigError(f"{who}: Dataset.{key} is {type(getattr(ds, key)).__name__}, not a torch.Tensor")
    if not isinstance(ds.n_classes, int) or isinstance(ds.n_classes, bool) or ds.n_classes < 1:
        raise ConfigError(f"{who}: Dataset.n_classes must be an integer >= 1, got {ds.n_classes!r}")
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        if x.dim() < 2 or x.shape[0] < 1 or y.shape[:1] != x.shape[:1]:
            raise ConfigError(f"{who}: x_{split} {tuple(x.shape)} and y_{split} {tuple(y.shape)} must hold the same "
                              "number (>= 1) of examples, x as (N, ...)")
        if y.dtype != torch.long:
            raise ConfigError(f"{who}: y_{split} must be class ids of dtype torch.long, got {y.dtype}")
        if not (x.is_floating_point() or x.dtype == torch.long):
            raise ConfigError(f"{who}: x_{split} must be floating point (features, images) or torch.long (token "
                              f"ids), got {x.dtype}")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ConfigError(f"{who}: x_{split} holds NaN or Inf")
        labels = y[y != IGNORE] if y.dim() > 1 else y  # sequences: IGNORE marks an unsupervised token
        if labels.numel() and (labels.min() < 0 or labels.max() >= ds.n_classes):
            raise ConfigError(f"{who}: y_{split} holds labels outside 0..{ds.n_classes - 1} (n_classes)")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:] or ds.x_train.dtype != ds.x_test.dtype:
        raise ConfigError(f"{who}: x_train {tuple(ds.x_train.shape[1:])} {ds.x_train.dtype} and x_test "
                          f"{tuple(ds.x_test.shape[1:])} {ds.x_test.dtype} differ in example shape or dtype")
    if ds.show is not None and not callable(ds.show):
        raise ConfigError(f"{who}: Dataset.show must be a function x -> image or str, got {type(ds.show).__name__}")


def batch_schedule(n_train: int, batch_size: int, epochs: int, seed: int):
    """Example ids of every training step: LongTensor (T, B), T = epochs * (n_train // B).

    Epoch e visits a permutation drawn from derive_seed(seed, "order", e); the last partial
    batch of each epoch is dropped so that every step has exactly the nominal batch size.
    """
    import torch
    per_epoch = n_train // batch_size
    if per_epoch == 0:
        raise ConfigError(f"train.batch_size={batch_size} is larger than the training split ({n_train})")
    steps = []
    for epoch in range(epochs):
        perm = torch.randperm(n_train, generator=generator(seed, "order", epoch))
        steps.append(perm[: per_epoch * batch_size].view(per_epoch, batch_size))
    return torch.cat(steps)
