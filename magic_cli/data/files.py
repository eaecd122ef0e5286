"""Datasets from a user's files, one builder per format:

    arrays        .npz with arrays x (N, F) or (N, C, H, W) and y (N,) int labels
    table         .csv (or .parquet, with pyarrow) with a label column; the other columns are features
    image_folder  torchvision's ImageFolder layout root/<class>/<image>, decoded once into a cache
    token_ids     .npy int (N, L), .npz / .jsonl with input_ids (and labels): next-token prediction;
                  rows of several lengths are right-padded, padding and labels -100 unsupervised
    text_file     a plain text file cut into chunks of context + 1 characters (as text_chars) or,
                  with a tokenizer (transformers), of context + 1 tokens

Either `path` (one file, split by a seeded shuffle with `test_fraction`) or `train_path` and
`test_path` (given splits). Features are standardised with training statistics only. The
files' contents enter the training fingerprint (config.py). Every problem with a file is one
line naming the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path

from magic_cli.contracts import IGNORE, Dataset
from magic_cli.data.augment import flip_translate
from magic_cli.data.text import ALPHABET
from magic_cli.determinism import derive_seed
from magic_cli.errors import ConfigError
from magic_cli.models.hf import _transformers, resolve_path
from magic_cli.readers import read_arrays, read_image, read_jsonl, read_npz, read_table, read_text
from magic_cli.storage import npz_bytes, save_bytes, sha256_tree

# --- common ----------------------------------------------------------------------------------------

def _paths(path, train_path, test_path) -> list[str]:
    one_file = path is not None and train_path is None and test_path is None
    two_files = path is None and train_path is not None and test_path is not None
    if not (one_file or two_files):
        raise ConfigError("give dataset.path (split by dataset.test_fraction) or both dataset.train_path and "
                          "dataset.test_path")
    paths = [path] if path is not None else [train_path, test_path]
    for p in paths:
        if not Path(p).exists():
            raise ConfigError(f"dataset: no such file {p!r}")
    return paths


def _split(n: int, seed: int, test_fraction: float):
    import numpy as np
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(derive_seed(seed, "split")).permutation(n)
    n_test = int(round(n * test_fraction))
    if n_test == 0 or n_test == n:
        raise ConfigError(f"dataset.test_fraction={test_fraction} of {n} examples leaves an empty split")
    return perm[n_test:], perm[:n_test]


def _labels(y, where: str, n_classes):
    import numpy as np

    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ConfigError(f"{where}: labels must be integers of shape (N,), got {y.dtype} {y.shape}")
    if len(y) == 0:
        raise ConfigError(f"{where}: no examples")
    if y.min() < 0 or (n_classes is not None and y.max() >= n_classes):
        raise ConfigError(f"{where}: labels must be in 0..{(n_classes or 0) - 1 if n_classes else 'C-1'}, "
                          f"got {y.min()}..{y.max()}")
    return y.astype(np.int64)


def _features(x, where: str):
    import numpy as np

    x = np.asarray(x)
    if x.dtype.kind not in "biuf" or x.ndim not in (2, 4):
        raise ConfigError(f"{where}: features must be numbers of shape (N, F) or (N, C, H, W), got {x.dtype} "
                          f"{x.shape}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ConfigError(f"{where}: features hold NaN or Inf")
    return x


def _classification(name, parts, seed, test_fraction, n_classes, standardize, columns=None):
    """parts: [(x, y)] of one file (split here) or [(x_train, y_train), (x_test, y_test)]."""
    import numpy as np
    import torch
    if len(parts) == 1:
        (x, y), = parts
        train, test = _split(len(y), seed, test_fraction)
        parts = [(x[train], y[train]), (x[test], y[test])]
    # C order first: numpy's sums (the statistics below) depend on the memory layout, and a
    # freshly decoded array and its cached copy must standardise to the same bits.
    (x_tr, y_tr), (x_te, y_te) = [(np.ascontiguousarray(x), np.ascontiguousarray(y)) for x, y in parts]
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ConfigError(f"dataset: train and test features differ in shape: {x_tr.shape[1:]} vs {x_te.shape[1:]}")
    classes = int(n_classes) if n_classes is not None else int(max(y_tr.max(), y_te.max())) + 1
    raw = (x_tr, x_te) if x_tr.ndim == 2 else None  # images: shown from the standardised ones (no copy)
    if standardize:
        axes = (0,) if x_tr.ndim == 2 else (0, 2, 3)
        mean, std = x_tr.mean(axis=axes, keepdims=True), x_tr.std(axis=axes, keepdims=True)
        std[std == 0] = 1.0
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    t = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))  # noqa: E731
    return Dataset(name, t(x_tr, np.float64), t(y_tr, np.int64), t(x_te, np.float64), t(y_te, np.int64),
                   n_classes=classes, raw=raw, columns=tuple(columns) if columns is not None else None)


# --- formats ---------------------------------------------------------------------------------------

def arrays(seed: int, *, path: str = None, train_path: str = None, test_path: str = None, test_fraction: float = 0.2,
           n_classes: int = None, standardize: bool = True):
    """An .npz with x (N, F) or (N, C, H, W) features and y (N,) integer labels."""
    parts = []
    for p in _paths(path, train_path, test_path):
        z = read_npz(p, "dataset")
        if not {"x", "y"} <= set(z):
            raise ConfigError(f"dataset: {p} must be an .npz with arrays x and y, has {', '.join(z) or 'none'}")
        x, y = _features(z["x"], p), _labels(z["y"], p, n_classes)
        if len(x) != len(y):
            raise ConfigError(f"dataset: {p} has {len(x)} feature rows but {len(y)} labels")
        parts.append((x, y))
    return _classification("arrays", parts, seed, test_fraction, n_classes, standardize)


def table(seed: int, *, path: str = None, train_path: str = None, test_path: str = None, label: str = "label",
          test_fraction: float = 0.2, standardize: bool = True):
    """A CSV (or parquet) table: the `label` column holds the classes (any values: sorted, numbered
    0..C-1), every other column is a numeric feature."""
    import numpy as np
    import pandas as pd

    paths = _paths(path, train_path, test_path)
    frames = [read_table(p, "dataset") for p in paths]
    for p, frame in zip(paths, frames):
        if len(frame) == 0:
            raise ConfigError(f"dataset: {p} has no rows (only a header: {', '.join(map(str, frame.columns[:8]))})")
        if label not in frame.columns:
            raise ConfigError(f"dataset: {p} has no column {label!r} (dataset.label); columns: "
                              f"{', '.join(map(str, frame.columns[:8]))}")
        bad = [c for c in frame.columns if c != label and not pd.api.types.is_numeric_dtype(frame[c])]
        if bad:
            raise ConfigError(f"dataset: {p}: column {bad[0]!r} is not numeric")
        if frame.isna().any().any():
            column = frame.columns[frame.isna().any()][0]
            raise ConfigError(f"dataset: {p}: column {column!r} has missing values")
    classes = sorted(set().union(*(set(f[label].tolist()) for f in frames)))
    number = {c: i for i, c in enumerate(classes)}
    parts = [(_features(f.drop(columns=[label]).to_numpy(), "dataset"),
              np.array([number[v] for v in f[label].tolist()], dtype=np.int64)) for f in frames]
    columns = [str(c) for c in frames[0].columns if c != label]
    return _classification("table", parts, seed, test_fraction, len(classes), standardize, columns)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _decode_folder(root: Path, cache_dir: str):
    """(x (N, 3, H, W) float64 in [0, 1], y (N,), class names) of an ImageFolder tree, cached in
    cache_dir/<content digest>.npz (arrays only, loaded without pickle)."""
    import numpy as np

    cache = Path(cache_dir).expanduser() / f"image_folder_{sha256_tree(root)}.npz"
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise ConfigError(f"dataset: {root} must hold one folder per class (ImageFolder layout), found "
                          f"{len(classes)}")
    if cache.is_file():
        try:  # a damaged cache is decoded again (its name is the images' digest, so it is never stale)
            z = read_npz(cache, "dataset.cache_dir")
            return z["x"], z["y"], classes
        except (ConfigError, KeyError):
            pass
    xs, ys, size = [], [], None
    for label, name in enumerate(classes):
        for f in sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            a = read_image(f, "dataset")
            if size is None:
                size = a.shape
            elif a.shape != size:
                raise ConfigError(f"dataset: {f} is {a.shape[1]}x{a.shape[0]}, the others {size[1]}x{size[0]}; "
                                  "resize the images to one size")
            xs.append(a.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise ConfigError(f"dataset: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    x, y = np.ascontiguousarray(np.stack(xs)), np.array(ys, dtype=np.int64)
    save_bytes(cache, npz_bytes(x=x, y=y))
    return x, y, classes


def image_folder(seed: int, *, path: str = None, train_path: str = None, test_path: str = None,
                 test_fraction: float = 0.2, cache_dir: str = "~/.cache/magic", flip: bool = False,
                 translate: int = 0):
    """Images in torchvision's ImageFolder layout (root/<class>/<image>), all of one size, as
    (3, H, W) standardised per channel with training statistics; optional pure augmentation."""

    parts, names = [], None
    for p in _paths(path, train_path, test_path):
        if not Path(p).is_dir():
            raise ConfigError(f"dataset: {p} must be a folder (ImageFolder layout)")
        x, y, classes = _decode_folder(Path(p), cache_dir)
        if names is not None and classes != names:
            raise ConfigError(f"dataset: {p} has classes {classes}, the training folder {names}")
        names = classes
        parts.append((x, y))
    ds = _classification("image_folder", parts, seed, test_fraction, len(names), standardize=True)
    ds.augment = flip_translate(flip, translate) if flip or translate else None
    return ds


TOKEN_ID_LIMIT = 2 ** 63  # token ids are int64
VOCAB_LIMIT = 2 ** 24  # larger than any tokenizer's vocabulary: an id beyond it is a damaged file


def _check_token_list(values, where: str, key: str, lowest_negative: int) -> None:
    """A JSON list of token ids: integers in [0, 2**63), or `lowest_negative` (labels: -100)."""
    if not isinstance(values, list):
        raise ConfigError(f"{where}: {key} must be a list of integers, got {type(values).__name__}")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{where}: {key} must be a list of integers, holds {json_value(v)}")
        if not (0 <= v < TOKEN_ID_LIMIT or v == lowest_negative):
            allowed = f" (or {lowest_negative}: not supervised)" if lowest_negative < 0 else ""
            raise ConfigError(f"{where}: {key} holds {v}, outside 0..2**63-1{allowed}")


def json_value(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _token_rows(p: str):
    """(input_ids, labels), int64 (N, L): rows of several lengths are right-padded to the longest,
    with input id 0 and label IGNORE there. labels are the input ids unless the file gives them
    (IGNORE, -100, marks a token that is not supervised, e.g. a prompt)."""
    import numpy as np

    if p.endswith(".jsonl"):
        ids_rows, label_rows = [], []
        for line_no, row in read_jsonl(p, "dataset"):
            where = f"dataset: {p}:{line_no}"
            if not isinstance(row, dict) or "input_ids" not in row:
                raise ConfigError(f"{where} is not a JSON object with input_ids")
            ids, labels = row["input_ids"], row.get("labels", row["input_ids"])
            _check_token_list(ids, where, "input_ids", 0)
            _check_token_list(labels, where, "labels", IGNORE)
            if len(labels) != len(ids):
                raise ConfigError(f"{where} has {len(labels)} labels for {len(ids)} input_ids")
            if "attention_mask" in row:  # right padding only: the kept tokens come first
                mask = row["attention_mask"]
                n = sum(mask) if isinstance(mask, list) and all(m in (0, 1) for m in mask) else -1
                if n < 0 or len(mask) != len(ids) or mask != [1] * n + [0] * (len(ids) - n):
                    raise ConfigError(f"{where}: attention_mask must be 1s then 0s (right padding) of the length "
                                      "of input_ids")
                ids, labels = ids[:n], labels[:n]
            ids_rows.append(ids)
            label_rows.append(labels)
        if not ids_rows:
            raise ConfigError(f"dataset: {p} has no rows")
        width = max(len(r) for r in ids_rows)
        ids = np.zeros((len(ids_rows), width), dtype=np.int64)
        labels = np.full((len(ids_rows), width), IGNORE, dtype=np.int64)
        for i, (r, lab) in enumerate(zip(ids_rows, label_rows)):
            ids[i, :len(r)], labels[i, :len(lab)] = r, lab
    else:
        data = read_arrays(p, "dataset")
        if isinstance(data, np.ndarray):
            ids = labels = data
        else:
            if "input_ids" not in data:
                raise ConfigError(f"dataset: {p} must hold an array input_ids (and optionally labels), has "
                                  f"{', '.join(data) or 'none'}")
            ids = data["input_ids"]
            labels = data.get("labels", ids)
            if labels.shape != ids.shape:
                raise ConfigError(f"dataset: {p}: labels {labels.shape} and input_ids {ids.shape} differ in shape")
    if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] < 2 or \
            ids.shape[0] < 1 or labels.dtype.kind not in "iu":
        raise ConfigError(f"dataset: {p} must hold integer token ids (N >= 1, L >= 2), got "
                          f"{getattr(ids, 'dtype', '?')} {getattr(ids, 'shape', '')}")
    if ids.min() < 0:
        raise ConfigError(f"dataset: {p} has negative token ids")
    if max(int(ids.max()), int(labels.max())) >= VOCAB_LIMIT:
        raise ConfigError(f"dataset: {p} has token id {max(int(ids.max()), int(labels.max()))}: beyond any "
                          f"vocabulary (< {VOCAB_LIMIT})")
    if ((labels < 0) & (labels != IGNORE)).any():
        raise ConfigError(f"dataset: {p} has negative labels other than {IGNORE} (not supervised)")
    return ids.astype(np.int64), labels.astype(np.int64)


def _language(name, parts, seed, test_fraction, vocab_size):
    """Next-token prediction: x = input_ids[:, :-1], y = labels[:, 1:] (IGNORE: not supervised).

    parts: [(input_ids, labels)] of one file (split by the seed) or of the train and test files."""
    import numpy as np
    import torch

    if len(parts) == 1:
        train, test = _split(len(parts[0][0]), seed, test_fraction)
        parts = [(parts[0][0][train], parts[0][1][train]), (parts[0][0][test], parts[0][1][test])]
    width = max(ids.shape[1] for ids, _ in parts)  # pad the splits to one length (right padding)
    parts = [(np.pad(ids, ((0, 0), (0, width - ids.shape[1]))),
              np.pad(lab, ((0, 0), (0, width - lab.shape[1])), constant_values=IGNORE)) for ids, lab in parts]
    (tr, tr_lab), (te, te_lab) = parts
    top = int(max(tr.max(), te.max(), tr_lab.max(), te_lab.max()))
    vocab = int(vocab_size) if vocab_size is not None else top + 1
    if top >= vocab:
        raise ConfigError(f"dataset: token ids reach {top} but dataset.vocab_size={vocab}")
    unsupervised = np.flatnonzero((te_lab[:, 1:] == IGNORE).all(1))
    if len(unsupervised):
        raise ConfigError(f"dataset: test sequence {unsupervised[0]} has no supervised next token (its loss f_j "
                          "would be undefined)")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Dataset(name, t(tr[:, :-1]), t(tr_lab[:, 1:]), t(te[:, :-1]), t(te_lab[:, 1:]), n_classes=vocab)


def token_ids(seed: int, *, path: str = None, train_path: str = None, test_path: str = None,
              test_fraction: float = 0.2, vocab_size: int = None):
    """Token id sequences: an .npy (N, L), an .npz with input_ids (and labels), or a .jsonl of
    {"input_ids": [...], "labels": [...] (optional; -100 = not supervised)}, right-padded to one length."""
    parts = [_token_rows(str(p)) for p in _paths(path, train_path, test_path)]
    return _language("token_ids", parts, seed, test_fraction, vocab_size)


def text_file(seed: int, *, path: str = None, train_path: str = None, test_path: str = None,
              context: int = 32, test_fraction: float = 0.2, tokenizer: str = None):
    """A plain UTF-8 text file cut into non-overlapping chunks of context + 1 ids: characters (the
    alphabet of text_chars; other characters become '?'), or with `tokenizer` (a folder written by
    a transformers tokenizer's save_pretrained, or a hub name) its tokens."""
    import numpy as np
    if not isinstance(context, int) or context < 1:
        raise ConfigError(f"dataset.context must be a positive integer, got {context!r}")
    if tokenizer is None:
        index = {c: i for i, c in enumerate(ALPHABET)}
        encode, vocab, unit = (lambda text: [index.get(c, index["?"]) for c in text]), len(ALPHABET), "characters"
    else:
        tok = load_tokenizer(tokenizer)
        encode, vocab, unit = (lambda text: tok(text)["input_ids"]), len(tok), "tokens"
    parts = []
    for p in _paths(path, train_path, test_path):
        text = read_text(p, "dataset")
        ids = np.array(encode(text), dtype=np.int64)
        n = len(ids) // (context + 1)
        if n < 2:
            raise ConfigError(f"dataset: {p} has {len(ids)} {unit}: too few for chunks of {context + 1}")
        chunks = ids[: n * (context + 1)].reshape(n, context + 1)
        parts.append((chunks, chunks))
    return _language("text_file", parts, seed, test_fraction, vocab)


def load_tokenizer(name: str):
    """A transformers tokenizer from a save_pretrained folder or a hub name (one line otherwise)."""

    folder = resolve_path(name, weights=False)
    try:
        import warnings

        with warnings.catch_warnings():  # e.g. "longer than the model's maximum length": the chunks are cut here
            warnings.simplefilter("ignore")
            tok = _transformers().AutoTokenizer.from_pretrained(str(folder))
        tok.model_max_length = int(1e30)
        return tok
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"dataset.tokenizer: {name} is not a transformers tokenizer "
                          f"({' '.join(str(e).split())[:160]})") from None
