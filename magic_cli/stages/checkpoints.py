"""The training states a run directory stores: the configured strategy's checkpoints, loaded
(verified now, read when needed) or derived by replaying training from the ones `train` stored.

Stage-level: it reads and writes the run directory (run_dir.py names every file) and calls the
core (core/problem.py, core/replay.py).
"""

from __future__ import annotations

from magic_cli.config import Config
from magic_cli.core.problem import Problem, TrainState, flatten_state, state_size, states_equal, unflatten_state
from magic_cli.errors import ConfigError, NonDeterminismError
from magic_cli.run_dir import Staged, checkpoint_tag, load_tensors, tensors_bytes, verify
from magic_cli.stages.assemble import assemble


def checkpoint_param(config: Config, template: TrainState | None = None) -> int:
    """The strategy's parameter (config.checkpoint.param). A binomial memory given in bytes is the
    number of whole training states that fit in it: a pure function of the config, since a state's
    size follows from its shapes and dtype (`template`, a state; built from the config if None)."""
    ck = config.checkpoint
    if ck.name != "binomial" or ck.memory_bytes is None:
        return ck.param
    if template is None:
        template = assemble(config).init_state()
    size = state_size(template)
    states = ck.memory_bytes // size
    if states < 3:
        raise ConfigError(f"checkpoint.memory={ck.memory} holds {states} training state{'s' * (states != 1)} of "
                          f"{size:,} bytes; checkpoint=binomial needs room for at least 3 ({3 * size:,} bytes)")
    return states


def config_checkpoint_tag(config: Config, template: TrainState | None = None) -> str:
    """checkpoint_tag of config.checkpoint, its memory in bytes resolved (checkpoint_param)."""
    return checkpoint_tag(config.checkpoint.name, checkpoint_param(config, template))


def state_bytes(state: TrainState) -> bytes:
    return tensors_bytes(flatten_state(state))


def load_checkpoints(run, tag: str, total_steps: int, template: TrainState, device, expect: dict) -> dict:
    """{t: loader} of a strategy's stored states: every file is verified now (digest and run), and
    read into memory on `device` only when its loader is called (the states stay on disk)."""
    paths = run.checkpoint_states(tag, total_steps)
    for path in paths.values():
        verify(path, expect, REPAIR)
    return {t: (lambda path=path: load_state(path, template, device)) for t, path in paths.items()}


def load_state(path, template: TrainState, device) -> TrainState:
    return unflatten_state({k: v.to(device) for k, v in load_tensors(path).items()}, template)


REPAIR = "run `magic train` with the same overrides to repair it"


def load_final(problem: Problem, run, record: dict, template: TrainState | None = None) -> TrainState:
    """The verified final state of the run (template: the shape of a state; s_0 if None)."""
    verify(run.final_state, {"fingerprint": record["fingerprint"]}, REPAIR)
    return load_state(run.final_state, problem.init_state() if template is None else template, problem.device)


def load_final_and_stored(problem: Problem, run, record: dict) -> tuple[TrainState, dict]:
    """The verified final state and the verified checkpoints of config.checkpoint, derived from
    the states `train` stored when this strategy's files do not exist yet."""
    expect = {"fingerprint": record["fingerprint"]}
    template = problem.init_state()  # the shape of a state (also s_0)
    final = load_final(problem, run, record, template)
    T = problem.total_steps
    tag = config_checkpoint_tag(problem.config, template)
    if tag != record["checkpoint_tag"] and not all(p.exists() for p in run.checkpoint_states(tag, T).values()):
        derive_checkpoints(problem, run, record, final, template)
    return final, load_checkpoints(run, tag, T, template, problem.device, expect)


def derive_checkpoints(problem: Problem, run, record: dict, final: TrainState, template: TrainState) -> None:
    """Write the checkpoints of config.checkpoint by replaying training from s_0, checking every
    state against those `train` stored (and the final one) bit for bit. A state is put in place
    only once a stored state after it has been reproduced; until then it is a temporary file."""
    expect = {"fingerprint": record["fingerprint"]}
    ck, T = problem.config.checkpoint, problem.total_steps
    source = record["checkpoint_tag"]
    stored = load_checkpoints(run, source, T, template, problem.device, expect)
    tag = config_checkpoint_tag(problem.config, template)
    wanted = {t: path for t, path in run.checkpoint_states(tag, T).items() if not path.exists()}
    staged = Staged()

    def check(t, state):
        expected = final if t == T else stored[t]() if t in stored else None
        if expected is not None:
            if not states_equal(state, expected):
                raise NonDeterminismError(f"training is not deterministic here: the state after step {t} differs "
                                          f"from the one in checkpoints_{source}/; checkpoints for "
                                          f"checkpoint={ck.name} cannot be derived")
            staged.commit()  # every state staged so far led to this verified one
        if t in wanted:
            staged.add(wanted[t], state_bytes(state), {**expect, "step": t})
            if expected is not None:
                staged.commit()

    try:
        problem.run(check=check)
    finally:
        staged.discard()


