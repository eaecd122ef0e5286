"""Real English prose that ships with Python (pydoc_data.topics, ~465 K characters) as
fixed-length character chunks for a tiny language model: x = chunk[:-1], y = chunk[1:]."""

from __future__ import annotations

import string

from magic_cli.contracts import Dataset
from magic_cli.determinism import derive_seed
from magic_cli.errors import ConfigError

ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"  # everything else -> '?'


def text_chars(seed: int, *, context: int = 32, n_train: int = 1000, n_test: int = 200):
    """Non-overlapping chunks of context+1 characters, shuffled by the seed into train and test."""
    from pydoc_data.topics import topics

    import numpy as np
    import torch
    text = "\n".join(topics[k] for k in sorted(topics))
    index = {c: i for i, c in enumerate(ALPHABET)}
    unknown = index["?"]
    ids = np.array([index.get(c, unknown) for c in text], dtype=np.int64)
    n_chunks = len(ids) // (context + 1)
    if n_train + n_test > n_chunks:
        raise ConfigError(f"dataset.n_train + dataset.n_test must be <= {n_chunks} chunks of {context + 1} characters")
    chunks = ids[: n_chunks * (context + 1)].reshape(n_chunks, context + 1)
    chunks = chunks[np.random.default_rng(derive_seed(seed, "chunks")).permutation(n_chunks)]
    train, test = chunks[:n_train], chunks[n_train:n_train + n_test]
    t = torch.from_numpy
    return Dataset("text_chars", t(train[:, :-1].copy()), t(train[:, 1:].copy()), t(test[:, :-1].copy()),
                   t(test[:, 1:].copy()), n_classes=len(ALPHABET))
