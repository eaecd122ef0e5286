"""`magic train`: accuracy of the default, determinism, the weighted loss, and the pure step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, problem_for

from magic_cli.core.problem import TrainState, flatten_state


def test_default_train_reaches_97_percent(cli, tmp_path):
    code, out, err = cli("train", f"out_dir={tmp_path}")
    assert code == 0, err
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.97
    for key in ("test_accuracy", "test_loss", "train_loss", "steps", "train_seconds"):
        assert key in metrics
    assert len(list((tmp_path / "train" / "checkpoints_all").glob("state_*.pt"))) == metrics["steps"] + 1
    for name in ("config.yaml", "overrides.txt", "meta.json", "train/checkpoints_all/state_000000.pt", "train/final.pt",
                 "train/fingerprint.json", "train/outputs_loss.npy", "train/outputs_margin.npy"):
        assert (tmp_path / name).is_file(), name
    loss = np.load(tmp_path / "train" / "outputs_loss.npy")
    assert loss.dtype == np.float64 and loss.shape == (metrics["n_test"],)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["determinism"]["use_deterministic_algorithms"] is True and "torch" in meta


def _train_files(cli, out_dir, *overrides):
    code, _, err = cli("train", *TINY, f"out_dir={out_dir}", *overrides)
    assert code == 0, err
    train = out_dir / "train"
    return {str(p.relative_to(train)): p.read_bytes() for p in sorted(train.rglob("*"))
            if p.is_file() and p.name != "metrics.json"}


def test_same_config_gives_bit_identical_artifacts(cli, tmp_path):
    a = _train_files(cli, tmp_path / "a")
    b = _train_files(cli, tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    c = _train_files(cli, tmp_path / "c", "seed=1")
    assert c["outputs_loss.npy"] != a["outputs_loss.npy"]
    assert c["final.pt"] != a["final.pt"]


def test_train_twice_is_a_no_op_and_mismatch_is_refused(cli, tmp_path):
    _train_files(cli, tmp_path)
    code, out, _ = cli("train", *TINY, f"out_dir={tmp_path}")
    assert code == 0 and "already trained" in out
    code, _, err = cli("train", *TINY, f"out_dir={tmp_path}", "seed=5")
    assert code == 2 and "--overwrite" in err
    code, _, err = cli("train", *TINY, f"out_dir={tmp_path}", "seed=5", "--overwrite")
    assert code == 0, err


def test_batch_schedule_is_a_pure_function_of_seed_and_epoch():
    from magic_cli.data import batch_schedule

    a, b = batch_schedule(100, 16, 3, seed=0), batch_schedule(100, 16, 3, seed=0)
    assert torch.equal(a, b) and a.shape == (18, 16)
    assert not torch.equal(a, batch_schedule(100, 16, 3, seed=1))
    for e in range(3):  # each epoch visits distinct examples
        assert len(set(a[6 * e:6 * (e + 1)].flatten().tolist())) == 96


def test_standardised_with_training_statistics_only():
    """The features are (x - mean) / std with the statistics of the training split alone: checked
    against the raw data, and against what statistics over all the data would give instead."""
    from sklearn.datasets import load_wine

    from magic_cli.determinism import derive_seed

    p = problem_for(TINY)
    x = load_wine().data.astype(np.float64)
    perm = np.random.default_rng(derive_seed(0, "split")).permutation(len(x))
    test, train = perm[:36], perm[36:]
    mean, std = x[train].mean(0), x[train].std(0)
    np.testing.assert_allclose(p.dataset.x_train.numpy(), (x[train] - mean) / std, rtol=0, atol=1e-12)
    np.testing.assert_allclose(p.dataset.x_test.numpy(), (x[test] - mean) / std, rtol=0, atol=1e-12)
    leaked = (x[test] - x.mean(0)) / x.std(0)  # what using the test split's statistics would give
    assert np.abs(p.dataset.x_test.numpy() - leaked).max() > 1e-3


def test_weights_all_one_equal_plain_unweighted_training_bit_for_bit():
    """Our weighted step with w = 1 against a hand-written unweighted step (autograd)."""
    p = problem_for(TINY)
    state, _, _ = p.run()
    ref = p.init_state()
    B = p.config.train.batch_size
    for t in range(p.total_steps):
        batch = p.batch(t)
        params = {k: v.detach().requires_grad_() for k, v in ref.params.items()}
        logits, _ = p.model.apply(params, ref.buffers, batch.x, train=True)
        loss = torch.nn.functional.cross_entropy(logits, batch.y, reduction="none").sum() / B
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        new_params, new_opt = p.optimizer.update(grads, ref.opt, ref.params, t)
        ref = TrainState(new_params, ref.buffers, new_opt)
    fa, fb = flatten_state(state), flatten_state(ref)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_weight_zero_removes_and_weight_two_doubles_an_example():
    p = problem_for(TINY)
    state, batch = p.init_state(), p.batch(0)
    B = batch.x.shape[0]

    def grads(weights, x=batch.x, y=batch.y):
        return p.grad_fn(state.params, state.buffers, x, y, weights)[0]

    ones = torch.ones(B, dtype=p.dtype)
    g_all = grads(ones)
    w0 = ones.clone()
    w0[3] = 0
    keep = torch.arange(B) != 3  # the same batch without example 3, still normalised by B
    g_without = grads(ones[keep], batch.x[keep], batch.y[keep])
    g_only = grads(ones[~keep], batch.x[~keep], batch.y[~keep])
    w2 = ones.clone()
    w2[3] = 2
    for k in g_all:
        torch.testing.assert_close(grads(w0)[k], g_without[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grads(w2)[k], g_all[k] + g_only[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_vjp_through_one_train_step_matches_finite_differences(optimizer):
    from torch.func import vjp

    p = problem_for(TINY + [f"optimizer={optimizer}"])
    state = p.init_state()
    for t in range(3):
        state = p.step(state, t)
    t = 3
    batch, w = p.batch(t), p.weights[p.schedule[t]]
    step = lambda s, w_: p.train_step(s, batch, w_)  # noqa: E731
    out, fn = vjp(step, state, w)
    gen = torch.Generator().manual_seed(0)
    rand_like = lambda tree: torch.utils._pytree.tree_map(  # noqa: E731
        lambda v: torch.randn(v.shape, generator=gen, dtype=v.dtype), tree)
    ct = rand_like(out)
    ct_state, ct_w = fn(ct)

    def dot(a, b):
        return sum(float((x * y).sum()) for x, y in zip(torch.utils._pytree.tree_leaves(a),
                                                        torch.utils._pytree.tree_leaves(b)))

    h = 1e-6
    dw, ds = torch.randn(w.shape, generator=gen, dtype=w.dtype), rand_like(state)
    if "nu" in ds.opt:  # keep Adam's second moments positive: perturb them relatively
        ds.opt["nu"] = {k: d * state.opt["nu"][k] for k, d in ds.opt["nu"].items()}
    shift = lambda s, eps: torch.utils._pytree.tree_map(lambda a, d: a + eps * d, s, ds)  # noqa: E731
    fd_w = (dot(ct, step(state, w + h * dw)) - dot(ct, step(state, w - h * dw))) / (2 * h)
    fd_s = (dot(ct, step(shift(state, h), w)) - dot(ct, step(shift(state, -h), w))) / (2 * h)
    assert fd_w == pytest.approx(float((ct_w * dw).sum()), rel=1e-6)
    assert fd_s == pytest.approx(dot(ct_state, ds), rel=1e-6)


def test_data_weights_file_is_used(cli, tmp_path):
    p = problem_for(TINY)
    w = np.ones(p.dataset.n_train)
    w[:10] = 0
    np.save(tmp_path / "w.npy", w)
    a = _train_files(cli, tmp_path / "a")
    b = _train_files(cli, tmp_path / "b", f"train.data_weights={tmp_path / 'w.npy'}")
    assert a["outputs_loss.npy"] != b["outputs_loss.npy"]
    np.save(tmp_path / "bad.npy", np.ones(3))
    code, _, err = cli("train", *TINY, f"out_dir={tmp_path / 'c'}", f"train.data_weights={tmp_path / 'bad.npy'}")
    assert code == 2 and "must hold 142 weights (one per training example)" in err
    assert not (tmp_path / "c" / "train" / "fingerprint.json").exists()


def test_order_file_equal_to_the_seeded_schedule_is_bit_identical(cli, tmp_path):
    """A given data order replaces the seeded permutation; the seeded one, written out, changes
    nothing (checkpoints, outputs, scores), and another order changes the run."""
    from magic_cli.data import batch_schedule

    schedule = batch_schedule(142, 16, 2, seed=0).numpy()
    np.save(tmp_path / "order.npy", schedule)
    seeded = _train_files(cli, tmp_path / "seeded")
    given = _train_files(cli, tmp_path / "given", f"train.order_file={tmp_path / 'order.npy'}")
    for name in ("final.pt", "checkpoints_all/state_000010.pt", "outputs_loss.npy", "outputs_margin.npy"):
        assert seeded[name] == given[name], name
    for out in ("seeded", "given"):
        extra = [f"train.order_file={tmp_path / 'order.npy'}"] if out == "given" else []
        code, _, err = cli("attribute", "--test-ids", "0:3", *TINY, f"out_dir={tmp_path / out}", *extra)
        assert code == 0, err
    assert (tmp_path / "seeded" / "attribute" / "magic" / "scores.npy").read_bytes() == \
        (tmp_path / "given" / "attribute" / "magic" / "scores.npy").read_bytes()
    np.save(tmp_path / "reversed.npy", schedule[::-1].copy())
    other = _train_files(cli, tmp_path / "other", f"train.order_file={tmp_path / 'reversed.npy'}")
    assert other["final.pt"] != seeded["final.pt"]


@pytest.mark.parametrize("array, fragment", [
    (np.zeros((4, 16), dtype=np.float64), "must hold integer example ids"),
    (np.zeros((4, 8), dtype=np.int64), "has batches of 8, train.batch_size is 16"),
    (np.full((4, 16), 142, dtype=np.int64), "ids outside the training split (0..141)"),
    (np.zeros(16, dtype=np.int64), "must hold an array (steps, batch)"),
])
def test_an_order_file_that_does_not_fit_is_one_line(cli, tmp_path, array, fragment):
    np.save(tmp_path / "order.npy", array)
    code, _, err = cli("train", *TINY, f"train.order_file={tmp_path / 'order.npy'}", f"out_dir={tmp_path / 'run'}")
    assert code == 2 and fragment in err and err.count("magic: error") == 1, err
    assert not (tmp_path / "run").exists()
