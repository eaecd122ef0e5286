"""One reader per file format a user hands to magic, and the one place where a path value is
expanded (`~`, as a shell would).

Every reader takes the config key the file came from (for the message) and turns whatever the
parsing library raises on a damaged, truncated or foreign file into one `ConfigError` line
naming the key, the file and the fault. Nothing here trusts the bytes it reads: arrays are
loaded without pickle, tensors with `weights_only=True`, and everything is read in full inside
the reader, so a lazy format (a zip member, a parquet page) cannot fail later, deep in training.

    read_npy     .npy         -> ndarray
    read_npz     .npz         -> {name: ndarray}
    read_table   .csv/.parquet -> pandas DataFrame
    read_image   .png/.jpg/...-> (H, W, 3) float64 in [0, 1]
    read_jsonl   .jsonl       -> [(line number, object)]
    read_text    UTF-8 text   -> str
    read_tensors .safetensors or torch.save file -> {name: Tensor}
    read_numbers a text file of one number a line, or an .npy -> ndarray
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

from magic_cli.errors import ConfigError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def expand_path(value: str) -> str:
    """`~` and `~user` at the start of a path value expanded as a shell would; else unchanged."""
    return os.path.expanduser(value) if isinstance(value, str) else value


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _unreadable(key: str, path, what: str, e: BaseException) -> ConfigError:
    return ConfigError(f"{key}: {path} is not a readable {what} ({_reason(e)})")


def _head(path, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None


def read_npy(path, key: str):
    """An .npy array (no pickle), read in full."""
    import numpy as np

    if _head(path, 6) != NPY_MAGIC:
        raise ConfigError(f"{key}: {path} is not an .npy file (write one with numpy.save)")
    try:
        array = np.load(path, allow_pickle=False)
        return np.array(array)  # a copy in memory: nothing is read later
    except Exception as e:  # truncated data, a damaged header, object arrays
        raise _unreadable(key, path, ".npy file", e) from None


def read_npz(path, key: str) -> dict:
    """Every array of an .npz archive (no pickle), read in full: a zip member is read lazily by
    numpy, so a damaged one would otherwise fail at its first use."""
    import numpy as np

    if _head(path, 4) != ZIP_MAGIC:
        raise ConfigError(f"{key}: {path} is not an .npz archive (write one with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: np.array(z[name]) for name in z.files}
    except Exception as e:  # BadZipFile, zlib.error, EOFError, a damaged member's header
        raise _unreadable(key, path, ".npz archive", e) from None


def read_arrays(path, key: str):
    """An .npy array or an .npz dict of arrays, told apart by their first bytes."""
    return read_npz(path, key) if _head(path, 4) == ZIP_MAGIC else read_npy(path, key)


def read_table(path, key: str):
    """A CSV (or, with pyarrow, parquet) table as a DataFrame."""
    import pandas as pd

    path = str(path)
    try:
        if path.endswith(".parquet"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except ImportError as e:
        raise ConfigError(f"{key}: reading {path} needs {e.name or 'pyarrow'}: pip install pyarrow") from None
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{key}: {path} is empty (no header, no rows)") from None
    except Exception as e:  # ParserError, UnicodeDecodeError, ArrowInvalid, OSError ...
        raise _unreadable(key, path, "parquet file" if path.endswith(".parquet") else "CSV table", e) from None


def read_image(path, key: str):
    """An image decoded to RGB, (H, W, 3) float64 in [0, 1]."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    except Exception as e:  # UnidentifiedImageError, a truncated stream, a damaged chunk
        raise _unreadable(key, path, "image", e) from None


def read_text(path, key: str) -> str:
    """A UTF-8 text file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: {path} is not a UTF-8 text file (byte {e.start} cannot be decoded)") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None


def read_jsonl(path, key: str) -> list:
    """[(line number, parsed object)] of a JSON-lines file; blank lines are skipped."""
    rows = []
    for line_no, line in enumerate(read_text(path, key).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except ValueError as e:  # also a line cut in the middle
            raise ConfigError(f"{key}: {path}:{line_no} is not a line of JSON ({_reason(e)})") from None
    return rows


def read_numbers(path, key: str):
    """A 1-D float64 array: an .npy, or a text file with one number a line (# comments allowed)."""
    import numpy as np

    if _head(path, 6) == NPY_MAGIC:
        return read_npy(path, key)
    values = []
    for line_no, line in enumerate(read_text(path, key).splitlines(), 1):
        text = line.split("#")[0].strip()
        if not text:
            continue
        try:
            values.append(float(text))
        except ValueError:
            raise ConfigError(f"{key}: {path}:{line_no}: {text[:40]!r} is not a number (give an .npy written with "
                              "numpy.save, or a text file with one number a line)") from None
    return np.array(values, dtype=np.float64)


def read_tensors(path, key: str) -> dict:
    """{name: Tensor} of a .safetensors file or a torch.save file of tensors only. Pickled Python
    objects are refused (torch.load weights_only=True): they could run code."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = dict(load_file(str(path)))
        else:  # mapped, not read, where the file is a zip (torch.save's format): a large .bin is checked cheaply
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=_head(path, 4) == ZIP_MAGIC)
    except ImportError as e:
        raise ConfigError(f"{key}: reading {path} needs {e.name or 'safetensors'}: pip install safetensors") from None
    except pickle.UnpicklingError:  # weights_only refused an object: say so in one line, never load it
        raise ConfigError(f"{key}: {path} holds pickled Python objects, not only tensors; magic loads only "
                          "tensor data (torch.load weights_only=True): save a state dict of tensors or a "
                          ".safetensors file") from None
    except Exception as e:  # a torn zip, a damaged safetensors header
        raise _unreadable(key, path, "weights file", e) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise ConfigError(f"{key}: {path} is not a state dict of tensors (name -> tensor)")
    return data


def check_safetensors(path, key: str) -> None:
    """A .safetensors file's header and size, without reading the tensors (a truncated or
    damaged file fails here, in one line)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except ImportError as e:
        raise ConfigError(f"{key}: reading {path} needs {e.name or 'safetensors'}: pip install safetensors") from None
    except Exception as e:
        raise _unreadable(key, path, ".safetensors file", e) from None
