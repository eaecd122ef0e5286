"""Bad input at the edges of the readers, the plugin boundary and the config: one line on
stderr naming the key or the file, exit code 2, nothing written; the right result where the
input is valid. One test (or parameter) per case of the third bad-input round."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from test_faults import one_line_error

TOY = Path(__file__).parent / "plugins" / "toy_modules.py"
MLP_MODULE = [o for o in TINY if not o.startswith("model.hidden")] + [
    f"plugins=[{TOY}]", "model.name=mlp_module", "~model.activation", "model.hidden=8"]


def _refused(cli, tmp_path, args, *fragments, command=("train",)):
    out = tmp_path / "run"
    code, _, err = cli(*command, *args, f"out_dir={out}")
    one_line_error(code, err, *fragments)
    assert not out.exists(), "a refused command wrote a run folder"


def test_test_ids_file_that_is_not_text(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("train", *TINY, f"out_dir={out}")[0] == 0
    (tmp_path / "ids.bin").write_bytes(bytes(range(256)))
    code, _, err = cli("attribute", "--test-ids", f"@{tmp_path / 'ids.bin'}", *TINY, f"out_dir={out}")
    one_line_error(code, err, "--test-ids", "ids.bin", "not a UTF-8 text file")
    assert not (out / "attribute").exists()


def _npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez_compressed(path, x=rng.normal(size=(60, 4)), y=rng.integers(0, 3, 60))
    return path


@pytest.mark.parametrize("fmt", ["npz", "npy", "parquet", "jsonl", "image"])
def test_truncated_data_files(cli, tmp_path, fmt):
    rng = np.random.default_rng(0)
    if fmt == "npz":
        path, args = _npz(tmp_path), ["dataset=arrays"]
    elif fmt == "npy":
        path, args = tmp_path / "tokens.npy", ["dataset=token_ids", "model=transformer"]
        np.save(path, rng.integers(0, 9, size=(40, 6)))
    elif fmt == "parquet":
        import pandas as pd

        path, args = tmp_path / "t.parquet", ["dataset=table"]
        pd.DataFrame({"a": rng.normal(size=40), "label": rng.integers(0, 2, 40)}).to_parquet(path)
    elif fmt == "jsonl":
        path, args = tmp_path / "t.jsonl", ["dataset=token_ids", "model=transformer"]
        path.write_text("".join(json.dumps({"input_ids": rng.integers(0, 9, 6).tolist()}) + "\n" for _ in range(40)))
    else:
        from PIL import Image

        path, args = tmp_path / "images", ["dataset=image_folder", "model=cnn_small",
                                           f"dataset.cache_dir={tmp_path / 'cache'}"]
        for c in ("a", "b"):
            (path / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path / c / f"{i}.png")
        victim = path / "a" / "3.png"
        victim.write_bytes(victim.read_bytes()[:40])
    if fmt != "image":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3] if fmt != "jsonl" else data[:-5])
    base = [o for o in TINY if o.startswith(("train.", "dtype"))]
    _refused(cli, tmp_path, base + args + [f"dataset.path={path}"], "dataset", "not a")


def test_safetensors_init_from_truncated(cli, tmp_path):
    from safetensors.torch import save_file

    save_file({"0.weight": torch.zeros(8, 13)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-7])
    _refused(cli, tmp_path, MLP_MODULE + [f"model.init_from={tmp_path / 'w.safetensors'}"],
             "model.init_from", "w.safetensors", "not a readable weights file")


@pytest.mark.parametrize("case, fragments", [
    ("huge", ("t.jsonl:2", "outside 0..2**63-1")),
    ("negative", ("t.jsonl:2", "input_ids holds -3")),
    ("negative_label", ("t.jsonl:2", "labels holds -7", "-100")),
    ("float", ("t.jsonl:2", "holds 1.5")),
    ("string", ("t.jsonl:2", "holds 'a'")),
    ("nested", ("t.jsonl:2", "holds [1, 2]")),
    ("bool", ("t.jsonl:2", "holds True")),
    ("beyond_vocab", ("t.jsonl", "beyond any vocabulary")),
])
def test_token_jsonl_values(cli, tmp_path, case, fragments):
    bad = {"huge": {"input_ids": [1, 2 ** 64, 3]}, "negative": {"input_ids": [1, -3, 2]},
           "negative_label": {"input_ids": [1, 2, 3], "labels": [1, -7, 3]}, "float": {"input_ids": [1, 1.5, 3]},
           "string": {"input_ids": [1, "a", 3]}, "nested": {"input_ids": [[1, 2], 3]},
           "bool": {"input_ids": [1, True, 3]}, "beyond_vocab": {"input_ids": [1, 2 ** 40, 3]}}[case]
    rows = [{"input_ids": [1, 2, 3, 4]}, bad] + [{"input_ids": [4, 3, 2, 1]}] * 20
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [o for o in TINY if o.startswith(("train.", "dtype"))]
    _refused(cli, tmp_path, base + ["dataset=token_ids", "model=transformer", f"dataset.path={tmp_path / 't.jsonl'}"],
             *fragments)


def _gpt2_folder(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=12, bos_token_id=None,
                        eos_token_id=None)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _lm_args(tmp_path, folder):
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 12, size=(24, 6)))
    return ["dataset=token_ids", f"dataset.path={tmp_path / 'tokens.npy'}", "model=hf_causal_lm",
            f"model.path={folder}", "train.epochs=1", "train.batch_size=8"]


def test_hf_truncated_safetensors(cli, tmp_path):
    folder = _gpt2_folder(tmp_path / "gpt2")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _refused(cli, tmp_path, _lm_args(tmp_path, folder), "model.path", "model.safetensors", "not a readable")


class _Payload:  # any Python object: a pickle that torch's weights_only refuses
    pass


def test_hf_pickled_objects_in_pytorch_model_bin(cli, tmp_path):
    folder = _gpt2_folder(tmp_path / "gpt2")
    (folder / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": torch.zeros(12, 8), "payload": _Payload()}, folder / "pytorch_model.bin")
    _refused(cli, tmp_path, _lm_args(tmp_path, folder), "model.path", "pytorch_model.bin",
             "pickled Python objects", "only tensor data")


def test_lora_target_that_matches_nothing(cli, tmp_path):
    folder = _gpt2_folder(tmp_path / "gpt2")
    args = _lm_args(tmp_path, folder) + ["+model.lora={r: 2, alpha: 4, targets: [c_attn, nope]}"]
    _refused(cli, tmp_path, args, "model.lora.targets", "'nope'", "c_attn", "c_fc")


@pytest.mark.parametrize("returns, fragments", [
    ("(torch.zeros(4, 2), torch.zeros(4))", ("returned tuple", "magic_cli.data.Dataset")),
    ("Dataset('d', torch.zeros(8, 2), torch.zeros(8), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 2)",
     ("y_train must be class ids of dtype torch.long",)),
    ("Dataset('d', torch.zeros(8, 2), torch.zeros(7, dtype=torch.long), torch.zeros(4, 2), "
     "torch.zeros(4, dtype=torch.long), 2)", ("x_train (8, 2) and y_train (7,)",)),
    ("Dataset('d', torch.zeros(8, 2), torch.full((8,), 5), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 2)",
     ("labels outside 0..1",)),
    ("Dataset('d', torch.zeros(8, 2), torch.zeros(8, dtype=torch.long), torch.zeros(4, 3), "
     "torch.zeros(4, dtype=torch.long), 2)", ("differ in example shape",)),
])
def test_dataset_plugin_result_is_checked_at_the_boundary(cli, tmp_path, returns, fragments):
    plugin = tmp_path / "data_plugin.py"
    plugin.write_text("import torch\nfrom magic_cli.data import Dataset\nfrom magic_cli.plugins import "
                      f"register_dataset\n\n@register_dataset('mine')\ndef mine(seed):\n    return {returns}\n")
    args = [o for o in TINY if o != "dataset=wine"] + [f"plugins=[{plugin}]", "dataset=wine", "dataset.name=mine",
                                                      "~dataset.test_fraction"]
    _refused(cli, tmp_path, args, "dataset=mine", "(mine in", "data_plugin.py", *fragments)


@pytest.mark.parametrize("code", [0, 3, "'bye'"])
def test_plugin_that_exits_while_imported(cli, tmp_path, code):
    plugin = tmp_path / "exits.py"
    plugin.write_text(f"import sys\nsys.exit({code})\n")
    _refused(cli, tmp_path, TINY + [f"plugins=[{plugin}]"], "plugins", "exits.py", f"sys.exit({code})",
             "while being imported")


def test_all_zero_data_weights(cli, tmp_path):
    np.save(tmp_path / "w.npy", np.zeros(142))
    _refused(cli, tmp_path, TINY + [f"train.data_weights={tmp_path / 'w.npy'}"], "train.data_weights",
             "every weight", "is 0")


def test_ground_truth_subset_that_drops_every_weighted_example(cli, tmp_path):
    w = np.zeros(142)
    w[0] = 1.0
    np.save(tmp_path / "w.npy", w)
    out = tmp_path / "run"
    args = TINY + [f"train.data_weights={tmp_path / 'w.npy'}", "ground_truth.drop_fractions=[0.5]",
                   "ground_truth.num_subsets=8", f"out_dir={out}"]
    assert cli("train", *args)[0] == 0
    code, _, err = cli("retrain-ground-truth", *args)
    one_line_error(code, err, "ground truth", "weight", "drop")
    assert not list((out / "ground_truth").rglob("subset_*")) if (out / "ground_truth").exists() else True


def test_table_with_a_header_and_no_rows(cli, tmp_path):
    (tmp_path / "t.csv").write_text("a,b,label\n")
    base = [o for o in TINY if o.startswith(("train.", "dtype"))]
    _refused(cli, tmp_path, base + ["dataset=table", f"dataset.path={tmp_path / 't.csv'}"], "t.csv", "has no rows")


def test_data_weights_as_a_text_file(cli, tmp_path):
    weights = np.r_[np.ones(100), np.full(42, 0.5)]
    (tmp_path / "w.txt").write_text("# one weight a line\n" + "\n".join(f"{v:g}" for v in weights) + "\n")
    np.save(tmp_path / "w.npy", weights)
    outs = []
    for name in ("w.txt", "w.npy"):
        out = tmp_path / name.replace(".", "_")
        code, _, err = cli("train", *TINY, f"train.data_weights={tmp_path / name}", f"out_dir={out}")
        assert code == 0, err
        outs.append(np.load(out / "train" / "outputs_loss.npy"))
    assert np.array_equal(outs[0], outs[1])
    (tmp_path / "bad.txt").write_text("1\n1\nheavy\n")
    _refused(cli, tmp_path, TINY + [f"train.data_weights={tmp_path / 'bad.txt'}"], "bad.txt:3", "not a number")


def test_init_from_and_trainable_for_any_module_model_without_plus(cli, tmp_path):
    from magic_cli.config import load

    torch.save({"0.weight": torch.ones(8, 13)}, tmp_path / "w.pt")
    config = load(MLP_MODULE + [f"model.init_from={tmp_path / 'w.pt'}", "model.trainable=[2.*]"])
    assert config.model["init_from"] == str(tmp_path / "w.pt") and config.model["trainable"] == ["2.*"]


def test_unknown_key_lists_the_keys_of_the_chosen_model(cli, tmp_path):
    _refused(cli, tmp_path, MLP_MODULE + ["model.widht=3"], "unknown key model.widht", "model=mlp_module",
             "hidden", "init_from", "trainable")
    code, _, err = cli("train", *TINY, "optimizer=sgd", "optimizer.foo=1", f"out_dir={tmp_path / 'run'}")
    one_line_error(code, err, "unknown key optimizer.foo", "momentum")
    # a misspelt top-level key: its own override is left out when listing the keys (no recursion)
    code, _, err = cli("train", *TINY, "experimnt=digits_mlp", f"out_dir={tmp_path / 'run'}")
    one_line_error(code, err, "unknown key experimnt", "valid keys: dataset, model")


def test_tilde_in_path_values(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    from magic_cli.config import load

    assert load(TINY + ["out_dir=~/runs/x"]).out_dir == str(tmp_path / "runs" / "x")
    np.save(tmp_path / "w.npy", np.ones(142))
    (tmp_path / TOY.name).write_text(TOY.read_text())
    config = load(TINY + ["out_dir=~/r", "train.data_weights=~/w.npy", f"plugins=[~/{TOY.name}]"])
    assert config.train.data_weights == str(tmp_path / "w.npy")
    assert config.plugins == (str(tmp_path / TOY.name),)
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "home.yaml").write_text("# @package _global_\nout_dir: ~/from_yaml\ntrain:\n  data_weights: ~/w.npy\n")
    config = load(TINY + ["experiment=home"], str(tmp_path / "conf"))
    assert config.out_dir == str(tmp_path / "from_yaml") and config.train.data_weights == str(tmp_path / "w.npy")


@pytest.mark.parametrize("override", ["hydra.run.dir=/tmp/x", "hydra.job.chdir=true", "+hydra.verbose=true"])
def test_hydra_overrides_are_refused(cli, tmp_path, override):
    _refused(cli, tmp_path, TINY + [override], "hydra", "out_dir is where magic writes")


def test_truncated_npz_keeps_no_zip_error(tmp_path):
    """The reader reads every member: a damaged member cannot fail later, at first use."""
    from magic_cli.errors import ConfigError
    from magic_cli.readers import read_npz

    path = _npz(tmp_path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    assert names
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match="not a readable .npz"):
        read_npz(path, "dataset")
