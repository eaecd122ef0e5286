"""Determinism in one place: the switches that make a run bit-reproducible, and seeds
derived per purpose (init, data order, augmentation, masks) so that nothing random
depends on a global RNG cursor."""

from __future__ import annotations

import hashlib
import os

from magic_cli.errors import ConfigError


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed that is a pure function of (seed, *tags), e.g. derive_seed(0, "order", 3)."""
    text = repr((int(seed),) + tuple(str(t) for t in tags)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *tags: object):
    """A CPU torch.Generator seeded with derive_seed(seed, *tags)."""
    import torch

    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *tags))


def enable_determinism(device: str = "cpu", threads: int = 1) -> dict:
    """Turn on every switch that bit-reproducibility needs; return them for meta.json.

    The CPU thread count is part of it: some CPU kernels split reductions by thread, so
    results are bit-identical only for the same `threads`.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but CUDA is not available on this machine; use device=cpu")
    return {
        "use_deterministic_algorithms": True,
        "cudnn_benchmark": False,
        "cudnn_deterministic": True,
        "tf32": False,
        "threads": threads,
        "CUBLAS_WORKSPACE_CONFIG": os.environ["CUBLAS_WORKSPACE_CONFIG"],
    }
