"""Bytes on disk, for every file magic writes: atomic writes (a temporary file beside the target,
fsynced, moved into place with os.replace), encoders of arrays and tensors, verified-free loads
(no pickle; tensors with weights_only=True) and sha256 digests of bytes, files and folders.

A leaf: the run directory (run_dir.py) builds its artifacts and sidecars on these, and so do the
caches of decoded user data (data/files.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tempfile
from pathlib import Path

UMASK = os.umask(0)
os.umask(UMASK)
TMP_TAG = f"{socket.gethostname()}~{os.getpid()}"  # in temporary names: who is writing


def write_tmp(path: Path, data: bytes) -> Path:
    """`data` in a temporary file beside `path`, named after its writer (TMP_TAG: see RunDir.clean)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}~{TMP_TAG}~", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: Path, data: bytes) -> Path:
    tmp = write_tmp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


def save_bytes(path, data: bytes) -> Path:
    return atomic_write(path, data)


def save_text(path, text: str) -> Path:
    return save_bytes(path, text.encode())


def json_text(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def save_json(path, obj) -> Path:
    return save_text(path, json_text(obj))


def load_json(path):
    return json.loads(Path(path).read_text())


def npy_bytes(array) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(**arrays) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def tensors_bytes(tensors: dict) -> bytes:
    """A flat dict of str -> Tensor as torch.save bytes (loadable with weights_only=True)."""
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
    return buf.getvalue()


def save_npy(path, array) -> Path:
    return save_bytes(path, npy_bytes(array))


def load_npy(path, mmap: bool = False):
    import numpy as np

    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def load_npz(path) -> dict:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_tensors(path, tensors: dict) -> Path:
    return save_bytes(path, tensors_bytes(tensors))


def load_tensors(path, mmap: bool = False) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root) -> str:
    """sha256 (16 hex digits) of a folder's files: their relative names and contents."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        file_hash = hashlib.sha256()
        with open(f, "rb") as fh:  # streamed: model weights can be larger than memory allows twice
            for block in iter(lambda: fh.read(1 << 24), b""):
                file_hash.update(block)
        h.update(file_hash.digest())
    return h.hexdigest()[:16]
