"""Fuzzing every reader of a user's files: truncations, bit flips, an empty file and a file of
another format must give one ConfigError line (the CLI prints it and exits 2) or, where the
damage does not matter (a flipped bit in a number), a result that passes every check of a
valid input. Never another exception: that would be a traceback for the user.

Hypothesis drives the damage (derandomized: the same cases on every machine, fast enough for
`make test`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magic_cli.errors import ConfigError

N_TRAIN = 30


def _good_files(folder: Path) -> dict:
    """{format: (file name, bytes)} of one valid file per supported format."""
    rng = np.random.default_rng(0)
    made = {}

    def write(fmt, name, save):
        path = folder / name
        save(path)
        made[fmt] = (name, path.read_bytes())

    write("arrays_npz", "a.npz", lambda p: np.savez(p, x=rng.normal(size=(N_TRAIN, 3)), y=rng.integers(0, 2, N_TRAIN)))
    write("arrays_npz_compressed", "c.npz",
          lambda p: np.savez_compressed(p, x=rng.normal(size=(N_TRAIN, 3)), y=rng.integers(0, 2, N_TRAIN)))
    write("tokens_npy", "t.npy", lambda p: np.save(p, rng.integers(0, 9, size=(N_TRAIN, 5))))
    write("tokens_npz", "t.npz", lambda p: np.savez(p, input_ids=rng.integers(0, 9, size=(N_TRAIN, 5))))
    write("tokens_jsonl", "t.jsonl", lambda p: p.write_text("".join(
        json.dumps({"input_ids": rng.integers(0, 9, 5).tolist()}) + "\n" for _ in range(N_TRAIN))))
    write("table_csv", "t.csv", lambda p: p.write_text("a,b,label\n" + "".join(
        f"{rng.normal():.3f},{rng.normal():.3f},{rng.integers(0, 2)}\n" for _ in range(N_TRAIN))))

    def parquet(p):
        import pandas as pd

        pd.DataFrame({"a": rng.normal(size=N_TRAIN), "label": rng.integers(0, 2, N_TRAIN)}).to_parquet(p)

    write("table_parquet", "t.parquet", parquet)

    def png(p):
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(p)

    write("image_png", "i.png", png)
    write("text", "t.txt", lambda p: p.write_text("the quick brown fox jumps over the lazy dog " * 8))

    def safetensors(p):
        from safetensors.torch import save_file

        save_file({"w": torch.arange(6.0).reshape(2, 3)}, p)

    write("weights_safetensors", "w.safetensors", safetensors)
    write("weights_pt", "w.pt", lambda p: torch.save({"w": torch.arange(6.0).reshape(2, 3)}, p))
    write("data_weights_npy", "dw.npy", lambda p: np.save(p, np.ones(N_TRAIN)))
    write("data_weights_txt", "dw.txt", lambda p: p.write_text("\n".join(["1"] * N_TRAIN) + "\n"))
    write("order_npy", "o.npy", lambda p: np.save(p, rng.integers(0, N_TRAIN, size=(6, 5))))
    write("test_ids", "ids.txt", lambda p: p.write_text("0\n3\n5  # a comment\n"))
    return made


def _read(fmt: str, path: Path, folder: Path):
    """Read `path` as magic reads a file of format `fmt`; check the result as a run would."""
    from magic_cli.config import parse_test_ids
    from magic_cli.data import DATASETS, check_dataset
    from magic_cli.readers import check_safetensors, read_tensors
    from magic_cli.stages.assemble import load_data_weights, load_order

    dataset = {"arrays_npz": ("arrays", {}), "arrays_npz_compressed": ("arrays", {}),
               "tokens_npy": ("token_ids", {}), "tokens_npz": ("token_ids", {}), "tokens_jsonl": ("token_ids", {}),
               "table_csv": ("table", {}), "table_parquet": ("table", {}), "text": ("text_file", {"context": 8})}
    if fmt in dataset:
        name, options = dataset[fmt]
        ds = DATASETS[name](0, path=str(path), **options)
        check_dataset(ds, name, DATASETS[name])
    elif fmt == "image_png":
        good = folder / "good.png"
        images = folder / "images"
        for c in ("a", "b"):
            (images / c).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                (images / c / f"{i}.png").write_bytes(good.read_bytes())
        (images / "a" / "0.png").write_bytes(path.read_bytes())
        ds = DATASETS["image_folder"](0, path=str(images), cache_dir=str(folder / "cache"), test_fraction=0.34)
        check_dataset(ds, "image_folder", DATASETS["image_folder"])
    elif fmt.startswith("weights_"):
        if fmt == "weights_safetensors":
            check_safetensors(path, "model.path")
        tensors = read_tensors(path, "model.init_from")
        assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    elif fmt.startswith("data_weights"):
        w = load_data_weights(str(path), N_TRAIN)
        assert w.shape == (N_TRAIN,) and np.isfinite(w).all() and (w >= 0).all() and w.any()
    elif fmt == "order_npy":
        order = load_order(str(path), N_TRAIN, 5)
        assert order.shape[1] == 5 and order.min() >= 0 and order.max() < N_TRAIN
    elif fmt == "test_ids":
        ids = parse_test_ids(f"@{path}", 10)
        assert ids and all(0 <= i < 10 for i in ids)
    else:
        raise AssertionError(fmt)


FOLDER = Path(tempfile.mkdtemp(prefix="magic-fuzz-"))
GOOD = _good_files(FOLDER)
FORMATS = sorted(GOOD)


def _damage(data: bytes, how: str, position: float, bit: int, other: str) -> bytes:
    at = int(position * len(data))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        at = min(at, len(data) - 1)
        return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:]
    if how == "empty":
        return b""
    return GOOD[other][1]  # a file of another format under this one's name


def _check_one(fmt: str, damaged: bytes) -> None:
    with tempfile.TemporaryDirectory(dir=FOLDER) as tmp:
        folder = Path(tmp)
        name = GOOD[fmt][0]
        (folder / name).write_bytes(damaged)
        if fmt == "image_png":
            (folder / "good.png").write_bytes(GOOD[fmt][1])
        try:
            _read(fmt, folder / name, folder)
        except ConfigError as e:
            assert "\n" not in str(e) and str(e), repr(e)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_good_file_reads(fmt):
    """The undamaged file of each format reads without error (the fuzz below starts from it)."""
    with tempfile.TemporaryDirectory(dir=FOLDER) as tmp:
        folder = Path(tmp)
        (folder / GOOD[fmt][0]).write_bytes(GOOD[fmt][1])
        if fmt == "image_png":
            (folder / "good.png").write_bytes(GOOD[fmt][1])
        _read(fmt, folder / GOOD[fmt][0], folder)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["empty", "other"])
def test_empty_and_foreign_files(fmt, how):
    for other in (FORMATS if how == "other" else FORMATS[:1]):
        if other != fmt:
            _check_one(fmt, _damage(GOOD[fmt][1], how, 0.0, 0, other))


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(how=st.sampled_from(["truncate", "flip"]), position=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7))
def test_truncated_or_flipped_files(fmt, how, position, bit):
    _check_one(fmt, _damage(GOOD[fmt][1], how, position, bit, fmt))
