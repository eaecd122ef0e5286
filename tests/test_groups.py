"""Groups of training examples: a group's score is the weighted sum of its members' scores and the
exact derivative with respect to the group's weight (central differences, float64); a group
ground truth drops exactly whole groups and is scored in its own folders; explain ranks groups
and --verify drops them whole; group files are read or refused in one line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY, problem_for
from test_faults import one_line_error

import magic_cli
from magic_cli.core.groups import NONE, Groups, draw_group_mask, group_scores
from magic_cli.errors import ConfigError
from magic_cli.stages.ground_truth import make_mask
from magic_cli.stages.groups import resolve_groups

GT = ["ground_truth.drop_fractions=[0.34]", "ground_truth.num_subsets=6"]  # wine has 3 classes: one dropped


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("groups") / "run"
    cfg = magic_cli.compose([*TINY, f"out_dir={out}"])
    magic_cli.train(cfg)
    magic_cli.attribute(cfg, test_ids="0:3")
    return cfg, out


def test_group_scores_are_sums_of_members_and_the_derivative_of_the_group_weight(tiny_run):
    cfg, out = tiny_run
    run = magic_cli.load_run(out)
    frame = run.group_scores("label")
    scores = run.scores()
    labels = np.load(out / "attribute" / "magic" / "scores.npy").shape[0]
    problem = problem_for(TINY)
    y = problem.dataset.y_train.numpy()
    assert labels == len(y) and list(frame.group) == ["0", "1", "2"] and list(frame["size"]) == list(np.bincount(y))
    for g in range(3):  # the sum of the members' scores (train weights are ones here)
        np.testing.assert_allclose(frame.iloc[g, 2:].to_numpy(dtype=float), scores.values[y == g].sum(0), rtol=1e-12)
    h = 1e-4  # and d f_j / d e_g for w = w0 (1 + e_g on g's members), by central differences
    for g in range(3):
        e = torch.as_tensor((y == g) * h, dtype=problem.dtype) * problem.weights
        plus = problem.outputs(problem.run(weights=problem.weights + e)[0])["loss"][:3]
        minus = problem.outputs(problem.run(weights=problem.weights - e)[0])["loss"][:3]
        np.testing.assert_allclose(frame.iloc[g, 2:].to_numpy(dtype=float), (plus - minus) / (2 * h), rtol=1e-6)
    names = ["a" if v == 0 else None for v in y]  # one group given as names; the rest in none
    given = run.group_scores(names)
    assert list(given.group) == ["a"] and np.allclose(given.iloc[0, 2:].to_numpy(dtype=float), frame.iloc[0, 2:])


def test_core_group_arithmetic():
    groups = Groups.of(["b", None, "a", "b", "a", None], "given")
    assert groups.names == ("a", "b") and list(groups.index) == [1, NONE, 0, 1, 0, NONE]
    tau = np.arange(12.0).reshape(6, 2)
    w0 = np.array([1.0, 5, 2, 3, 0.5, 7])
    expected = np.array([2 * tau[2] + 0.5 * tau[4], 1 * tau[0] + 3 * tau[3]])
    np.testing.assert_allclose(group_scores(tau, groups, w0), expected)
    mask = draw_group_mask(groups, 0.5, np.random.default_rng(0))  # one of two groups, every member
    dropped = set(np.flatnonzero(~mask))
    assert dropped in ({2, 4}, {0, 3})
    assert groups.digest() != Groups.of(["a", None, "b", "a", "b", None], "given").digest()


def test_group_ground_truth_drops_whole_groups_in_its_own_folders(tiny_run, cli):
    cfg, out = tiny_run
    y = problem_for(TINY).dataset.y_train.numpy()
    code, stdout, err = cli("retrain-ground-truth", "--groups", "label", *TINY, *GT, f"out_dir={out}")
    assert code == 0, err
    folder = out / "ground_truth" / "groups-label" / "drop_0.34"
    masks = np.load(folder / "masks.npy")
    assert masks.shape == (6, len(y))
    for mask in masks:  # exactly one whole class dropped, nothing else
        dropped = set(np.unique(y[~mask]))
        assert len(dropped) == 1 and (~mask).sum() == (y == dropped.pop()).sum()
    assert json.loads((folder / "masks.json").read_text())["groups"]  # the assignment is in the identity
    assert not (out / "ground_truth" / "drop_0.34").exists()  # the single-example ground truth is apart
    element = make_mask(len(y), 0.34, 0, 0)
    assert (~element).sum() == round(0.34 * len(y))

    code, stdout, err = cli("score", "--groups", "label", *TINY, *GT, f"out_dir={out}")
    assert code == 0, err
    report = out / "report" / "groups-label"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["unit"] == "groups (label, 3)" and "0.34" in summary["lds"]["magic"]
    written = np.loadtxt(report / "group_scores_magic.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(written[:, 2:], magic_cli.load_run(out).group_scores("label").iloc[:, 2:], rtol=1e-12)
    assert (report / "index.html").is_file() and not (out / "report" / "summary.json").exists()
    one_line_error(*cli("score", *TINY, *GT, f"out_dir={out}")[::2], "no complete ground truth")


def test_explain_ranks_groups_and_verify_drops_them_whole(tiny_run):
    cfg, out = tiny_run
    result = magic_cli.explain(cfg, test_ids=[1], k=2, verify=True, groups="label")
    explanation, = result.explanations
    tau = magic_cli.load_run(out).group_scores("label")[1].to_numpy()
    assert all(e.group is not None and e.score < 0 for e in explanation.proponents)  # dropping raises the loss
    assert all(e.score > 0 for e in explanation.opponents)
    top = explanation.proponents[0]
    assert top.score == pytest.approx(tau.min()) and top.size == int((problem_for(TINY).dataset.y_train ==
                                                                        int(top.group)).sum())
    checks = {(c.kind, c.k): c for c in result.checks}
    assert set(checks) == {("proponents", 1), ("opponents", 1), ("random", 1)}  # 3 groups: k = 1 only
    assert checks[("proponents", 1)].predicted == pytest.approx(-tau.min(), rel=1e-12)
    assert checks[("proponents", 1)].actual > 0
    assert (out / "report" / "explain" / "magic_groups-label_1.png").is_file()
    html = (out / "report" / "index.html").read_text()
    assert "groups of label" in html


def _fake(n, y=None, columns=None, raw=None):
    y = torch.arange(n) % 3 if y is None else y
    return SimpleNamespace(name="fake", n_train=n, y_train=y, columns=columns, raw=raw, x_train=torch.zeros(n, 2))


def test_group_files_and_columns(tmp_path):
    lines = tmp_path / "groups.txt"
    lines.write_text("a\nb\n\na\n")
    g = resolve_groups(str(lines), _fake(4))
    assert g.names == ("a", "b") and list(g.index) == [0, 1, NONE, 0]
    table = tmp_path / "groups.csv"
    table.write_text("train_id,group\n3,web\n0,books\n1,web\n")
    g = resolve_groups(str(table), _fake(5))
    assert list(g.index) == [0, 1, NONE, 1, NONE]
    npy = tmp_path / "groups.npy"
    np.save(npy, np.array([1, 2, 1, 2]))
    assert resolve_groups(str(npy), _fake(4)).names == ("1", "2")
    raw = (np.array([[0.0, 1], [1, 1], [0, 2], [1, 3]]), None)
    g = resolve_groups("site", _fake(4, columns=("site", "x"), raw=raw))
    assert g.names == ("0", "1") and list(g.index) == [0, 1, 0, 1]
    assert list(resolve_groups("label", _fake(4)).index) == [0, 1, 2, 0]


@pytest.mark.parametrize("content,suffix,fragment", [
    ("a\nb\n", ".txt", "has 2 lines, one per training example needs 4"),
    ("train_id,group\n9,a\n0,b\n", ".csv", "train_id 9 is not a training id"),
    ("train_id,group\n1,a\n1,b\n", ".csv", "train_id 1 is listed twice"),
    ("id,name\n1,a\n", ".csv", "no `group` column"),
    ("a\na\na\na\n", ".txt", "1 group; need at least 2"),
])
def test_bad_group_files_are_one_line(tmp_path, content, suffix, fragment):
    path = tmp_path / f"groups{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match="--groups") as e:
        resolve_groups(str(path), _fake(4))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_group_specs(tiny_run, cli, tmp_path):
    cfg, out = tiny_run
    with pytest.raises(ConfigError, match="no one label per example"):
        resolve_groups("label", _fake(4, y=torch.zeros(4, 3, dtype=torch.long)))
    one_line_error(*cli("explain", "--test-ids", "0", "--groups", "nosuch", *TINY, f"out_dir={out}")[::2],
                   "--groups=nosuch: no such file", "alcohol")
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    one_line_error(*cli("retrain-ground-truth", "--groups", str(short), *TINY, *GT, f"out_dir={out}")[::2],
                   "ground_truth.groups", "has 2 lines")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing half-written


def test_verify_drops_only_units_of_the_shown_sign():
    from magic_cli.stages.explain import Units, _drops

    groups = Groups.of(["a", "b", "c", "a", "b", "c"], "given")
    units = Units(6, groups)
    scores = np.array([-0.5, 0.2, 0.1])  # loss scores: one proponent group (a), two opponents
    one = _drops(0, scores, "loss", 1, 0, units)
    assert list(one["proponents"]) == [0, 3] and list(one["opponents"]) == [1, 4]
    two = _drops(0, scores, "loss", 2, 0, units)
    assert "proponents" not in two and list(two["opponents"]) == [1, 2, 4, 5] and len(two["random"]) == 4
