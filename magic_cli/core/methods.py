"""Attribution methods behind one interface, in one registry: MAGIC (exact, the reverse pass
through training) and the approximate baselines (grad-dot, TracIn, TRAK, EK-FAC, SOURCE).

Every method gives scores[i, j] = d f_j / d w_i on the same scale and sign (baselines are put on
MAGIC's scale, baselines.py), for groups of test ids; the attribute stage (stages/attribute.py)
owns the files, resumability and merging, and asks the method only:

    settings(config)              what identifies its scores besides the output (saved with them)
    plan(config, problem, state, n_ids) -> GroupPlan: test ids per group, groups per pass
    passes(groups, config, plan)  the groups each pass takes
    prepare(problem, final, stored, config, checkpoint_param) -> run(passes, output, progress) -> PassResult

ATTRIBUTORS is keyed by magic_cli.names.METHODS (checked at import).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from magic_cli.core import baselines
from magic_cli.core.memory import MemoryPlan, plan_groups
from magic_cli.core.metagrad import compiled_vjp, reverse_pass
from magic_cli.core.problem import Problem, TrainState
from magic_cli.names import METHODS

if TYPE_CHECKING:
    from magic_cli.config import Config


@dataclass(frozen=True)
class GroupPlan:
    batch_size: int  # test ids per group
    groups_per_pass: int | None = None  # groups sharing one pass (None: the method's default)
    memory: MemoryPlan | None = None  # how attribute.memory sized the groups, if it did


@dataclass
class PassResult:
    """One pass over some groups of test ids."""

    scores: list  # per group: float numpy (J_g, N)
    growth: list  # per group: [max_t |lambda_t| / |lambda_T| or None] per test id
    peak_states: int = 0  # training states held at once (MAGIC)
    forward_steps: int = 0  # training steps recomputed (MAGIC)
    fixed_seconds: float = 0.0  # of the pass, the training set's side: what does not grow with the test ids
    compile_seconds: float = 0.0  # of the pass, compiling (MAGIC with attribute.compile): once per group size


class Attributor(Protocol):
    name: str
    walks_training: bool  # a pass walks back over the T training steps (the stage draws a progress bar)

    def settings(self, config: "Config") -> dict: ...

    def plan(self, config: "Config", problem: Problem, state: TrainState, n_ids: int) -> GroupPlan: ...

    def passes(self, groups: list[list[int]], config: "Config", plan: GroupPlan) -> list[list[list[int]]]: ...

    def prepare(self, problem: Problem, final: TrainState, stored: dict, config: "Config",
                checkpoint_param: int, memo: dict | None = None) -> Callable[..., PassResult]: ...


@dataclass
class Magic:
    """Exact: d f_j / d w by reverse-mode through the whole training run (core/metagrad.py)."""

    name: str = "magic"
    walks_training: bool = True

    def settings(self, config) -> dict:
        # compiled scores have other last bits than eager ones: never merged into one folder
        if not isinstance(config.attribute.compile, bool):
            raise ValueError("attribute.compile must be resolved (stages.attribute.resolve_compile) first")
        return {"compile": True} if config.attribute.compile else {}

    def plan(self, config, problem, state, n_ids) -> GroupPlan:
        ac = config.attribute
        if ac.memory is None:
            return GroupPlan(ac.batch_size)
        memory = plan_groups(problem, state, ac.memory_bytes, ac.batch_size, ac.replay_groups, n_ids,
                             config.checkpoint.name != "all")
        return GroupPlan(memory.batch_size, memory.groups_per_pass, memory)

    def passes(self, groups, config, plan) -> list:
        """With a strategy that recomputes states (sqrt, replay, binomial), up to
        attribute.replay_groups groups (0: all; the memory plan's number when attribute.memory chose
        it) share one replay of training; with `all` (nothing recomputed), one group per pass."""
        share = plan.groups_per_pass or config.attribute.replay_groups or len(groups)
        if config.checkpoint.name == "all":
            share = 1
        return [groups[i:i + share] for i in range(0, len(groups), share)]

    def prepare(self, problem, final, stored, config, checkpoint_param, memo=None) -> Callable[..., PassResult]:
        vjp = compiled_vjp(problem) if config.attribute.compile is True else None  # one per command, per group size

        def run(passes, output, progress=None) -> PassResult:
            compiling = vjp.compile_seconds if vjp is not None else 0.0
            results, stats = reverse_pass(problem, final, stored, config.checkpoint.name, checkpoint_param, passes,
                                          output, progress=progress, batched_vjp=vjp)
            compiled = (vjp.compile_seconds - compiling) if vjp is not None else 0.0
            return PassResult([r.cpu().numpy() for r in results], stats.growth, stats.peak_states,
                              stats.forward_steps, compile_seconds=compiled)

        return run


@dataclass
class Baseline:
    """An approximate method (core/baselines.py): all test ids in one group, one pass."""

    name: str
    fn: Callable  # (problem, final, test_ids, output, options, clock) -> (N, J) tensor
    options_of: Callable = lambda config: {}  # noqa: E731  (its hyperparameters from the config)
    shares: bool = False  # fn takes `memo`: what several of its hyperparameter values share (magic tune)
    walks_training: bool = False

    def settings(self, config) -> dict:
        return self.options_of(config)

    def plan(self, config, problem, state, n_ids) -> GroupPlan:
        return GroupPlan(max(1, n_ids))

    def passes(self, groups, config, plan) -> list:
        return [[group] for group in groups]

    def prepare(self, problem, final, stored, config, checkpoint_param, memo=None) -> Callable[..., PassResult]:
        """`memo`: a dict kept across calls on one trained run and output (magic tune's grid), in
        which EK-FAC and SOURCE keep what their hyperparameters do not change (states, factors)."""
        options = self.settings(config)
        shared = {"memo": memo} if self.shares else {}

        def run(passes, output, progress=None) -> PassResult:
            clock = baselines.Clock()
            scores = [self.fn(problem, final, group, output, options, clock, **shared).T.to(problem.dtype).cpu().numpy()
                      for group in passes]
            return PassResult(scores, [[None] * len(group) for group in passes], fixed_seconds=clock.fixed)

        return run


ATTRIBUTORS: dict[str, Attributor] = {
    "magic": Magic(),
    "grad-dot": Baseline("grad-dot", baselines.grad_dot),
    "tracin": Baseline("tracin", baselines.tracin, lambda config: dataclasses.asdict(config.attribute.tracin)),
    "trak": Baseline("trak", baselines.trak, lambda config: dataclasses.asdict(config.attribute.trak)),
    "ekfac": Baseline("ekfac", baselines.ekfac, lambda config: dataclasses.asdict(config.attribute.ekfac), shares=True),
    "source": Baseline("source", baselines.source, lambda config: dataclasses.asdict(config.attribute.source),
                       shares=True),
}
assert tuple(ATTRIBUTORS) == METHODS, "the registry and magic_cli.names.METHODS list the same methods"


__all__ = ["ATTRIBUTORS", "Attributor", "GroupPlan", "PassResult"]
