"""The reverse pass of MAGIC: exact d f_j / d w for a batch of test examples j.

    lambda_T = d phi_j / d s_T                       (J cotangents at once)
    for t = T-1 ... 0:                               (states from replay.ReverseStates)
        (lambda_t, beta_t) = VJP of train_step at (s_t, w[B_t]) applied to lambda_{t+1}
        scores[j, B_t] += beta_t[j]                  (an example seen in several epochs accumulates)

One VJP through a step that itself contains a gradient is a backward-over-backward; the
weight part beta_t comes out of the same VJP because w enters the step linearly. The VJP
function of a step is computed once and applied to all J cotangents with torch.func.vmap,
so the forward recomputation and the step's graph are shared by the whole batch.

Sign: scores[j, i] = d f_j / d w_i at the training weights (a positive score for the loss
output means up-weighting example i raises test loss j).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.func import grad, vjp, vmap

from magic_cli.core.losses import OUTPUT_FUNCTIONS
from magic_cli.core.problem import Problem, TrainState, states_equal
from magic_cli.core.replay import ReverseStates
from magic_cli.errors import ConfigError, NonDeterminismError, NonFiniteError


class NonFiniteAdjointError(NonFiniteError):
    """The adjoint became NaN or Inf during the reverse pass."""


@dataclass
class ReverseStats:
    seconds: float = 0.0
    peak_states: int = 0
    forward_steps: int = 0
    steps: int = 0
    growth: list | None = None  # per group: (J,) max_t |lambda_t| / |lambda_T| over the parameters


# Adjoint norms are read at about this many steps of the reverse pass (a reduction over the
# cotangents each time; every step would cost a few per cent).
GROWTH_READINGS = 100
# An adjoint that grows by more than this over the reverse pass (orders of magnitude) means
# training amplifies perturbations: chaotic, and the linear prediction (LDS) will be poor.
GROWTH_WARN = 1e3


def adjoint_norms(lam: TrainState):
    """|lambda| over the parameters' part of the cotangents, per test id: (J,)."""

    return torch.stack([v.flatten(1).double().pow(2).sum(1) for v in lam.params.values()]).sum(0).sqrt()


def output_cotangents(problem: Problem, state: TrainState, test_ids, output: str) -> TrainState:
    """d f_j / d s_T for each test id j: a TrainState whose tensors have a leading (J,) dim."""

    ids = torch.as_tensor(list(test_ids), device=problem.device)
    x, y = problem.dataset.x_test[ids], problem.dataset.y_test[ids]
    fn = OUTPUT_FUNCTIONS[output]

    def f(params, buffers, xj, yj):
        logits, _ = problem.model.apply(params, buffers, xj[None], train=False)
        return fn(logits, yj[None]).sum()

    g_params, g_buffers = vmap(grad(f, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        state.params, state.buffers, x, y)
    zeros = lambda d: {k: zeros(v) if isinstance(v, dict) else  # noqa: E731
                       torch.zeros((len(ids), *v.shape), dtype=v.dtype, device=v.device)
                       for k, v in d.items()}
    return TrainState(g_params, g_buffers, zeros(state.opt))


def reverse_pass(problem: Problem, final: TrainState, stored: dict, strategy: str, k: int,
                 groups: list[list[int]], output: str, progress=None, batched_vjp=None):
    """[scores (J_g, N) per group], ReverseStats: one walk back over the states for all groups.

    Each state s_t is recomputed (or loaded) once and used by every group, so a replay costs the
    same for one group as for many; each group's reverse step is the one a pass of its own would
    take (the same vmap over the same ids), so its scores are bit-identical to a separate pass.
    The price is memory: every group's cotangents are held together.

    batched_vjp (compiled_vjp: torch.compile) replaces the batched backward-over-backward.

    `stored` maps the checkpoint steps `train` stored to states or lazy loaders; k is the
    strategy's parameter (replay's branching factor, binomial's memory). The final state, and for
    the strategies that recompute, every stored state, is compared bitwise with its recomputation.
    """
    T = problem.total_steps
    start = time.perf_counter()
    states = ReverseStates(lambda s, t: problem.step(s, t), stored, T, strategy, k)
    # Recomputed states are checked bitwise where `train` stored one: the final state, and for
    # sqrt/replay/binomial every stored checkpoint (with `all` nothing else is recomputed).
    check_at = {T: final} if strategy == "all" else {**stored, T: final}
    lams = [output_cotangents(problem, final, ids, output) for ids in groups]
    first = [adjoint_norms(lam).clamp(min=1e-300) for lam in lams]
    peak = [f.clone() for f in first]
    stride = max(1, T // GROWTH_READINGS)
    scores = [torch.zeros(len(ids), problem.dataset.n_train, dtype=problem.dtype, device=problem.device)
              for ids in groups]
    for done, (t, s_t) in enumerate(states):
        for g in range(len(groups)):
            check = g == 0 and t + 1 in check_at
            s_next, lams[g], beta = reverse_step(problem, s_t, t, lams[g], need_next=check, batched_vjp=batched_vjp)
            if check:
                expected = check_at[t + 1]
                expected = expected() if callable(expected) else expected
                if not states_equal(s_next, expected):
                    raise NonDeterminismError(
                        f"training is not deterministic: the state after step {t + 1} recomputed in the "
                        f"reverse pass differs from the one `magic train` stored")
            # A NaN/Inf in the adjoint reaches the weight cotangents beta within a step or two; checking
            # beta (J, B) is cheap, where checking every leaf of the state would cost a pass per step.
            if not bool(torch.isfinite(beta.sum())):
                raise NonFiniteAdjointError(
                    f"the adjoint became NaN/Inf around step {t}: increase optimizer.eps_root or lower "
                    f"optimizer.lr")
            scores[g][:, problem.schedule[t].to(problem.device)] += beta
            if t % stride == 0:
                peak[g] = torch.maximum(peak[g], adjoint_norms(lams[g]))
        if progress is not None:
            progress(done + 1)
    growth = [(p / f).cpu().tolist() for p, f in zip(peak, first)]
    stats = ReverseStats(time.perf_counter() - start, states.peak_states, states.forward_steps, T, growth)
    return scores, stats


def reverse_step(problem: Problem, state: TrainState, t: int, lam: TrainState, need_next: bool = True,
                 batched_vjp=None):
    """One step of the reverse pass at s_t for J cotangents lam (leading dim J) of s_{t+1}.

    Returns (s_{t+1} or None unless need_next, cotangents of s_t, beta (J, B) = cotangent of
    the batch weights). The
    step is split as train_step is: grads = grad_fn(params, buffers, w), then the optimizer
    update. The update's VJP is the optimizer's hand-derived `vjp`; the gradient's VJP is a
    backward-over-backward, with plain autograd for one cotangent and torch.func.vmap over
    torch.func.vjp for several (both give the same values; the first has less overhead).
    `batched_vjp` (compiled_vjp) replaces the latter for several cotangents; the gradient itself
    is then computed as training computes it, so s_{t+1} stays bit-equal to the stored states.
    """

    batch = problem.batch(t)
    idx = problem.schedule[t].to(problem.device)
    w = problem.weights[idx]
    J = next(iter(torch.utils._pytree.tree_leaves(lam))).shape[0]

    if J == 1:
        grads, new_buffers, grad_vjp = _grad_vjp_autograd(problem, state, batch, w)
    elif batched_vjp is not None:
        grads, new_buffers = problem.grad_fn(state.params, state.buffers, batch.x, batch.y, w)
        grad_vjp = lambda cts: batched_vjp(state.params, state.buffers, batch.x, batch.y, w, cts)  # noqa: E731
    else:
        (grads, new_buffers), fn = vjp(lambda p, b, w_: problem.grad_fn(p, b, batch.x, batch.y, w_),
                                       state.params, state.buffers, w)
        grad_vjp = vmap(fn)
    s_next = None
    if need_next:  # only to compare with a stored state: the reverse pass itself does not need it
        new_params, new_opt = problem.optimizer.update(grads, state.opt, state.params, t)
        s_next = TrainState(new_params, new_buffers, new_opt)
    ct_p, ct_opt, ct_g = problem.optimizer.vjp(grads, state.opt, state.params, t, lam.params, lam.opt)
    hvp_p, ct_buffers, beta = grad_vjp((ct_g, lam.buffers))
    ct_params = {k: ct_p[k].add_(hvp_p[k]) for k in ct_p}  # in place: the reverse pass owns ct_p
    return s_next, TrainState(ct_params, ct_buffers, ct_opt), beta


# attribute.compile=auto compiles when training takes at least this many matmul and convolution
# FLOPs (training_flops): a pure function of the config, so every command on a run decides alike
# (compiled and eager scores differ in the last bits). Measured on 2 CPU cores (docs/performance.md):
# compiling takes 5-70 s once per group size (seconds from torch's on-disk cache), and saves about
# half of the eager batched pass, which costs 5-25 trainings per group; the shipped experiments
# at or above 1e10 (digits_cnn 5e10, text_tiny_lm and gpt2_tiny_chars 1.7e11, the ResNet example
# 1.3e10) gain more than the compile costs, those below (digits_mlp 7e8, breast_cancer_logreg
# 1e6) gain a second or two.
AUTO_COMPILE_FLOPS = 1e10


def training_flops(problem: Problem) -> float:
    """Matmul and convolution FLOPs of the training run: one step's forward and backward on the
    first batch, counted by torch's FlopCounterMode (a function of the shapes), times the steps."""
    from torch.utils.flop_counter import FlopCounterMode

    state, batch = problem.init_state(), problem.batch(0)
    w = problem.weights[problem.schedule[0].to(problem.device)]
    with FlopCounterMode(display=False) as counter:
        problem.grad_fn(state.params, state.buffers, batch.x, batch.y, w)
    return float(counter.get_total_flops()) * problem.total_steps


def should_compile(problem: Problem, setting) -> bool:
    """attribute.compile resolved: true, false, or auto (training_flops >= AUTO_COMPILE_FLOPS)."""
    if setting == "auto":
        return training_flops(problem) >= AUTO_COMPILE_FLOPS
    return bool(setting)


class CompiledVJP:
    """(params, buffers, x, y, w, (ct_grads, ct_buffers)) -> (J cotangents of params, of buffers,
    of w), the vmapped VJP of the gradient as one torch.compile'd function: the inductor fuses the
    elementwise work of the backward-over-backward that dominates the eager step
    (docs/performance.md, `attribute.compile`). Make one per command: it is recompiled for each
    new shape (a group of another size); a failure to compile is one line.

    `compile_seconds`: the time spent compiling, estimated per shape as its first call's seconds
    less its second's (the first call compiles, then runs as the second does)."""

    def __init__(self, problem: Problem):
        def fn(params, buffers, x, y, w, cotangents):
            _, pullback = vjp(lambda p, b, w_: problem.grad_fn(p, b, x, y, w_), params, buffers, w)
            return vmap(pullback)(cotangents)

        # One compiler state per command: a fresh cache (its recompile limit then counts this
        # command's group sizes only), the whole function as one graph (no silent eager pieces), and
        # a failure rather than a silent fallback to eager once the limit is hit.
        torch._dynamo.reset()
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        self._compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        self._calls: dict = {}  # shape -> calls so far
        self.compile_seconds = 0.0
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def __call__(self, params, buffers, x, y, w, cotangents):
        shape = (tuple(x.shape), next(iter(torch.utils._pytree.tree_leaves(cotangents))).shape[0])
        calls = self._calls.get(shape, 0)
        self._calls[shape] = calls + 1
        begin = time.perf_counter()
        try:
            out = self._compiled(params, buffers, x, y, w, cotangents)
        except Exception as e:  # any compiler failure (no C++ compiler, an op inductor cannot lower...)
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
            first = lines[1] if lines[0].endswith("raised:") and len(lines) > 1 else lines[0]  # the backend's own
            raise ConfigError(f"attribute.compile: torch.compile failed on this model ({type(e).__name__}: "
                              f"{first[:200]}); run with attribute.compile=false") from None
        if calls < 2:
            self._sync()
            seconds = time.perf_counter() - begin
            self.compile_seconds += seconds if calls == 0 else -min(seconds, self.compile_seconds)
        return out


def compiled_vjp(problem: Problem) -> CompiledVJP:
    return CompiledVJP(problem)


def _grad_vjp_autograd(problem: Problem, state: TrainState, batch, w):
    """grads, new_buffers, and a VJP function for ONE cotangent with a leading dim of 1."""

    with torch.enable_grad():
        params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
        buffers = {k: v.detach().requires_grad_() for k, v in state.buffers.items()}
        w = w.detach().requires_grad_()
        grads, new_buffers = problem.grad_fn(params, buffers, batch.x, batch.y, w)

    def grad_vjp(cotangents):
        ct_g, ct_buf = cotangents
        outs = list(grads.values()) + list(new_buffers.values())
        cts = [ct_g[k][0] for k in grads] + [ct_buf[k][0] for k in new_buffers]
        ins = list(params.values()) + list(buffers.values()) + [w]
        res = torch.autograd.grad(outs, ins, grad_outputs=cts, allow_unused=True, materialize_grads=True)
        n = len(params)
        return ({k: r[None] for k, r in zip(params, res[:n])},
                {k: r[None] for k, r in zip(buffers, res[n:n + len(buffers)])}, res[-1][None])

    detach = lambda d: {k: v.detach() for k, v in d.items()}  # noqa: E731
    return detach(grads), detach(new_buffers), grad_vjp
