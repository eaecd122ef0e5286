"""--groups / ground_truth.groups: which group each training example belongs to.

    label          the class label of each training example (classification datasets)
    COLUMN         a column of a table dataset (dataset=table, breast_cancer, wine): its raw values
    FILE           .csv or .parquet with a `group` column: N rows in training order, or with a
                   `train_id` column, any subset of the training ids (the rest are in no group);
                   .npy of N values; any other file: one group name a line, N lines
                   (an empty line: in no group)

An example in no group is never dropped by a group ground truth and counts in no group score.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from magic_cli.core.groups import Groups, group_scores
from magic_cli.errors import ConfigError
from magic_cli.readers import read_npy, read_table, read_text


def resolve_groups(spec: str, dataset, key: str = "--groups") -> Groups:
    """The Groups a spec names for this dataset; one ConfigError line naming the key otherwise."""
    n = dataset.n_train
    if spec == "label":
        if dataset.y_train.dim() != 1:
            raise ConfigError(f"{key}=label: dataset {dataset.name} has no one label per example (sequences); "
                              "give a file of group names")
        groups = Groups.of([int(y) for y in dataset.y_train.cpu()], "label")
    elif dataset.columns is not None and spec in dataset.columns:
        x_train = dataset.raw[0] if dataset.raw is not None else dataset.x_train.cpu().numpy()
        values = np.asarray(x_train)[:, list(dataset.columns).index(spec)]
        groups = Groups.of([_name(v) for v in values], spec)
    else:
        path = Path(spec)
        if not path.is_file():
            columns = f", a column ({', '.join(dataset.columns)})" if dataset.columns is not None else ""
            raise ConfigError(f"{key}={spec}: no such file; give label{columns} or a file of group names")
        groups = Groups.of(_read_file(path, n, key), path.name)
    if groups.n_groups < 2:
        raise ConfigError(f"{key}={spec}: {groups.n_groups} group{'s' * (groups.n_groups != 1)}; need at least 2")
    return groups


def group_score_frame(scores, groups: Groups, weights, test_ids):
    """d f_j / d e_g of every group as a frame: group, size, then one column per test id."""
    import pandas as pd

    frame = pd.DataFrame(group_scores(scores, groups, weights), columns=list(test_ids))
    frame.insert(0, "size", groups.sizes())
    frame.insert(0, "group", list(groups.names))
    return frame


def unit_of(spec: str | None) -> str:
    """The folder name of a group ground truth or report ('' for single examples): groups-<spec>."""
    if spec is None:
        return ""
    return "groups-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec).name).strip("._") or "file")


def _name(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _read_file(path: Path, n: int, key: str) -> list:
    """One group name (or None) per training example, from a group file."""
    if path.suffix in (".csv", ".parquet"):
        table = read_table(path, key)
        if "group" not in table.columns:
            raise ConfigError(f"{key}: {path} has no `group` column (has: {', '.join(map(str, table.columns))})")
        names = [None if _missing(v) else _name(v) for v in table["group"]]
        if "train_id" not in table.columns:
            _check_length(len(names), n, path, key, "rows")
            return names
        ids = table["train_id"]
        if ids.dtype.kind not in "iu":
            raise ConfigError(f"{key}: {path}: train_id must hold integer ids, got {ids.dtype}")
        ids = ids.to_numpy(dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= n)]
        if len(bad):
            raise ConfigError(f"{key}: {path}: train_id {int(bad[0])} is not a training id (0..{n - 1})")
        seen, dup = np.unique(ids, return_counts=True)
        if (dup > 1).any():
            raise ConfigError(f"{key}: {path}: train_id {int(seen[dup > 1][0])} is listed twice")
        out = [None] * n
        for i, name in zip(ids, names):
            out[int(i)] = name
        return out
    if path.suffix == ".npy":
        values = read_npy(path, key)
        if values.ndim != 1:
            raise ConfigError(f"{key}: {path} must hold one group per training example, got shape {values.shape}")
        _check_length(len(values), n, path, key, "values")
        return [_name(v) for v in values]
    lines = read_text(path, key).splitlines()
    if lines and lines[-1] == "" and len(lines) == n + 1:
        lines = lines[:-1]
    _check_length(len(lines), n, path, key, "lines")
    return [line.strip() or None for line in lines]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def _check_length(got: int, n: int, path, key: str, what: str) -> None:
    if got != n:
        raise ConfigError(f"{key}: {path} has {got} {what}, one per training example needs {n} (or, in a .csv, "
                          "a train_id column)")
