"""Config composition, validation and the CLI's one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from magic_cli.config import ConfigError, conf_dir, load, parse_test_ids

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
YAML_FILES = sorted(conf_dir().rglob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    config = load([f"experiment={name}"])
    assert config.name == name
    assert config.out_dir == f"runs/{name}"
    lines = (conf_dir() / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith(f"# magic train experiment={name}"), "the file must start with its command"


def test_default_config_names_the_run_default():
    config = load([])
    assert (config.name, config.out_dir) == ("default", "runs/default")
    assert config.dataset["name"] == "digits" and config.model["name"] == "mlp"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(conf_dir())))
def test_every_config_field_has_a_comment(path):
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#") or text.startswith("- ") or text == "defaults:":
            continue
        if text.endswith(":"):  # a mapping header such as `schedule:`
            continue
        assert "#" in text, f"{path.name}: field without a comment: {text!r}"


@pytest.mark.parametrize("overrides, fragment", [
    (["optimizer=nope"], "choose one of: adam, sgd"),
    (["optimizer.lrr=1"], "unknown key optimizer.lrr; valid keys under optimizer: name, lr"),
    (["model.width=3"], "unknown key model.width"),
    (["optimizer.lr=-1"], "optimizer.lr must be > 0"),
    (["dtype=float16"], "dtype='float16' is not valid"),
    (["checkpoint=replay", "checkpoint.k=1"], "checkpoint.k must be >= 2"),
    (["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=true"], "optimizer.nesterov needs"),
    (["train.data_weights=/no/such.npy"], "train.data_weights: no such file"),
    (["model=logreg", "+model.hidden=[3]"], "unknown key model.hidden for model=logreg"),
])
def test_bad_config_names_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load(overrides)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args", [
    ["train", "optimizer=nope"],
    ["train", "optimizer.lrr=1"],
    ["train", "--bogus"],
    ["config", "show", "dataset=nope"],
])
def test_cli_errors_are_one_line_exit_2(cli, args):
    code, out, err = cli(*args)
    assert code == 2
    assert err.startswith("magic: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_unknown_option_lists_valid_options(cli):
    code, _, err = cli("attribute", "--test-ids", "0", "--bogus")
    assert code == 2 and "--bogus" in err and "--test-ids" in err


def test_config_show_prints_resolved_yaml(cli):
    code, out, _ = cli("config", "show", "seed=7", "experiment=digits_mlp")
    assert code == 0
    assert "seed: 7" in out and "out_dir: runs/digits_mlp" in out


def test_config_dir_adds_a_users_configs(cli, tmp_path):
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "mine.yaml").write_text("name: sgd\nlr: 0.123\nmomentum: 0.5\n")
    code, out, err = cli("config", "show", "optimizer=mine", "--config-dir", str(tmp_path))
    assert code == 0, err
    assert "lr: 0.123" in out


def test_fingerprint_depends_on_training_keys_only():
    base = load([])
    assert load(["attribute.batch_size=3"]).fingerprint() == base.fingerprint()
    assert load(["ground_truth.num_subsets=5"]).fingerprint() == base.fingerprint()
    assert load(["seed=1"]).fingerprint() != base.fingerprint()
    assert load(["optimizer.lr=0.01"]).fingerprint() != base.fingerprint()


def test_data_weights_fingerprint_hashes_the_file_content(tmp_path):
    import numpy as np

    path = tmp_path / "w.npy"
    np.save(path, np.ones(3))
    first = load([f"train.data_weights={path}"]).fingerprint()
    np.save(path, np.zeros(3))
    assert load([f"train.data_weights={path}"]).fingerprint() != first


@pytest.mark.parametrize("spec, expected", [
    ("3", [3]), ("0,5,9", [0, 5, 9]), ("0:5", [0, 1, 2, 3, 4]), ("0:10:4", [0, 4, 8]), ("2,2,1", [2, 1]),
])
def test_parse_test_ids(spec, expected):
    assert parse_test_ids(spec, 20) == expected


def test_parse_test_ids_from_file(tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text("4\n# a comment\n7\n\n")
    assert parse_test_ids(f"@{f}", 20) == [4, 7]


@pytest.mark.parametrize("spec", ["20", "0:21", "x", "0:5:0", "-1", "@/no/such/file", ""])
def test_parse_test_ids_rejects(spec):
    with pytest.raises(ConfigError):
        parse_test_ids(spec, 20)


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from magic_cli.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert out.stdout.strip().endswith("False")


@pytest.mark.parametrize("overrides, fragment", [
    (["name=.."], "name must be a word"),
    (["name=a/b"], "name must be a word"),
])
def test_run_names_are_plain_words(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load(overrides)


@pytest.mark.parametrize("overrides, fragment", [
    (["model.hidden=128"], "model.hidden must be a list"),
    (["model=transformer", "dataset=text_chars", "model.n_heads=0"], "model.n_heads must be a positive"),
    (["model=cnn_small", "dataset=digits_images", "model.channels=[]"], "model.channels must be positive"),
    (["dataset.test_fraction=abc"], "dataset.test_fraction must be in"),
])
def test_bad_model_and_dataset_values_are_one_line(cli, tmp_path, overrides, fragment):
    code, _, err = cli("train", *overrides, f"out_dir={tmp_path}")
    assert code == 2 and fragment in err and err.count("\n") == 1, err


def test_config_dir_replaces_a_packaged_file_of_the_same_name(cli, tmp_path):
    """The user's folder is searched first: its optimizer/adam.yaml wins over the packaged one."""
    packaged = (conf_dir() / "optimizer" / "adam.yaml").read_text()
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "adam.yaml").write_text(packaged.replace("lr: 0.001", "lr: 0.5"))
    assert load([], str(tmp_path)).optimizer.lr == 0.5
    assert load([]).optimizer.lr == 0.001
    (tmp_path / "config.yaml").write_text((conf_dir() / "config.yaml").read_text().replace("seed: 0", "seed: 9"))
    assert load([], str(tmp_path)).seed == 9  # even the root config


@pytest.mark.parametrize("overrides, fragment", [
    (["optimizer=sgd", "+optimizer.eps_root=1e-8"], "optimizer.eps_root does not apply to optimizer=sgd"),
    (["optimizer=sgd", "+optimizer.betas=[0.9,0.99]"], "optimizer.betas does not apply to optimizer=sgd"),
    (["+optimizer.momentum=0.9"], "optimizer.momentum does not apply to optimizer=adam"),
    (["+checkpoint.k=3"], "checkpoint.k applies only to checkpoint=replay"),
    (["checkpoint=sqrt", "+checkpoint.k=3"], "checkpoint.k applies only to checkpoint=replay"),
    (["optimizer.lr=inf"], "optimizer.lr must be a finite number"),
    (["optimizer.eps_root=nan"], "optimizer.eps_root must be a finite number"),
    (["out_dir="], "out_dir must name a run folder"),
])
def test_options_that_do_not_apply_or_are_not_finite_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load(overrides)


def test_checkpoint_strategy_is_not_part_of_the_fingerprint():
    """Every strategy gives bit-identical scores; a finished run derives the others' checkpoints."""
    base = load([]).fingerprint()
    assert load(["checkpoint=sqrt"]).fingerprint() == base
    assert load(["checkpoint=replay", "checkpoint.k=3"]).fingerprint() == base
