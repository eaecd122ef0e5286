"""Assembling a run from its config: the dataset, the model, the batch schedule (seeded epochs
or train.order_file), the optimizer and the base data weights, on the run's device and dtype.

    config -> assemble(config) -> train.Problem

This module reads the user's inputs (files named in the config) and checks them; the training
loop itself (train.py) never looks at the config's files.
"""

from __future__ import annotations

import numpy as np
import torch

from magic_cli.config import Config
from magic_cli.core.optim import build_optimizer
from magic_cli.core.problem import Problem, make_grad_fn, make_train_step
from magic_cli.data import batch_schedule, load_dataset
from magic_cli.errors import ConfigError
from magic_cli.models import build_model
from magic_cli.readers import read_npy, read_numbers


def assemble(config: Config):
    """The train.Problem of a validated config."""
    dtype = getattr(torch, config.dtype)
    device = torch.device(config.device)
    ds = load_dataset(config.dataset, config.seed, dtype)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        setattr(ds, name, getattr(ds, name).to(device))
    model = build_model(config.model, ds)
    tc = config.train
    if tc.order_file is None:
        schedule = batch_schedule(ds.n_train, tc.batch_size, tc.epochs, config.seed)  # (T, B)
    else:
        schedule = torch.as_tensor(load_order(tc.order_file, ds.n_train, tc.batch_size))
    optimizer = build_optimizer(config.optimizer, int(schedule.shape[0]))
    if tc.data_weights is None:
        weights = torch.ones(ds.n_train, dtype=dtype, device=device)
    else:
        weights = torch.as_tensor(load_data_weights(tc.data_weights, ds.n_train), dtype=dtype, device=device)
    grad_fn = make_grad_fn(model, tc.batch_size, tc.loss_reduction)
    step = make_train_step(grad_fn, optimizer)
    eager = make_train_step(make_grad_fn(model, tc.batch_size, tc.loss_reduction, eager=True), optimizer)
    return Problem(config, ds, model, optimizer, schedule, weights, grad_fn, step, eager, device, dtype)


def load_order(path: str, n_train: int, batch_size: int):
    """train.order_file: a .npy int array (T, B) of training-example ids, one row per step,
    used instead of the seeded permutation. B must be train.batch_size; ids in [0, N)."""

    order = read_npy(path, "train.order_file")
    if order.ndim != 2 or order.shape[0] < 1:
        raise ConfigError(f"train.order_file: {path} must hold an array (steps, batch), got shape {order.shape}")
    if order.dtype.kind not in "iu":
        raise ConfigError(f"train.order_file: {path} must hold integer example ids, got {order.dtype}")
    if order.shape[1] != batch_size:
        raise ConfigError(f"train.order_file: {path} has batches of {order.shape[1]}, train.batch_size is "
                          f"{batch_size}")
    if order.min() < 0 or order.max() >= n_train:
        raise ConfigError(f"train.order_file: {path} has ids outside the training split (0..{n_train - 1})")
    return order.astype(np.int64)


def load_data_weights(path: str, n_train: int):
    """train.data_weights: n_train finite, non-negative numbers, not all zero -> float64 (N,), from
    an .npy or a text file with one number a line."""

    w = read_numbers(path, "train.data_weights")
    if w.shape != (n_train,) or w.dtype.kind not in "biuf":
        raise ConfigError(f"train.data_weights: {path} must hold {n_train} weights (one per training example), "
                          f"got {w.dtype} {w.shape}")
    w = w.astype(np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ConfigError(f"train.data_weights: {path} holds NaN, Inf or negative weights")
    if not w.any():
        raise ConfigError(f"train.data_weights: every weight in {path} is 0: nothing would be trained on")
    return w
