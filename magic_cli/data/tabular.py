"""Real tabular datasets that ship inside scikit-learn (no download): digits, breast cancer, wine."""

from __future__ import annotations

from magic_cli.contracts import Dataset
from magic_cli.data.augment import flip_translate
from magic_cli.determinism import derive_seed
from magic_cli.errors import ConfigError


def _split_standardise(name: str, x, y, seed: int, test_fraction: float, columns=None):
    import numpy as np
    import torch
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction must be in (0, 1), got {test_fraction}")
    n = len(y)
    perm = np.random.default_rng(derive_seed(seed, "split")).permutation(n)
    n_test = int(round(n * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0  # constant pixels (digits' borders) stay at 0
    raw = x
    x = (x - mean) / std
    as_x = lambda idx: torch.from_numpy(np.ascontiguousarray(x[idx], dtype=np.float64))  # noqa: E731
    as_y = lambda idx: torch.from_numpy(np.ascontiguousarray(y[idx], dtype=np.int64))  # noqa: E731
    return Dataset(name=name, x_train=as_x(train), y_train=as_y(train), x_test=as_x(test),
                   y_test=as_y(test), n_classes=int(y.max()) + 1, raw=(raw[train], raw[test]),
                   columns=tuple(columns) if columns is not None else None)


def digits(seed: int, *, test_fraction: float = 0.2, images: bool = False, flip: bool = False, translate: int = 0):
    """1797 handwritten digits, 8x8 pixels as 64 features, or as (1, 8, 8) images with optional
    augmentation (flip, translate by up to `translate` pixels) for the CNNs."""
    from sklearn.datasets import load_digits
    d = load_digits()
    ds = _split_standardise("digits", d.data.astype("float64"), d.target, seed, test_fraction)
    if images:
        ds.x_train, ds.x_test = ds.x_train.view(-1, 1, 8, 8), ds.x_test.view(-1, 1, 8, 8)
        ds.augment = flip_translate(flip, translate)
    elif flip or translate:
        raise ConfigError("dataset.flip / dataset.translate need dataset.images=true")
    return ds


def breast_cancer(seed: int, *, test_fraction: float = 0.2):
    """569 tumours, 30 features, 2 classes."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return _split_standardise("breast_cancer", d.data.astype("float64"), d.target, seed, test_fraction,
                              d.feature_names)


def wine(seed: int, *, test_fraction: float = 0.2):
    """178 wines, 13 features, 3 classes."""
    from sklearn.datasets import load_wine

    d = load_wine()
    return _split_standardise("wine", d.data.astype("float64"), d.target, seed, test_fraction, d.feature_names)
