"""A researcher's own code: torch.nn.Module models through a plugin the config names.

Exactness of the adapter (unrolled autograd, finite differences, an independent nn.Module of
the built-in CNN), freezing, initialisation from a file, and every bad plugin as one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, assert_eager_step_bit_equal, assert_taps_give_per_example_gradients, unrolled_scores

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_resnet"
TOY = Path(__file__).parent / "plugins" / "toy_modules.py"
CNN_MODULE = Path(__file__).parent / "plugins" / "cnn_small_module.py"
# The example plugin, shrunk: width 2, one epoch of 22 steps, float64.
RESNET = ["--config-dir", str(EXAMPLE / "conf"), "experiment=digits_resnet", f"plugins=[{EXAMPLE / 'plugin.py'}]",
          "model.width=2", "train.epochs=1", "dtype=float64"]
MLP = [o for o in TINY if not o.startswith("model.hidden")] + [
    f"plugins=[{TOY}]", "model.name=mlp_module", "~model.activation", "model.hidden=8"]


def _overrides(args):
    """The Hydra overrides of a CLI argument list (without --config-dir DIR)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--config-dir":
            skip = True
        else:
            out.append(a)
    return out


def _problem(args):
    from magic_cli.config import load
    from magic_cli.determinism import enable_determinism
    from magic_cli.stages.assemble import assemble

    config_dir = args[args.index("--config-dir") + 1] if "--config-dir" in args else None
    config = load(_overrides(args), config_dir)
    enable_determinism(config.device, config.threads)
    return assemble(config)


def _attribute(cli, args, out, ids="0,2"):
    code, _, err = cli("train", *args, f"out_dir={out}")
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", ids, *args, f"out_dir={out}")
    assert code == 0, err
    return np.load(out / "attribute" / "magic" / "scores.npy")  # (N, J)


def test_example_plugin_reruns_are_bit_identical(cli, tmp_path):
    for name in ("a", "b"):
        assert cli("train", *RESNET, f"out_dir={tmp_path / name}")[0] == 0
    for f in ("final.pt", "checkpoints_all/state_000003.pt", "outputs_loss.npy"):
        assert (tmp_path / "a" / "train" / f).read_bytes() == (tmp_path / "b" / "train" / f).read_bytes()
    assert cli("train", *RESNET, "seed=1", f"out_dir={tmp_path / 'c'}")[0] == 0
    assert (tmp_path / "c" / "train" / "final.pt").read_bytes() != (tmp_path / "a" / "train" / "final.pt").read_bytes()


def test_example_plugin_scores_equal_unrolled_autograd_and_finite_differences(cli, tmp_path):
    scores = _attribute(cli, RESNET, tmp_path)
    problem = _problem(RESNET)
    want = unrolled_scores(problem, [0, 2]).numpy().T
    assert np.abs(scores - want).max() <= 1e-10 * np.abs(want).max()
    h = 1e-4
    for i in np.random.default_rng(0).choice(problem.dataset.n_train, size=2, replace=False):
        e = torch.zeros(problem.dataset.n_train, dtype=problem.dtype)
        e[i] = h
        plus = problem.outputs(problem.run(weights=problem.weights + e)[0])["loss"]
        minus = problem.outputs(problem.run(weights=problem.weights - e)[0])["loss"]
        np.testing.assert_allclose(scores[i], (plus - minus)[[0, 2]] / (2 * h), rtol=1e-5,
                                   atol=1e-6 * np.abs(scores).max())


@pytest.mark.parametrize("args", [RESNET, MLP], ids=["resnet", "mlp"])
def test_eager_step_of_a_module_is_bit_equal_to_the_transformable_step(args):
    assert_eager_step_bit_equal(_problem(args))


def test_batch_norm_running_statistics_are_returned_not_written():
    problem = _problem(RESNET)
    state = problem.init_state()
    before = {k: v.clone() for k, v in state.buffers.items()}
    new = problem.step(state, 0)
    assert all(torch.equal(state.buffers[k], before[k]) for k in before)  # nothing updated in place
    assert not torch.equal(new.buffers["stem.1.running_mean"], before["stem.1.running_mean"])
    assert float(new.buffers["stem.1.num_batches_tracked"]) == 1.0


def test_an_nn_module_of_the_built_in_cnn_gives_its_scores(cli, tmp_path):
    """Two independent code paths: the built-in pure cnn_small and the same network as an
    nn.Module (initialised from the built-in's tensors) agree to float32 rounding."""
    base = ["dataset=digits_images", "model=cnn_small", "model.channels=[3,4]", "train.epochs=2",
            "train.batch_size=64", "optimizer.lr=0.003"]
    built_in = _problem(base)
    state = built_in.init_state()
    torch.save({**state.params, **state.buffers}, tmp_path / "init.pt")
    module = base[:2] + [f"plugins=[{CNN_MODULE}]", "model.name=cnn_small_module", "~model.activation", "~model.pool",
                         "~model.head_scale", f"+model.init_from={tmp_path / 'init.pt'}"] + base[2:]
    a = _attribute(cli, base, tmp_path / "built_in", "0:4")
    b = _attribute(cli, module, tmp_path / "module", "0:4")
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    assert np.abs(a).max() > 0


def test_kfac_taps_of_a_module_are_the_built_in_models(tmp_path):
    """Forward hooks on nn.Conv2d and nn.Linear tap what the built-in CNN taps: EK-FAC gives the
    built-in's scores (float64); and on the ResNet example every tapped layer's per-token outer
    products are its per-example gradients."""
    from magic_cli.core import baselines

    base = ["dataset=digits_images", "model=cnn_small", "model.channels=[3,4]", "train.epochs=1",
            "train.batch_size=64", "dtype=float64"]
    built_in = _problem(base)
    torch.save({**built_in.init_state().params, **built_in.init_state().buffers}, tmp_path / "init.pt")
    module = _problem(base[:2] + [f"plugins=[{CNN_MODULE}]", "model.name=cnn_small_module", "~model.activation",
                                  "~model.pool", "~model.head_scale", f"+model.init_from={tmp_path / 'init.pt'}"]
                      + base[2:])
    options = {"damping": 1e-3, "relative_damping": False}
    a = baselines.ekfac(built_in, built_in.run()[0], [0, 3], "loss", options)
    b = baselines.ekfac(module, module.run()[0], [0, 3], "loss", options)
    assert float(a.abs().max()) > 0
    torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8 * float(a.abs().max()))
    resnet = _problem(RESNET)
    layers = assert_taps_give_per_example_gradients(resnet, resnet.run()[0])
    assert len(layers) == sum(1 for n in resnet.init_state().params if n.endswith(".weight")
                              and resnet.init_state().params[n].dim() in (2, 4))  # every conv and the head


def test_frozen_parameters_are_constants(cli, tmp_path):
    """trainable: only the last layer is trained; the scores are autograd's through the unrolled
    run, and the optimizer state holds the trainable tensors only."""
    args = MLP + ["+model.trainable=[2.*]"]
    scores = _attribute(cli, args, tmp_path)
    problem = _problem(args)
    assert set(problem.init_state().params) == {"2.weight", "2.bias"}
    assert set(problem.init_state().opt["mu"]) == {"2.weight", "2.bias"}
    want = unrolled_scores(problem, [0, 2]).numpy().T
    assert np.abs(scores - want).max() <= 1e-10 * np.abs(want).max()
    full = _problem(MLP)
    final, frozen_final = full.run()[0], problem.run()[0]
    assert not torch.equal(final.params["0.weight"], full.init_state().params["0.weight"])
    assert torch.equal(problem.model.frozen["0.weight"], full.init_state().params["0.weight"])
    assert "0.weight" not in frozen_final.params


def test_init_from_file_sets_the_initial_weights_and_enters_the_fingerprint(cli, tmp_path):
    from magic_cli.config import load

    problem = _problem(MLP)
    weights = {k: torch.full_like(v, 0.01) for k, v in problem.init_state().params.items()}
    torch.save(weights, tmp_path / "w.pt")
    args = MLP + [f"+model.init_from={tmp_path / 'w.pt'}"]
    loaded = _problem(args).init_state()
    assert all(torch.equal(loaded.params[k], weights[k]) for k in weights)
    first = load(args).fingerprint()
    torch.save({k: v * 2 for k, v in weights.items()}, tmp_path / "w.pt")
    assert load(args).fingerprint() != first


def test_init_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    problem = _problem(MLP)
    weights = {k: torch.full_like(v, 0.02).contiguous() for k, v in problem.init_state().params.items()}
    save_file(weights, str(tmp_path / "w.safetensors"))
    loaded = _problem(MLP + [f"+model.init_from={tmp_path / 'w.safetensors'}"]).init_state()
    assert all(torch.equal(loaded.params[k], weights[k]) for k in weights)


def test_a_changed_plugin_refuses_runs_trained_with_the_old_one(cli, tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(TOY.read_text())
    args = [o.replace(str(TOY), str(plugin)) for o in MLP]
    assert cli("train", *args, f"out_dir={tmp_path / 'run'}")[0] == 0
    plugin.write_text(TOY.read_text() + "\n# edited\n")
    code, _, err = cli("attribute", "--test-ids", "0", *args, f"out_dir={tmp_path / 'run'}")
    assert code == 2 and "plugins" in err and "different config" in err


def _bad(tmp_path, source: str) -> Path:
    path = tmp_path / "plugin.py"
    path.write_text(source)
    return path


@pytest.mark.parametrize("case, fragment", [
    ("missing", "plugins: no such file"),
    ("syntax", "failed to import (line 2): SyntaxError"),
    ("raises", "failed to import (line 3): RuntimeError: boom"),
    ("signature", "must be def f(input_shape, n_classes, *, option=default"),
    ("builtin", "'mlp' is built in"),
    ("module_name", "plugins: no module 'no_such_module_xyz'"),
    ("not_a_model", "returned int, which has no init/apply"),
])
def test_a_bad_plugin_is_one_line(cli, tmp_path, case, fragment):
    sources = {
        "syntax": "x = 1\ndef broken(:\n",
        "raises": "import math\n\nraise RuntimeError('boom')\n",
        "signature": "from magic_cli.plugins import register_module\n\n@register_module('f')\ndef f(shape):\n"
                     "    pass\n",
        "builtin": "from magic_cli.plugins import register_model\n\n@register_model('mlp')\n"
                   "def f(input_shape, n_classes):\n    pass\n",
        "not_a_model": "from magic_cli.plugins import register_model\n\n@register_model('three')\n"
                       "def three(input_shape, n_classes):\n    return 3\n",
    }
    spec = {"missing": str(tmp_path / "nope.py"), "module_name": "no_such_module_xyz"}.get(case)
    spec = spec or str(_bad(tmp_path, sources[case]))
    extra = ["model.name=three", "~model.hidden", "~model.activation"] if case == "not_a_model" else []
    code, _, err = cli("train", *TINY, f"plugins=[{spec}]", *extra, f"out_dir={tmp_path / 'run'}")
    assert code == 2 and fragment in err and err.count("magic: error") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, fragment", [
    (["model.name=returns_a_tensor"], "returned Tensor, not a torch.nn.Module"),
    (["model.name=wrong_output"], "magic needs logits (B, 3)"),
    (["model.name=with_dropout"], "Dropout(p=0.5)"),
    (["model.name=mlp_module", "+model.trainable=[nothing.*]"], "matches none of the model's parameters"),
    (["model.name=mlp_module", "+model.init_from=/no/such.pt"], "model.init_from: no such file"),
    (["model.name=mlp_module", "+model.width=3"], "unknown key model.width for model=mlp_module"),
])
def test_a_bad_module_is_one_line(cli, tmp_path, overrides, fragment):
    args = TINY + [f"plugins=[{TOY}]", "~model.activation", "~model.hidden", *overrides]
    code, _, err = cli("train", *args, f"out_dir={tmp_path / 'run'}")
    assert code == 2 and fragment in err and err.count("magic: error") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_init_from_of_the_wrong_shape_is_one_line(cli, tmp_path):
    torch.save({"0.weight": torch.zeros(3, 3)}, tmp_path / "w.pt")
    code, _, err = cli("train", *MLP, f"+model.init_from={tmp_path / 'w.pt'}", f"out_dir={tmp_path / 'run'}")
    assert code == 2 and "0.weight has shape (3, 3)" in err, err


def test_kfac_taps_refuse_what_they_cannot_cover_and_skip_tied_weights():
    """A tied weight under a Linear's name (its other use an embedding) is not tapped; a layer run
    twice in one forward, or fed a non-batch-first input, is one line; a module built in eval mode
    is switched to one mode throughout."""
    from torch import nn

    from magic_cli.errors import ConfigError
    from magic_cli.models.layers import Taps
    from magic_cli.models.torch_module import ModuleModel, _tap_hooks

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 5)
            self.emb = nn.Embedding(5, 4)
            self.emb.weight = self.head.weight
            self.mid = nn.Linear(4, 4)

        def forward(self, x):
            return self.head(self.mid(self.emb(x)))

    module, taps = Tied(), Taps(batch=2)
    params = dict(module.named_parameters())
    hooks = _tap_hooks(module, params, taps)
    module(torch.tensor([[1, 2], [3, 4]]))
    for hook in hooks:
        hook.remove()
    assert sorted(taps.offsets) == ["mid"]
    with pytest.raises(ConfigError, match="runs more than once"):
        taps.tap("mid", torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ConfigError, match="batch-first"):
        Taps(batch=2).tap("mid", torch.zeros(3, 2, 4), torch.zeros(3, 2, 4))

    def eval_bn(input_shape, n_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, n_classes)).eval()

    model = ModuleModel(eval_bn, (1, 8, 8), 10, {}, None, ("*",))
    assert all(m.training for m in model.module.modules())
