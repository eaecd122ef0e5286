"""Datasets from a user's files: every format runs the whole pipeline, every bad file is one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

MLP = ["model.hidden=[8]", "train.epochs=2", "train.batch_size=16", "dtype=float64"]
LM = ["model=transformer", "model.dim=8", "model.n_heads=2", "model.n_layers=1", "train.epochs=1",
      "train.batch_size=12", "dtype=float64"]
CNN = ["model=cnn_small", "model.channels=[3,4]", "train.epochs=2", "train.batch_size=16", "dtype=float64"]
GT = ["ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=3"]


def _wine():
    from sklearn.datasets import load_wine

    d = load_wine()
    return d.data, d.target


def _text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))[:12000]


def make_arrays(tmp_path):
    x, y = _wine()
    np.savez(tmp_path / "wine.npz", x=x, y=y)
    return ["dataset=arrays", f"dataset.path={tmp_path / 'wine.npz'}"] + MLP


def make_arrays_given_splits(tmp_path):
    x, y = _wine()
    np.savez(tmp_path / "train.npz", x=x[:140], y=y[:140])
    np.savez(tmp_path / "test.npz", x=x[140:], y=y[140:])
    return ["dataset=arrays", f"dataset.train_path={tmp_path / 'train.npz'}",
            f"dataset.test_path={tmp_path / 'test.npz'}"] + MLP


def make_table(tmp_path):
    x, y = _wine()
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    frame["kind"] = np.array(["red", "rose", "white"])[y]  # string classes
    frame.to_csv(tmp_path / "wine.csv", index=False)
    return ["dataset=table", f"dataset.path={tmp_path / 'wine.csv'}", "dataset.label=kind"] + MLP


def make_table_parquet(tmp_path):
    x, y = _wine()
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    frame["label"] = y
    frame.to_parquet(tmp_path / "wine.parquet")
    return ["dataset=table", f"dataset.path={tmp_path / 'wine.parquet'}"] + MLP


def make_image_folder(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for label in range(3):
        folder = tmp_path / "images" / f"digit{label}"
        folder.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(d.target == label)[:40]):
            Image.fromarray((d.images[i] * 15).astype(np.uint8)).save(folder / f"{k}.png")
    return ["dataset=image_folder", f"dataset.path={tmp_path / 'images'}", f"dataset.cache_dir={tmp_path / 'cache'}",
            ] + CNN


def make_token_ids(tmp_path):
    ids = np.frombuffer(_text().encode("ascii", "replace"), dtype=np.uint8).astype(np.int64) % 50
    rows = ids[: 60 * 9].reshape(60, 9)
    with open(tmp_path / "tokens.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"input_ids": row.tolist()}) + "\n")
    return ["dataset=token_ids", f"dataset.path={tmp_path / 'tokens.jsonl'}", "dataset.vocab_size=50"] + LM


def make_token_npy(tmp_path):
    ids = np.frombuffer(_text().encode("ascii", "replace"), dtype=np.uint8).astype(np.int64) % 50
    np.save(tmp_path / "tokens.npy", ids[: 60 * 9].reshape(60, 9))
    return ["dataset=token_ids", f"dataset.path={tmp_path / 'tokens.npy'}"] + LM


def make_text_file(tmp_path):
    (tmp_path / "book.txt").write_text(_text()[:6000])
    return ["dataset=text_file", f"dataset.path={tmp_path / 'book.txt'}", "dataset.context=8"] + LM


FORMATS = {"arrays": make_arrays, "arrays_given_splits": make_arrays_given_splits, "table_csv": make_table,
           "table_parquet": make_table_parquet,
           "image_folder": make_image_folder, "token_ids_jsonl": make_token_ids, "token_ids_npy": make_token_npy,
           "text_file": make_text_file}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_runs_the_pipeline(cli, tmp_path, fmt):
    args = FORMATS[fmt](tmp_path) + GT + [f"out_dir={tmp_path / 'run'}"]
    for command in (["train"], ["attribute", "--test-ids", "0:3"], ["retrain-ground-truth"], ["score"]):
        code, _, err = cli(*command, *args)
        assert code == 0, (command, err)
    summary = json.loads((tmp_path / "run" / "report" / "summary.json").read_text())
    assert summary["lds"]["magic"]["0.1"]["n_subsets"] == 3
    scores = np.load(tmp_path / "run" / "attribute" / "magic" / "scores.npy")
    assert scores.shape[1] == 3 and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_table_classes_and_standardisation(tmp_path):
    from conftest import problem_for

    args = make_table(tmp_path)
    ds = problem_for(args).dataset
    assert ds.n_classes == 3 and ds.n_train + ds.n_test == 178
    np.testing.assert_allclose(ds.x_train.mean(0).numpy(), 0, atol=1e-12)


def test_image_folder_is_decoded_once_into_the_cache(tmp_path):
    from conftest import problem_for

    args = make_image_folder(tmp_path)
    first = problem_for(args).dataset
    cached = list((tmp_path / "cache").glob("image_folder_*.npz"))
    assert len(cached) == 1 and first.x_train.shape[1:] == (3, 8, 8) and first.n_classes == 3
    again = problem_for(args).dataset
    assert (again.x_train == first.x_train).all()


def test_a_changed_data_file_refuses_the_old_run(cli, tmp_path):
    args = make_arrays(tmp_path) + [f"out_dir={tmp_path / 'run'}"]
    assert cli("train", *args)[0] == 0
    x, y = _wine()
    np.savez(tmp_path / "wine.npz", x=x * 2, y=y)
    code, _, err = cli("attribute", "--test-ids", "0", *args)
    assert code == 2 and "dataset.path" in err and "different config" in err


def _bad_npz(tmp_path, **arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    return ["dataset=arrays", f"dataset.path={tmp_path / 'bad.npz'}"] + MLP


def _bad_case(tmp_path, case):
    x, y = _wine()
    if case == "missing_file":
        return ["dataset=arrays", f"dataset.path={tmp_path / 'nope.npz'}"] + MLP
    if case == "wrong_shape":
        return _bad_npz(tmp_path, x=x[:, :, None], y=y)
    if case == "length_mismatch":
        return _bad_npz(tmp_path, x=x, y=y[:-1])
    if case == "labels_out_of_range":
        return _bad_npz(tmp_path, x=x, y=y) + ["dataset.n_classes=2"]
    if case == "nan_features":
        x = x.copy()
        x[3, 2] = np.nan
        return _bad_npz(tmp_path, x=x, y=y)
    if case == "float_labels":
        return _bad_npz(tmp_path, x=x, y=y.astype(float))
    if case == "no_x_y":
        return _bad_npz(tmp_path, features=x)
    if case == "fewer_than_batch":
        return _bad_npz(tmp_path, x=x[:10], y=y[:10])
    if case == "path_and_splits":
        return make_arrays(tmp_path) + [f"dataset.train_path={tmp_path / 'wine.npz'}"]
    if case == "labels_of_another_length":
        (tmp_path / "t.jsonl").write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2], "labels": [2]}\n')
        return ["dataset=token_ids", f"dataset.path={tmp_path / 't.jsonl'}"] + LM
    if case == "left_padding":
        (tmp_path / "t.jsonl").write_text('{"input_ids": [0, 2, 3], "attention_mask": [0, 1, 1]}\n')
        return ["dataset=token_ids", f"dataset.path={tmp_path / 't.jsonl'}"] + LM
    if case == "unsupervised_test_sequence":
        rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, -100, -100]}] * 40
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return ["dataset=token_ids", f"dataset.path={tmp_path / 't.jsonl'}"] + LM
    if case == "tokens_over_vocab":
        np.save(tmp_path / "t.npy", np.full((30, 9), 60))
        return ["dataset=token_ids", f"dataset.path={tmp_path / 't.npy'}", "dataset.vocab_size=50"] + LM
    if case == "non_numeric_column":
        pd.DataFrame({"a": ["x", "y"] * 50, "label": [0, 1] * 50}).to_csv(tmp_path / "t.csv", index=False)
        return ["dataset=table", f"dataset.path={tmp_path / 't.csv'}"] + MLP
    if case == "no_label_column":
        pd.DataFrame({"a": range(100), "b": range(100)}).to_csv(tmp_path / "t.csv", index=False)
        return ["dataset=table", f"dataset.path={tmp_path / 't.csv'}"] + MLP
    if case == "missing_values":
        pd.DataFrame({"a": [1.0, None] * 50, "label": [0, 1] * 50}).to_csv(tmp_path / "t.csv", index=False)
        return ["dataset=table", f"dataset.path={tmp_path / 't.csv'}"] + MLP
    if case == "image_of_another_size":
        args = make_image_folder(tmp_path)
        from PIL import Image

        Image.new("RGB", (9, 9)).save(tmp_path / "images" / "digit1" / "big.png")
        return args
    if case == "not_an_image":
        args = make_image_folder(tmp_path)
        (tmp_path / "images" / "digit2" / "broken.png").write_bytes(b"not a png")
        return args
    raise AssertionError(case)


@pytest.mark.parametrize("case, fragment", [
    ("missing_file", "no such file"),
    ("wrong_shape", "features must be numbers of shape"),
    ("length_mismatch", "177 labels"),
    ("labels_out_of_range", "labels must be in 0..1"),
    ("nan_features", "features hold NaN or Inf"),
    ("float_labels", "labels must be integers"),
    ("no_x_y", "must be an .npz with arrays x and y"),
    ("fewer_than_batch", "larger than the training split"),
    ("path_and_splits", "give dataset.path"),
    ("labels_of_another_length", "has 1 labels for 2 input_ids"),
    ("left_padding", "right padding"),
    ("unsupervised_test_sequence", "has no supervised next token"),
    ("tokens_over_vocab", "dataset.vocab_size=50"),
    ("non_numeric_column", "column 'a' is not numeric"),
    ("no_label_column", "has no column 'label'"),
    ("missing_values", "column 'a' has missing values"),
    ("image_of_another_size", "resize the images to one size"),
    ("not_an_image", "broken.png is not a readable image"),
])
def test_a_bad_data_file_is_one_line(cli, tmp_path, case, fragment):
    args = _bad_case(tmp_path, case)
    code, _, err = cli("train", *args, f"out_dir={tmp_path / 'run'}")
    assert code == 2 and fragment in err and err.count("magic: error") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
