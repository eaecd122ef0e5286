"""CIFAR-10 through torchvision (downloaded into dataset.root where the machine has a network),
as (3, 32, 32) float images normalised with training statistics, optionally a class subset
and a seeded subset of examples, with pure flip/translate augmentation."""

from __future__ import annotations

from magic_cli.contracts import Dataset
from magic_cli.data.augment import flip_translate
from magic_cli.determinism import derive_seed
from magic_cli.errors import ConfigError


def cifar10(seed: int, *, root: str = "data/cifar10", download: bool = True, classes: list = tuple(range(10)),
            n_train: int = 50000, n_test: int = 10000, flip: bool = True, translate: int = 2):
    import numpy as np
    import torch
    from torchvision.datasets import CIFAR10
    classes = [int(c) for c in classes]
    if not classes or any(not 0 <= c < 10 for c in classes) or len(set(classes)) != len(classes):
        raise ConfigError(f"dataset.classes must be distinct CIFAR-10 class ids 0..9, got {classes}")
    try:
        splits = [CIFAR10(root, train=train, download=download) for train in (True, False)]
    except (RuntimeError, OSError) as e:  # not found / corrupted, or no network for the download
        raise ConfigError(f"dataset.root={root!r}: {e} (set dataset.download=true on a machine with a network)") \
            from None
    relabel = {c: i for i, c in enumerate(classes)}
    arrays = []
    for split, n, tag in zip(splits, (n_train, n_test), ("train", "test")):
        labels = np.asarray(split.targets)
        keep = np.flatnonzero(np.isin(labels, classes))
        keep = np.random.default_rng(derive_seed(seed, "cifar", tag)).permutation(keep)[:n]
        x = split.data[keep].astype(np.float64).transpose(0, 3, 1, 2) / 255.0  # (n, 3, 32, 32)
        y = np.array([relabel[c] for c in labels[keep]], dtype=np.int64)
        arrays.append((x, y))
    (x_tr, y_tr), (x_te, y_te) = arrays
    mean = x_tr.mean(axis=(0, 2, 3), keepdims=True)
    std = x_tr.std(axis=(0, 2, 3), keepdims=True)
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray((a - mean) / std))  # noqa: E731
    return Dataset("cifar10", as_x(x_tr), torch.from_numpy(y_tr), as_x(x_te), torch.from_numpy(y_te),
                   n_classes=len(classes), augment=flip_translate(flip, translate))
