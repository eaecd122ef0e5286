"""attribute.compile: the batched backward-over-backward through torch.compile."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY
from test_faults import one_line_error


def _scores(cli, run, *extra):
    code, _, err = cli("train", *TINY, f"out_dir={run}", "checkpoint=sqrt")
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", "0:6", *TINY, f"out_dir={run}", "attribute.batch_size=4", *extra)
    assert code == 0, err
    return (np.load(run / "attribute" / "magic" / "scores.npy"),
            json.loads((run / "attribute" / "magic" / "scores.json").read_text()))


def test_compiled_scores_are_exact_bit_identical_across_strategies_and_kept_apart(cli, tmp_path):
    eager, _ = _scores(cli, tmp_path / "eager", "checkpoint=sqrt")
    # groups of 4 and 2 ids: two shapes compiled in one command
    compiled, side = _scores(cli, tmp_path / "run", "checkpoint=sqrt", "attribute.compile=true")
    assert np.abs(compiled - eager).max() <= 1e-12 * np.abs(eager).max()  # float64: the same metagradient
    again, _ = _scores(cli, tmp_path / "run", "checkpoint=all", "attribute.compile=true", "--overwrite")
    assert again.tobytes() == compiled.tobytes()  # every strategy, every rerun: the same bits
    assert side["settings"] != _scores(cli, tmp_path / "eager", "checkpoint=sqrt")[1]["settings"]
    last = json.loads((tmp_path / "run" / "attribute" / "magic" / "last_run.json").read_text())
    assert last["compiled"] is True and 0 < last["compile_seconds"] < last["seconds"]
    assert side["cost"]["compile"] > 0
    code, _, err = cli("attribute", "--test-ids", "0:6", *TINY, f"out_dir={tmp_path / 'run'}",
                       "attribute.compile=false")
    one_line_error(code, err, "holds scores computed with other settings")  # never mixed with eager bits


@pytest.mark.parametrize("message, shown", [
    ("InductorError: C++ compile error\nmore lines", "InductorError: C++ compile error"),
    ("backend='inductor' raised:\nNotImplementedError: Cannot access storage of TensorWrapper\n\nSet TORCH...",
     "NotImplementedError: Cannot access storage of TensorWrapper"),  # what the nn.Module adapter gets
])
def test_a_compiler_failure_is_one_line(cli, tmp_path, monkeypatch, message, shown):
    import torch

    def broken(fn, **options):
        def run(*args):
            raise RuntimeError(message)
        return run

    monkeypatch.setattr(torch, "compile", broken)
    code, _, err = cli("train", *TINY, f"out_dir={tmp_path}")
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", "0:4", *TINY, f"out_dir={tmp_path}", "attribute.compile=true")
    one_line_error(code, err, f"attribute.compile: torch.compile failed on this model (RuntimeError: {shown})",
                   "run with attribute.compile=false")
    assert not (tmp_path / "attribute" / "magic" / "scores.npy").exists()


@pytest.mark.parametrize("case", ["bn_plugin", "gpt2_lora", pytest.param("cnn_plugin", marks=pytest.mark.slow),
                                  pytest.param("gpt2_tied", marks=pytest.mark.slow),
                                  pytest.param("resnet_plugin", marks=pytest.mark.slow)])  # ~1 min each, compiling
def test_compiled_equals_eager_on_modules_and_hugging_face_models(cli, tmp_path, case):
    """The nn.Module adapter (an MLP and a CNN plugin and the ResNet example: BatchNorm, whose running
    statistics come back as buffers) and the Hugging Face adapter (tied embeddings; LoRA, whose
    base weights are frozen constants) compile as one graph; float64 scores agree with eager ones
    to rounding."""
    from test_hf import _args
    from test_plugins import CNN_MODULE, MLP, RESNET

    cnn = ["dataset=digits_images", "dataset.test_fraction=0.9", f"plugins=[{CNN_MODULE}]", "model=cnn_small",
           "model.name=cnn_small_module", "~model.activation", "~model.pool", "~model.head_scale",
           "model.channels=[2,3]", "train.epochs=1", "train.batch_size=32", "dtype=float64"]
    bn = [*MLP, "model.name=mlp_bn_module"]  # an MLP with BatchNorm1d on wine
    args = {"bn_plugin": bn, "cnn_plugin": cnn, "resnet_plugin": RESNET}.get(case) or _args(tmp_path) + (
        ["model.lora={r: 2, alpha: 4, targets: [c_attn]}"] if case == "gpt2_lora" else [])
    run = [*args, f"out_dir={tmp_path / 'run'}"]
    code, _, err = cli("train", *run)
    assert code == 0, err
    scores = []
    for extra in ([], ["attribute.compile=true", "--overwrite"]):
        code, _, err = cli("attribute", "--test-ids", "0:3", *run, "attribute.batch_size=3", *extra)
        assert code == 0, err
        scores.append(np.load(tmp_path / "run" / "attribute" / "magic" / "scores.npy"))
    eager, compiled = scores
    assert np.abs(eager).max() > 0
    assert np.abs(compiled - eager).max() <= 1e-12 * np.abs(eager).max()


def test_auto_compiles_when_training_reaches_the_flop_threshold(monkeypatch):
    """attribute.compile=auto is a function of the config: training's matmul FLOPs (forward and
    backward of one step, times the steps) against metagrad.AUTO_COMPILE_FLOPS."""
    from conftest import problem_for

    from magic_cli.config import load
    from magic_cli.core import metagrad
    from magic_cli.stages.attribute import resolve_compile, settings_of

    problem = problem_for(TINY)  # wine: 13 features -> 8 -> 3 classes, batches of 16, 16 steps
    # forward 2*B*in*out per layer; backward: the weight gradient, and the input gradient except the first layer's
    want = (3 * 2 * 16 * 8 * 3 + 2 * 2 * 16 * 13 * 8) * problem.total_steps
    assert metagrad.training_flops(problem) == want
    config = load(TINY)
    assert config.attribute.compile == "auto"
    assert resolve_compile(config, problem).attribute.compile is False
    monkeypatch.setattr(metagrad, "AUTO_COMPILE_FLOPS", want)
    chosen = resolve_compile(config, problem)
    assert chosen.attribute.compile is True and settings_of(chosen)["options"] == {"compile": True}
    trak = load([*TINY, "attribute.method=trak"])
    assert resolve_compile(trak, problem).attribute.compile is False  # the baselines never compile
    for value in ("true", "false"):
        chosen = resolve_compile(load([*TINY, f"attribute.compile={value}"]), problem)
        assert chosen.attribute.compile is (value == "true")


def test_auto_keeps_the_choice_the_folder_holds(cli, tmp_path, monkeypatch):
    """Scores computed eagerly stay usable under auto even where the rule now says compile (the
    folder's choice wins for the same training run); the refusal of other settings names
    attribute.compile."""
    from magic_cli.core import metagrad

    args = [*TINY, f"out_dir={tmp_path}"]
    assert cli("train", *args)[0] == 0
    code, _, err = cli("attribute", "--test-ids", "0:2", *args, "attribute.compile=false")
    assert code == 0, err
    monkeypatch.setattr(metagrad, "AUTO_COMPILE_FLOPS", 1.0)  # the rule would compile now
    code, _, err = cli("attribute", "--test-ids", "2:4", *args)
    assert code == 0, err
    side = json.loads((tmp_path / "attribute" / "magic" / "scores.json").read_text())
    assert side["test_ids"] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "attribute" / "magic" / "last_run.json").read_text())["compiled"] is False
    code, _, err = cli("attribute", "--test-ids", "0:2", *args, "attribute.compile=true")
    one_line_error(code, err, "holds scores computed with other settings", "attribute.compile")
