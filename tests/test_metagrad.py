"""`magic attribute`: exactness (unrolled autograd, finite differences), checkpoint strategies,
batching, resuming and guard rails."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY, problem_for, unrolled_scores

from magic_cli.core.replay import ReverseStates, root_boundaries


def _attribute(cli, run_dir, ids, *overrides, extra=()):
    code, _, err = cli("train", *TINY, f"out_dir={run_dir}", *overrides)
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", ids, *TINY, f"out_dir={run_dir}", *overrides, *extra)
    assert code == 0, err
    side = json.loads((run_dir / "attribute" / "magic" / "scores.json").read_text())
    side.update(json.loads((run_dir / "attribute" / "magic" / "last_run.json").read_text()))
    return np.load(run_dir / "attribute" / "magic" / "scores.npy"), side


MODELS_AND_OPTIMIZERS = [
    ("mlp", ["optimizer=adam"]),
    ("mlp", ["optimizer=adam", "optimizer.weight_decay=0.05"]),
    ("mlp", ["optimizer=sgd", "optimizer.nesterov=true"]),
    ("mlp", ["optimizer=sgd", "optimizer.momentum=0"]),
    ("mlp", ["optimizer=sgd", "optimizer.schedule.name=cosine", "train.loss_reduction=sum", "optimizer.lr=0.002"]),
    ("logreg", ["optimizer=adam"]),
    ("logreg", ["optimizer=sgd", "optimizer.nesterov=true"]),
]


@pytest.mark.parametrize("output", ["loss", "margin"])
@pytest.mark.parametrize("model, overrides", MODELS_AND_OPTIMIZERS)
def test_scores_match_unrolled_autograd(cli, tmp_path, model, overrides, output):
    ids = [0, 3, 7]
    extra = [f"model={model}"] + (["model.hidden=[8]"] if model == "mlp" else []) + overrides
    overrides_all = TINY[:1] + TINY[2:] + extra + [f"attribute.output={output}"]
    code, _, err = cli("train", *overrides_all, f"out_dir={tmp_path}")
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", "0,3,7", *overrides_all, f"out_dir={tmp_path}")
    assert code == 0, err
    scores = np.load(tmp_path / "attribute" / "magic" / "scores.npy")  # (N, 3)
    want = unrolled_scores(problem_for(overrides_all), ids, output).numpy().T
    assert np.abs(scores - want).max() <= 1e-10 * np.abs(want).max()


def test_scores_match_central_finite_differences(cli, tmp_path):
    scores, _ = _attribute(cli, tmp_path, "2,5")
    problem = problem_for(TINY)
    rng = np.random.default_rng(0)
    h = 1e-4
    for i in rng.choice(problem.dataset.n_train, size=4, replace=False):
        e = torch.zeros(problem.dataset.n_train, dtype=problem.dtype)
        e[i] = h
        plus = problem.outputs(problem.run(weights=problem.weights + e)[0])["loss"]
        minus = problem.outputs(problem.run(weights=problem.weights - e)[0])["loss"]
        fd = (plus - minus)[[2, 5]] / (2 * h)
        np.testing.assert_allclose(scores[i], fd, rtol=1e-6, atol=1e-6 * np.abs(scores).max())


def test_strategies_give_bit_identical_scores(cli, tmp_path):
    base, side = _attribute(cli, tmp_path / "all", "0:6", "checkpoint=all")
    assert side["peak_states"] == side["steps"]
    for name, extra in [("sqrt", ["checkpoint=sqrt"])] + [
            (f"replay{k}", ["checkpoint=replay", f"checkpoint.k={k}"]) for k in (2, 3, 4)] + [
            (f"binomial{m}", ["checkpoint=binomial", f"checkpoint.memory={m}"]) for m in (3, 5)]:
        scores, side = _attribute(cli, tmp_path / name, "0:6", *extra)
        assert scores.tobytes() == base.tobytes(), name
        T = side["steps"]
        if name.startswith("replay"):
            k = side["checkpoint"]["param"]
            assert side["peak_states"] <= k * _ceil_log(T, k) + 2
            assert side["forward_steps"] > 0
        if name.startswith("binomial"):
            assert side["peak_states"] <= side["checkpoint"]["param"] and side["forward_steps"] > 0


def test_a_binomial_memory_in_bytes_holds_as_many_whole_states_as_fit(cli, tmp_path):
    """checkpoint.memory=<bytes> is the count of whole states that fit (a state's size follows
    from its shapes): the same checkpoints, schedule and bit-identical scores as that count."""
    from test_faults import one_line_error

    counted, side = _attribute(cli, tmp_path / "r", "0:4", "checkpoint=binomial", "checkpoint.memory=4")
    size = side["checkpoint"]["state_bytes"]
    assert size > 0 and side["peak_states"] * size <= 4 * size
    for memory in (f"{int(4.9 * size)}B", f"{4.2 * size / 1024:.3f}KiB"):
        scores, side_b = _attribute(cli, tmp_path / "r", "0:4", "checkpoint=binomial",
                                    f"checkpoint.memory={memory}", extra=["--overwrite"])
        assert side_b["checkpoint"] == {"name": "binomial", "param": 4, "state_bytes": size, "memory": memory}
        assert scores.tobytes() == counted.tobytes() and side_b["forward_steps"] == side["forward_steps"]
        assert side_b["peak_states"] * size <= 4.2 * size
    assert [p.name for p in (tmp_path / "r" / "train").glob("checkpoints_*")] == [
        "checkpoints_binomial4"]  # the byte budgets reused the 4-state checkpoints
    code, _, err = cli("attribute", "--test-ids", "0:4", *TINY, f"out_dir={tmp_path / 'r'}", "checkpoint=binomial",
                       f"checkpoint.memory={2 * size + 1}B")
    one_line_error(code, err, "holds 2 training states", "at least 3")
    for bad in ("12 parsecs", "MB", "-3MB"):
        code, _, err = cli("attribute", "--test-ids", "0:4", *TINY, f"out_dir={tmp_path / 'r'}",
                           "checkpoint=binomial", f"checkpoint.memory='{bad}'")
        one_line_error(code, err, "checkpoint.memory must be a number of states or a size with a unit")


@pytest.mark.parametrize("strategy", [["checkpoint=replay", "checkpoint.k=2"],
                                      ["checkpoint=binomial", "checkpoint.memory=4"]])
def test_groups_share_one_replay_with_the_scores_of_separate_passes(cli, tmp_path, strategy):
    """Three groups of 2 ids: one replay for all (replay_groups=0) recomputes a third of the
    steps of one replay per group (replay_groups=1), with bit-identical scores."""
    groups = ["attribute.batch_size=2"]
    shared, side = _attribute(cli, tmp_path / "shared", "0:6", *strategy, *groups)
    separate, side_sep = _attribute(cli, tmp_path / "separate", "0:6", *strategy, *groups, "attribute.replay_groups=1")
    assert shared.tobytes() == separate.tobytes()
    assert side_sep["forward_steps"] == 3 * side["forward_steps"] > 0
    alone, _ = _attribute(cli, tmp_path / "alone", "2:4", *strategy, *groups)
    assert alone.tobytes() == shared[:, 2:4].tobytes()  # a group's scores do not depend on its company


def _ceil_log(T: int, k: int) -> int:
    """ceil(log_k T) in integers (floating log is off by one at exact powers)."""
    n, levels = 1, 0
    while n < T:
        n, levels = n * k, levels + 1
    return levels


@pytest.mark.parametrize("k", [2, 3, 4, 7])
@pytest.mark.parametrize("T", [1, 2, 5, 8, 9, 27, 64, 100, 333])
def test_replay_iterator_order_and_memory_bound(T, k):
    stored = {t: t for t in root_boundaries("replay", T, k)}
    it = ReverseStates(lambda s, t: s + 1, stored, T, "replay", k)
    assert list(it) == [(t, t) for t in reversed(range(T))]
    assert it.peak_states <= k * _ceil_log(T, k) + 2
    assert it.forward_steps <= T * max(1, _ceil_log(T, k))


@pytest.mark.parametrize("memory", [3, 4, 5, 8, 16])
@pytest.mark.parametrize("T", [1, 2, 5, 9, 27, 64, 100, 333])
def test_binomial_iterator_order_memory_and_optimal_cost(T, memory):
    """At most `memory` states, and exactly Revolve's minimal number of forward steps (the first
    sweep is `train`'s, which stores its checkpoints)."""
    from magic_cli.core.replay import binomial_cost

    root = root_boundaries("binomial", T, memory)
    it = ReverseStates(lambda s, t: s + 1, {t: t for t in root}, T, "binomial", memory)
    assert list(it) == [(t, t) for t in reversed(range(T))]
    assert it.peak_states <= memory
    assert it.forward_steps + (root[-2] if T > 1 else 0) == binomial_cost(memory - 3, T)


def test_binomial_split_is_optimal_against_dynamic_programming():
    """cost(l, c) = min over the first checkpoint m of m + cost(l-m, c-1) + cost(m, c), with
    cost(l, 0) = l(l-1)/2 (recompute every state from the held one): the closed form and the
    rule's schedule both reach the minimum."""
    from functools import lru_cache

    from magic_cli.core.replay import binomial_cost, binomial_split

    def cost_of(choices):
        """The cost of the schedules whose first checkpoint is one of choices(length, free)."""
        @lru_cache(maxsize=None)
        def cost(length, free):
            if length <= 1:
                return 0
            if free == 0:
                return length * (length - 1) // 2
            return min(m + cost(length - m, free - 1) + cost(m, free) for m in choices(length, free))
        return cost

    best = cost_of(lambda length, free: range(1, length))
    rule = cost_of(lambda length, free: [binomial_split(free, length)])

    for length in range(1, 90):
        for free in range(0, 6):
            assert rule(length, free) == best(length, free) == binomial_cost(free, length), (length, free)


@pytest.mark.parametrize("T", [50, 200, 1000])
@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_binomial_recomputes_fewer_steps_than_replay_at_equal_memory(T, k):
    def run(strategy, param):
        it = ReverseStates(lambda s, t: s + 1, {t: t for t in root_boundaries(strategy, T, param)}, T, strategy, param)
        assert list(it) == [(t, t) for t in reversed(range(T))]
        return it.peak_states, it.forward_steps

    peak, steps = run("replay", k)
    peak_b, steps_b = run("binomial", peak)
    assert peak_b <= peak and steps_b < steps


@pytest.mark.parametrize("T", [1, 4, 10, 50])
def test_sqrt_and_all_iterators(T):
    for strategy in ("all", "sqrt"):
        stored = {t: t for t in root_boundaries(strategy, T)}
        it = ReverseStates(lambda s, t: s + 1, stored, T, strategy)
        assert list(it) == [(t, t) for t in reversed(range(T))]
        if strategy == "sqrt":
            assert it.peak_states <= 2 * math.ceil(math.sqrt(T)) + 2


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_batched_equals_one_at_a_time(cli, tmp_path, dtype, tol):
    one, _ = _attribute(cli, tmp_path / "one", "0:16", f"dtype={dtype}", "attribute.batch_size=1")
    many, side = _attribute(cli, tmp_path / "many", "0:16", f"dtype={dtype}", "attribute.batch_size=16")
    assert one.dtype == np.dtype(dtype)
    assert np.abs(one - many).max() <= tol * np.abs(one).max()


def test_resume_computes_only_new_ids(cli, tmp_path):
    """Ids come in fixed groups of attribute.batch_size: a finished group is never recomputed."""
    _attribute(cli, tmp_path / "r", "0:10", "attribute.batch_size=10")
    merged, side = _attribute(cli, tmp_path / "r", "0:20", "attribute.batch_size=10")
    assert side["ids_computed"] == 10 and side["test_ids"] == list(range(20))
    at_once, _ = _attribute(cli, tmp_path / "once", "0:20", "attribute.batch_size=10")
    assert merged.shape == (merged.shape[0], 20)
    assert merged.tobytes() == at_once.tobytes()


def test_out_of_range_ids_write_nothing(cli, tmp_path):
    code, _, err = cli("train", *TINY, f"out_dir={tmp_path}")
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", "0:9999", *TINY, f"out_dir={tmp_path}")
    assert code == 2 and "outside the test split" in err and err.count("magic: error") == 1 and "Traceback" not in err
    assert not (tmp_path / "attribute").exists()


def test_attribute_before_train_and_with_other_config(cli, tmp_path):
    code, _, err = cli("attribute", "--test-ids", "0", *TINY, f"out_dir={tmp_path}")
    assert code == 2 and "run `magic train`" in err
    cli("train", *TINY, f"out_dir={tmp_path}")
    code, _, err = cli("attribute", "--test-ids", "0", *TINY, f"out_dir={tmp_path}", "optimizer.lr=0.01")
    assert code == 2 and "optimizer.lr: 0.001 -> 0.01" in err


def test_nan_adjoint_is_reported_with_its_step(cli, tmp_path):
    """Adam without eps_root: constant digits pixels give v = 0 and d sqrt(v)/dv is infinite."""
    overrides = ["optimizer.eps_root=0", "train.epochs=1", "model.hidden=[8]", f"out_dir={tmp_path}"]
    code, _, err = cli("train", *overrides)
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", "0", *overrides)
    assert code == 2 and "NaN/Inf around step" in err and "eps_root" in err
    assert err.count("magic: error") == 1 and "Traceback" not in err


def test_non_deterministic_recomputation_is_detected(cli, tmp_path):
    """A stored state that is intact (its digest matches) but that the recomputation does not
    reproduce, as on a machine where training is not deterministic."""
    from magic_cli.run_dir import load_json, load_tensors, save_artifact, sidecar, tensors_bytes

    cli("train", *TINY, "checkpoint=replay", "checkpoint.k=2", f"out_dir={tmp_path}")
    paths = sorted((tmp_path / "train" / "checkpoints_replay2").glob("state_*.pt"))
    steps = [int(p.stem.split("_")[1]) for p in paths]
    path = paths[1]
    data = load_tensors(path)
    key = next(k for k in data if k.startswith("params/"))
    data[key] += 1e-12  # tamper with the second stored state, and give it a valid sidecar
    save_artifact(path, tensors_bytes(data), {"fingerprint": load_json(sidecar(path))["fingerprint"]})
    code, _, err = cli("attribute", "--test-ids", "0", *TINY, "checkpoint=replay", "checkpoint.k=2",
                       f"out_dir={tmp_path}")
    # the segment recomputed from the tampered state no longer reaches the next stored one
    assert code == 2 and f"after step {steps[2]}" in err and err.count("magic: error") == 1 and "Traceback" not in err


def test_scores_of_other_settings_are_not_reused(cli, tmp_path):
    _attribute(cli, tmp_path, "0:3")
    code, _, err = cli("attribute", "--test-ids", "0:3", *TINY, f"out_dir={tmp_path}", "attribute.output=margin")
    assert code == 2 and "other settings" in err and "--overwrite" in err
    code, _, err = cli("attribute", "--test-ids", "0:3", *TINY, f"out_dir={tmp_path}", "attribute.output=margin",
                       "--overwrite")
    assert code == 0, err
    side = json.loads((tmp_path / "attribute" / "magic" / "scores.json").read_text())
    last = json.loads((tmp_path / "attribute" / "magic" / "last_run.json").read_text())
    assert side["output"] == "margin" and last["ids_computed"] == 3
