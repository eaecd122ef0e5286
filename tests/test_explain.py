"""`magic explain`: the top proponents and opponents are the most negative and most positive
scores, drawn as the data they are; --verify retrains without them and the measured change of
the test loss follows the prediction; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY
from test_faults import one_line_error

import magic_cli
from magic_cli.render import gallery_png, image_of, kind_of, text_of

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "run"
    cfg = magic_cli.compose([*TINY, f"out_dir={out}"])
    magic_cli.train(cfg)
    magic_cli.attribute(cfg, test_ids="0:3")
    return cfg, out


def test_proponents_and_opponents_are_the_extreme_scores(tiny_run, cli):
    cfg, out = tiny_run
    code, stdout, err = cli("explain", "--test-ids", "0,2", "--k", "3", *TINY, f"out_dir={out}")
    assert code == 0, err
    assert "dropping a proponent is predicted to raise the loss" in stdout
    scores = np.load(out / "attribute" / "magic" / "scores.npy")  # (N, 3)
    rows = json.loads((out / "report" / "explain" / "magic.json").read_text())["rows"]
    for j in (0, 2):
        pro = [r["train_id"] for r in rows if r["test_id"] == j and r["kind"] == "proponent"]
        opp = [r["train_id"] for r in rows if r["test_id"] == j and r["kind"] == "opponent"]
        assert pro == list(np.argsort(scores[:, j], kind="stable")[:3])  # most negative: dropping raises the loss
        assert opp == list(np.argsort(-scores[:, j], kind="stable")[:3])
        assert (out / "report" / "explain" / f"magic_{j}.png").read_bytes().startswith(PNG)
    frame = magic_cli.load_run(out).explain(0, k=3)  # the read API: the same picks, with the drawn labels
    assert list(frame.train_id) == [r["train_id"] for r in rows if r["test_id"] == 0]
    assert list(frame.kind) == ["proponent"] * 3 + ["opponent"] * 3 and frame.label.notna().all()
    text = (out / "report" / "explain" / "magic.md").read_text()
    assert "**proponent**" in text and "magic_0.png" in text and "alcohol=" in text  # wine's columns, raw values


def test_verify_retrains_and_the_change_follows_the_prediction(tiny_run):
    cfg, out = tiny_run
    result = magic_cli.explain(cfg, test_ids=[1], k=4, verify=True)
    assert result.retrained == 9  # 3 kinds x k = 1, 4, 16 (N = 142: 64 is more than a quarter)
    checks = {(c.kind, c.k): c for c in result.checks}
    first = checks[("proponents", 1)]
    assert first.predicted > 0 and 0.5 < first.ratio < 2  # exact to first order: one example barely bends it
    for k in (1, 4, 16):
        assert checks[("proponents", k)].actual > abs(checks[("random", k)].actual)
        assert checks[("opponents", k)].actual < checks[("proponents", k)].actual
    again = magic_cli.explain(cfg, test_ids=[1], k=4, verify=True)  # resumable: every retraining is on disk
    assert again.retrained == 0 and again.checks == result.checks


def test_bad_input_is_one_line(tiny_run, cli):
    cfg, out = tiny_run
    one_line_error(*cli("explain", "--test-ids", "7", *TINY, f"out_dir={out}")[::2], "test id 7 has no magic scores",
                   "magic attribute")
    one_line_error(*cli("explain", "--test-ids", "0", "--k", "500", *TINY, f"out_dir={out}")[::2], "--k 500",
                   "142 training examples")
    one_line_error(*cli("explain", "--test-ids", "0", "--method", "trak", *TINY, f"out_dir={out}")[::2], "trak")
    one_line_error(*cli("explain", "--test-ids", "0", "--k", "0", *TINY, f"out_dir={out}")[::2], "--k must be >= 1")


def test_digits_are_drawn_as_digits(tmp_path):
    cfg = magic_cli.compose(["train.epochs=1", f"out_dir={tmp_path / 'run'}"])  # the default: digits, an MLP
    magic_cli.train(cfg)
    magic_cli.attribute(cfg, test_ids="0")
    result = magic_cli.explain(cfg, test_ids="0", k=2)
    explanation, = result.explanations
    assert explanation.gallery.read_bytes().startswith(PNG) and explanation.prediction != ""
    assert len(explanation.proponents) == len(explanation.opponents) == 2


def test_renderers():
    digits = np.arange(64, dtype=float)
    assert kind_of(digits[None], "digits") == "digits" and image_of(digits, "digits").shape == (8, 8)
    image = np.random.default_rng(0).normal(size=(3, 5, 4))
    assert kind_of(image[None], "cifar10") == "images" and image_of(image, "images").shape == (5, 4, 3)
    tokens = np.array([[7, 4, 11, 11, 14]])
    assert kind_of(tokens, "text_chars") == "tokens"
    assert text_of(tokens[0], "tokens", lambda ids: "".join("abcdefghijklmno"[i] for i in ids)) == "hello"
    assert text_of(tokens[0], "tokens", None) == "7 4 11 11 14"
    assert text_of(np.array([1.0, 2.5]), "features", None, ["a", "b"]) == "a=1, b=2.5"
    assert text_of(np.zeros((5, 4)), "features", None).endswith("x15=0, ...")  # no renderer: the numbers
    from magic_cli.render import Shown

    for shown in (Shown("t", image_of(image, "images"), ""), Shown("t", None, "some text")):
        assert gallery_png(shown, [shown], [shown], "heading").startswith(PNG)


PLUGIN = '''
import numpy as np
from magic_cli.data import Dataset, load_dataset
from magic_cli.plugins import register_dataset

@register_dataset("wine_shown")
def wine_shown(seed, *, test_fraction: float = 0.2, show: str = "text"):
    ds = load_dataset({"name": "wine", "test_fraction": test_fraction}, seed, None)
    pictures = {
        "text": lambda x: f"a wine of {x[0]:.1f} % alcohol",
        "image": lambda x: np.tile(np.clip(x[:13] / (np.abs(x[:13]).max() + 1e-9), 0, 1), (13, 1)),
        "bad": lambda x: 42,
        "raises": lambda x: 1 / 0,
    }
    ds.name, ds.show = "wine_shown", pictures[show]
    return ds
'''


@pytest.mark.parametrize("show", ["text", "image"])
def test_a_plugin_draws_its_own_examples(tmp_path, show):
    plugin = tmp_path / "shown.py"
    plugin.write_text(PLUGIN)
    args = [o for o in TINY if o != "dataset=wine"] + [f"plugins=[{plugin}]", "dataset=wine", "dataset.name=wine_shown",
                                                      f"++dataset.show={show}", f"out_dir={tmp_path / 'run'}"]
    cfg = magic_cli.compose(args)
    magic_cli.train(cfg)
    magic_cli.attribute(cfg, test_ids="0")
    result = magic_cli.explain(cfg, test_ids="0", k=2)
    assert result.explanations[0].gallery.read_bytes().startswith(PNG)
    text = result.markdown.read_text()
    if show == "text":
        assert "a wine of" in text
    for bad, fragment in (("bad", "must return a str or a numpy image"), ("raises", "ZeroDivisionError")):
        broken = magic_cli.compose(args[:-2] + [f"++dataset.show={bad}", f"out_dir={tmp_path / bad}"])
        magic_cli.train(broken)
        magic_cli.attribute(broken, test_ids="0")
        with pytest.raises(magic_cli.errors.ConfigError, match="dataset=wine_shown: its show function") as e:
            magic_cli.explain(broken, test_ids="0", k=2)
        assert fragment in str(e.value)
