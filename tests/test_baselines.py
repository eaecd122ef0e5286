"""Baselines against independent computations: explicit per-example gradients and dot
products, and exact-Hessian influence where K-FAC is exact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, assert_taps_give_per_example_gradients, problem_for

from magic_cli.core import baselines
from magic_cli.core.losses import OUTPUT_FUNCTIONS
from magic_cli.core.optim import lr_factor
from magic_cli.core.problem import TrainState

IDS = [1, 4]


def _grad(problem, state, x, y, fn):
    """One explicit gradient by plain autograd, flattened (P,)."""
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    logits, _ = problem.model.apply(params, state.buffers, x[None], train=False)
    grads = torch.autograd.grad(fn(logits, y[None]).sum(), list(params.values()))
    return torch.cat([g.flatten() for g in grads]).double()


def _attribute(cli, tmp_path, method, *overrides):
    args = [*TINY, f"out_dir={tmp_path}", *overrides]
    assert cli("train", *args)[0] == 0
    code, _, err = cli("attribute", "--test-ids", ",".join(map(str, IDS)), "--method", method, *args)
    assert code == 0, err
    side = json.loads((tmp_path / "attribute" / method / "scores.json").read_text())
    assert side["method"] == method and side["sign"] == "d output / d weight" and side["seconds"] > 0
    return np.load(tmp_path / "attribute" / method / "scores.npy"), problem_for(args)


def _final(problem):
    return problem.run()[0]


@pytest.mark.parametrize("output", ["loss", "margin"])
def test_grad_dot_matches_explicit_dot_products(cli, tmp_path, output):
    scores, problem = _attribute(cli, tmp_path, "grad-dot", f"attribute.output={output}")
    final, ds = _final(problem), problem.dataset
    eta_over_b = problem.config.optimizer.lr / problem.config.train.batch_size
    for i in (0, 7, 99):
        g_i = _grad(problem, final, ds.x_train[i], ds.y_train[i], OUTPUT_FUNCTIONS["loss"])
        for j, test_id in enumerate(IDS):
            g_j = _grad(problem, final, ds.x_test[test_id], ds.y_test[test_id], OUTPUT_FUNCTIONS[output])
            assert scores[i, j] == pytest.approx(-eta_over_b * float(g_i @ g_j), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("states,last,weighted", [("start", 0, True), ("end", 1, False)])
def test_tracin_sums_over_epoch_checkpoints(cli, tmp_path, states, last, weighted):
    scores, problem = _attribute(cli, tmp_path, "tracin", f"attribute.tracin.states={states}",
                                 f"attribute.tracin.checkpoints={last}", f"attribute.tracin.lr_weighting={weighted}")
    ds, cfg = problem.dataset, problem.config
    spe = problem.total_steps // cfg.train.epochs
    _, kept, _ = problem.run(keep=set(range(0, problem.total_steps + 1, spe)))
    starts = list(range(0, problem.total_steps, spe))[-last if last else 0:]
    for i in (3, 50):
        want = np.zeros(len(IDS))
        for start in starts:
            schedule = [lr_factor(cfg.optimizer.schedule, t, problem.total_steps) for t in range(start, start + spe)]
            mean = np.mean(schedule)
            lr = cfg.optimizer.lr * (mean if weighted else 1.0)
            state = kept[start + spe if states == "end" else start]
            g_i = _grad(problem, state, ds.x_train[i], ds.y_train[i], OUTPUT_FUNCTIONS["loss"])
            for j, test_id in enumerate(IDS):
                g_j = _grad(problem, state, ds.x_test[test_id], ds.y_test[test_id], OUTPUT_FUNCTIONS["loss"])
                want[j] -= lr / cfg.train.batch_size * float(g_i @ g_j)
        np.testing.assert_allclose(scores[i], want, rtol=1e-9)


def test_trak_matches_its_formula_computed_explicitly(cli, tmp_path):
    scores, problem = _attribute(cli, tmp_path, "trak", "attribute.trak.proj_dim=32", "attribute.output=margin",
                                 "attribute.trak.damping=0.1")
    final, ds = _final(problem), problem.dataset
    projection = baselines.trak_projection(final.params, 32, problem.config.seed, 0)
    p_flat = torch.cat([projection[k] for k in final.params])  # (P, k), parameters in order
    margin = OUTPUT_FUNCTIONS["margin"]
    phi = torch.stack([_grad(problem, final, ds.x_train[i], ds.y_train[i], margin) for i in range(ds.n_train)]) @ p_flat
    phi_test = torch.stack([_grad(problem, final, ds.x_test[j], ds.y_test[j], margin) for j in IDS]) @ p_flat
    kernel = phi.T @ phi
    kernel += 0.1 * kernel.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    with torch.no_grad():
        logits, _ = problem.model.apply(final.params, final.buffers, ds.x_train, train=False)
    q = 1 - torch.softmax(logits.double(), -1)[torch.arange(ds.n_train), ds.y_train]
    want = (phi @ torch.linalg.inv(kernel) @ phi_test.T) * q[:, None]
    np.testing.assert_allclose(scores, want.numpy(), rtol=1e-7, atol=1e-10 * float(want.abs().max()))


def test_ekfac_equals_exact_hessian_influence_where_kfac_is_exact():
    """Logistic regression at zero weights: every example predicts the uniform distribution, so the
    Gauss-Newton Hessian (= the Hessian, the model being linear) is exactly A (x) G."""
    problem = problem_for([o for o in TINY if not o.startswith("model.hidden")] + ["model=logreg"])
    state = problem.init_state()
    state = TrainState({k: torch.zeros_like(v) for k, v in state.params.items()}, state.buffers, state.opt)
    ds, n, damping = problem.dataset, problem.dataset.n_train, 1e-3
    got = baselines.ekfac(problem, state, IDS, "loss", {"damping": damping, "relative_damping": False})

    shapes = {k: v.shape for k, v in state.params.items()}
    sizes = [v.numel() for v in state.params.values()]

    def unflat(theta):
        return {k: t.view(shapes[k]) for k, t in zip(shapes, torch.split(theta, sizes))}

    def mean_loss(theta):
        logits, _ = problem.model.apply(unflat(theta), {}, ds.x_train, train=False)
        return OUTPUT_FUNCTIONS["loss"](logits, ds.y_train).mean()

    theta = torch.cat([v.flatten() for v in state.params.values()])
    hessian = torch.func.hessian(mean_loss)(theta)
    inverse = torch.linalg.inv(hessian + damping * torch.eye(len(theta), dtype=theta.dtype))
    loss = OUTPUT_FUNCTIONS["loss"]
    for i in (0, 9, 77):
        g_i = _grad(problem, state, ds.x_train[i], ds.y_train[i], loss)
        for j, test_id in enumerate(IDS):
            g_j = _grad(problem, state, ds.x_test[test_id], ds.y_test[test_id], loss)
            want = -float(g_j @ inverse @ g_i) / n
            assert float(got[i, j]) == pytest.approx(want, rel=1e-8)


def _logreg_at_zero():
    """Logistic regression at zero weights, where the K-FAC Gauss-Newton Hessian is exact."""
    problem = problem_for([o for o in TINY if not o.startswith("model.hidden")] + ["model=logreg"])
    state = problem.init_state()
    return problem, TrainState({k: torch.zeros_like(v) for k, v in state.params.items()}, state.buffers, state.opt)


def _exact_hessian(problem, state):
    ds = problem.dataset
    shapes = {k: v.shape for k, v in state.params.items()}
    sizes = [v.numel() for v in state.params.values()]

    def mean_loss(theta):
        params = {k: t.view(shapes[k]) for k, t in zip(shapes, torch.split(theta, sizes))}
        logits, _ = problem.model.apply(params, {}, ds.x_train, train=False)
        return OUTPUT_FUNCTIONS["loss"](logits, ds.y_train).mean()

    return torch.func.hessian(mean_loss)(torch.cat([v.flatten() for v in state.params.values()]))


def _test_grads(problem, state):
    ds = problem.dataset
    (_, g), = baselines.per_example_grads(problem, state, ds.x_test[IDS], ds.y_test[IDS], OUTPUT_FUNCTIONS["loss"],
                                          chunk=len(IDS))
    return g


def test_source_is_unrolled_training_with_each_segments_curvature_where_kfac_is_exact():
    """Two segments at a state where K-FAC is exact: scores = -(1/N) sum_l <made_l carry_{l+1}
    grad f, grad l_i> with the matrix functions of the exact Hessian, computed independently."""
    problem, state = _logreg_at_zero()
    ds, n, damping, horizons = problem.dataset, problem.dataset.n_train, 1e-3, (3.0, 7.0)
    got = baselines.source_from(problem, [(state, h) for h in horizons], _test_grads(problem, state), damping, False)
    lam, q = torch.linalg.eigh(_exact_hessian(problem, state) + damping * torch.eye(_exact_hessian(
        problem, state).shape[0], dtype=torch.float64))

    def fn(values):
        return q @ torch.diag(values) @ q.T

    made = [fn(-torch.expm1(-h * lam) / lam) for h in horizons]
    carry_last = fn(torch.exp(-horizons[1] * lam))
    loss = OUTPUT_FUNCTIONS["loss"]
    for i in (0, 9, 77):
        g_i = _grad(problem, state, ds.x_train[i], ds.y_train[i], loss)
        for j, test_id in enumerate(IDS):
            g_j = _grad(problem, state, ds.x_test[test_id], ds.y_test[test_id], loss)
            want = -float(g_i @ (made[1] + made[0] @ carry_last) @ g_j) / n
            assert float(got[i, j]) == pytest.approx(want, rel=1e-8)


def test_source_limits_are_influence_functions_and_gradient_descent():
    """One segment: an endless horizon gives EK-FAC influence; a vanishing one, -h/N <grad f, grad l_i>."""
    problem, _ = _logreg_at_zero()
    final = problem.run()[0]  # the trained model: curvature not Kronecker-exact, the identities still hold
    g_test = _test_grads(problem, final)
    endless = baselines.source_from(problem, [(final, 1e12)], g_test, 1e-3, False)
    ekfac = baselines.ekfac(problem, final, IDS, "loss", {"damping": 1e-3, "relative_damping": False})
    np.testing.assert_allclose(endless.numpy(), ekfac.numpy(), rtol=1e-9, atol=1e-12 * float(ekfac.abs().max()))
    h = 1e-9
    brief = baselines.source_from(problem, [(final, h)], g_test, 0.0, False)
    dots = baselines._grad_dot(problem, final, IDS, "loss", baselines.Clock())
    np.testing.assert_allclose(brief.numpy(), (-h / problem.dataset.n_train * dots).numpy(), rtol=1e-6)


def test_source_segments_and_their_step_sizes():
    assert baselines.segment_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    problem = problem_for(TINY)  # Adam: each layer's horizon scaled by its mean preconditioner
    final = problem.run()[0]
    cfg, t = problem.config.optimizer, problem.total_steps
    layers = baselines._kfac_layers(problem, final)
    per_layer = baselines._per_layer(problem, final, t, 2.0, layers)
    assert sorted(per_layer) == sorted(layers) == ["fc0", "fc1"]
    for name, h in per_layer.items():
        nu = torch.cat([final.opt["nu"][f"{name}.{p}"].flatten() for p in ("weight", "bias")]).double()
        want = 2.0 * float((1 / (torch.sqrt(nu / (1 - cfg.betas[1] ** t) + cfg.eps_root) + cfg.eps)).mean())
        assert h == pytest.approx(want, rel=1e-12)
    sgd = problem_for([*TINY, "optimizer=sgd"])  # momentum 0.9: steps of lr / (1 - 0.9)
    assert baselines._per_layer(sgd, sgd.init_state(), 1, 2.0, layers) == pytest.approx(20.0)
    carry, made = baselines.source_filters(torch.tensor([0.0, 1.0]), 2.0, 0.0)
    assert torch.allclose(carry, torch.tensor([1.0, np.exp(-2.0)], dtype=carry.dtype))
    assert torch.allclose(made, torch.tensor([2.0, 1 - np.exp(-2.0)], dtype=made.dtype))


CNN = ["experiment=digits_cnn", "model.channels=[4,6]", "train.epochs=1", "dtype=float64"]


def test_conv_taps_give_each_examples_weight_gradient():
    """Sum over positions of (output gradient) x (unfolded patch) is the per-example gradient of the
    convolution's weight, for every label: what K-FAC's factors and the refit are built from."""
    problem = problem_for(CNN)
    state = problem.run()[0]
    ds, y = problem.dataset, 3
    x = ds.x_train[:5]
    a_bar, g, _ = next(baselines._layer_factors(problem, state, ["block1.conv", "head"], chunk=5))
    m = torch.einsum("nto,nti->noi", g["block1.conv"][y], a_bar["block1.conv"])  # (n, out, C k k)
    for i in range(5):
        params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
        logits, _ = problem.model.apply(params, state.buffers, x[i:i + 1], train=False)
        loss = -torch.log_softmax(logits, -1)[0, y]
        want = torch.autograd.grad(loss, params["block1.conv.weight"])[0].flatten(1)
        torch.testing.assert_close(m[i], want.double(), rtol=1e-10, atol=1e-12)


LM = ["experiment=text_tiny_lm", "dataset.n_train=40", "dataset.n_test=8", "dataset.context=12", "model.dim=16",
      "model.n_layers=1", "model.n_heads=2", "train.epochs=1", "train.batch_size=8", "dtype=float64"]


def test_kfac_covers_linear_and_convolutional_layers_per_position_and_leaves_the_rest_out():
    cnn = problem_for(CNN)
    layers = assert_taps_give_per_example_gradients(cnn, cnn.run()[0])
    assert layers == {"block0.conv": False, "block1.conv": False, "head": False}  # not BatchNorm
    lm = problem_for(LM)
    layers = assert_taps_give_per_example_gradients(lm, lm.run()[0])
    assert sorted(layers) == ["h0.fc", "h0.out", "h0.proj", "h0.qkv", "head"]  # not embeddings, not LayerNorm


def test_ekfac_refit_is_the_fishers_diagonal_in_the_kronecker_eigenbasis_per_token():
    """A sequence model: Lambda[o, i] = E_x (Q_G^T dW Q_A)[o, i]^2, dW the gradient of each example's
    loss at the labels drawn from the model, by explicit autograd; the draws are reproducible."""
    from magic_cli.core.losses import per_example_loss
    from magic_cli.determinism import generator

    problem = problem_for(LM)
    state = problem.run()[0]
    factors = baselines.ekfac_factors(problem, state)
    q_a, q_g, lam, _ = factors["h0.qkv"]
    ds = problem.dataset
    logits, _ = problem.model.apply(state.params, state.buffers, ds.x_train, train=False)
    labels = baselines._sampled_labels(logits, ds.y_train, generator(problem.config.seed, "kfac-labels", 0))
    want = torch.zeros_like(lam)
    for i in range(ds.n_train):
        params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
        out, _ = problem.model.apply(params, state.buffers, ds.x_train[i:i + 1], train=False)
        dw, db = torch.autograd.grad(per_example_loss(out, labels[i:i + 1]).sum(),
                                     [params["h0.qkv.weight"], params["h0.qkv.bias"]])
        want += (q_g.T @ torch.cat([dw, db[:, None]], 1).double() @ q_a) ** 2 / ds.n_train
    torch.testing.assert_close(lam, want, rtol=1e-9, atol=1e-14)
    again = baselines.ekfac_factors(problem, state)["h0.qkv"][2]
    assert torch.equal(again, lam)
    other = baselines.ekfac_factors(problem, state, tag=1)["h0.qkv"][2]
    assert not torch.equal(other, lam)


def test_ekfac_refit_is_the_fishers_diagonal_in_the_kronecker_eigenbasis():
    """Lambda[o, i] = E_x E_{y ~ p} (Q_G^T dW Q_A)[o, i]^2, computed from explicit per-example,
    per-label autograd gradients of a convolution's weight."""
    problem = problem_for(CNN + ["dataset.test_fraction=0.97", "train.batch_size=16"])  # a few dozen images
    state = problem.run()[0]
    q_a, q_g, lam, _ = baselines.ekfac_factors(problem, state)["block0.conv"]
    ds = problem.dataset
    want = torch.zeros_like(lam)
    for i in range(ds.n_train):
        params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
        logits, _ = problem.model.apply(params, state.buffers, ds.x_train[i:i + 1], train=False)
        log_p = torch.log_softmax(logits, -1)[0]
        for y in range(logits.shape[-1]):
            dw = torch.autograd.grad(-log_p[y], params["block0.conv.weight"], retain_graph=True)[0].flatten(1)
            want += log_p[y].exp().detach() * (q_g.T @ dw.double() @ q_a) ** 2 / ds.n_train
    torch.testing.assert_close(lam, want, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("model", ["cnn", "lm"])
def test_ekfac_and_source_run_on_convolutions_and_sequences_bit_identically(cli, tmp_path, model):
    small = [*CNN, "dataset.test_fraction=0.9"] if model == "cnn" else LM  # 180 images: enough for the taps
    args = [*small, f"out_dir={tmp_path}", "attribute.source.segments=2"]
    assert cli("train", *args)[0] == 0
    for method in ("ekfac", "source"):
        runs = []
        for _ in range(2):
            shutil.rmtree(tmp_path / "attribute" / method, ignore_errors=True)
            code, _, err = cli("attribute", "--test-ids", "0:3", "--method", method, *args)
            assert code == 0, err
            runs.append((tmp_path / "attribute" / method / "scores.npy").read_bytes())
        scores = np.load(tmp_path / "attribute" / method / "scores.npy")
        assert scores.shape[1] == 3 and np.isfinite(scores).all() and np.abs(scores).max() > 0
        assert runs[0] == runs[1]


def test_score_compares_all_methods_side_by_side(cli, tmp_path):
    args = [*TINY, f"out_dir={tmp_path}", "ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=8"]
    assert cli("train", *args)[0] == 0
    for method in ("magic", "grad-dot", "tracin", "trak", "ekfac", "source"):
        assert cli("attribute", "--test-ids", "0:4", "--method", method, *args)[0] == 0
    assert cli("retrain-ground-truth", *args)[0] == 0
    code, out, err = cli("score", *args)
    assert code == 0, err
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert sorted(summary["lds"]) == ["ekfac", "grad-dot", "magic", "source", "tracin", "trak"]
    assert all(summary["seconds"][m] > 0 for m in summary["lds"])
    assert summary["lds"]["magic"]["0.1"]["mean"] > 0.9
