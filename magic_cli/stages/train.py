"""The `magic train` stage: train deterministically and write train/ (checkpoints of the
configured strategy, the final state, the test outputs, metrics), or verify a finished run and
redo exactly what is missing or damaged.

It reads and verifies the run directory first, then trains (core/problem.py), then writes.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from magic_cli.config import Config, to_yaml
from magic_cli.core.losses import OUTPUT_FUNCTIONS
from magic_cli.core.problem import Problem, TrainState, flatten_state
from magic_cli.determinism import enable_determinism
from magic_cli.errors import ArtifactError, NonDeterminismError, NonFiniteError, StageError
from magic_cli.meta import run_meta
from magic_cli.progress import no_progress
from magic_cli.run_dir import (
    RunDir,
    Staged,
    load_json,
    load_record,
    npy_bytes,
    save_artifact,
    save_json,
    save_record,
    save_text,
    sha256_bytes,
    sidecar,
    status,
)
from magic_cli.run_dir import status as file_status
from magic_cli.stages.assemble import assemble
from magic_cli.stages.checkpoints import config_checkpoint_tag, state_bytes


@dataclass(frozen=True)
class TrainResult:
    """What one `magic train` did and the metrics of the run (deterministic, from its record)."""

    status: str  # trained | already (every file verified) | repaired
    repaired: tuple[str, ...]  # the files retrained and rewritten (repaired)
    test_accuracy: float
    train_accuracy: float
    test_loss: float
    train_loss: float
    steps: int
    n_train: int
    n_test: int
    train_seconds: float | None  # the training loop's time in this command (None: nothing trained)
    train_dir: Path

    @classmethod
    def of(cls, metrics: dict, status: str, repaired, train_seconds, train_dir) -> "TrainResult":
        keys = ("test_accuracy", "train_accuracy", "test_loss", "train_loss", "steps", "n_train", "n_test")
        return cls(status, tuple(repaired), *(metrics[k] for k in keys), train_seconds, Path(train_dir))


def train_stage(config: Config, run: RunDir, overrides: list[str], overwrite: bool = False,
                progress_factory=None) -> TrainResult:
    """Train and write train/, or verify a finished run and redo exactly what is missing or damaged.

    Every artifact is written with its sidecar (sha256, fingerprint); the record
    train/fingerprint.json is written last and marks a finished run. An intact artifact is never
    rewritten: a retraining that would produce other bytes is refused as non-deterministic.
    """

    created = not run.root.exists()
    run.claim()
    try:
        return _train_stage(config, run, overrides, overwrite, progress_factory)
    except BaseException:
        if created:  # a refused first training leaves nothing behind, not even the folder
            shutil.rmtree(run.root, ignore_errors=True)
        raise


def _train_stage(config, run, overrides, overwrite, progress_factory) -> TrainResult:

    with run.lock(exclusive=True):
        run.clean(exclusive=True)
        fingerprint = config.fingerprint()
        record = None
        if run.fingerprint_json.exists():
            try:
                record = load_record(run.fingerprint_json)
            except ArtifactError:
                record = None  # a damaged record is rewritten below, once training is checked again
        if overwrite:
            run.clear()
            record = None
        elif record is not None and record["fingerprint"] != fingerprint:
            raise StageError(f"{run.root} holds a run trained with a different config; choose another name=/out_dir= "
                             "or pass --overwrite (which deletes its attributions and ground truth)")
        # (the strategy's tag only for a finished run: with checkpoint.memory in bytes it builds the problem)
        names = sorted({*(record["files"] if record else []), run.final_state.name,
                        *(run.checkpoint_names(config_checkpoint_tag(config), record["steps"]) if record else []),
                        *(run.train_outputs(o).name for o in OUTPUT_FUNCTIONS)})
        expect = {"fingerprint": fingerprint}
        states = {name: status(run.train_file(name), expect) for name in names}
        if not overwrite and "stale" in states.values():
            raise StageError(f"{run.root} holds files of a run trained with a different config; choose another "
                             "out_dir or pass --overwrite")
        if record is not None and all(s == "ok" for s in states.values()):
            return TrainResult.of(record["metrics"], "already", (), None, run.train_dir)
        return _train_and_write(config, run, overrides, record, names, states, progress_factory)


def _train_and_write(config, run, overrides, record, names, states, progress_factory) -> TrainResult:

    determinism = enable_determinism(config.device, config.threads)
    problem = assemble(config)
    T, fingerprint = problem.total_steps, config.fingerprint()
    expect = {"fingerprint": fingerprint}
    tag = config_checkpoint_tag(config, problem.init_state())
    names = sorted(set(names) | set(run.checkpoint_names(tag, T)))
    states = {n: states[n] if n in states else file_status(run.train_file(n), expect) for n in names}

    def check_intact(name, data):  # an intact file: retraining must reproduce it exactly
        if load_json(sidecar(run.train_file(name)))["sha256"] != sha256_bytes(data):
            raise NonDeterminismError(f"training is not deterministic here: retraining gives another {name} "
                                      f"than the one stored in {run.train_dir}; nothing was changed")

    # Checkpoint states go to disk as training reaches them (one file each, never all in memory):
    # staged as temporary files, put in place once everything else is checked.
    by_step: dict = {}
    for name in (n for n in names if n.startswith("checkpoints_")):
        by_step.setdefault(run.step_of(name), []).append(name)
    staged, sink_seconds = Staged(), [0.0]

    def sink(t, state):
        begin = time.perf_counter()
        if t in by_step:
            data = state_bytes(state)
            for name in by_step[t]:
                if states[name] == "ok":
                    check_intact(name, data)
                else:
                    staged.add(run.train_file(name), data, {**expect, "step": t})
        sink_seconds[0] += time.perf_counter() - begin

    try:
        with (progress_factory or no_progress)("train", T) as advance:
            final, _, seconds = problem.run(progress=advance, check=sink)
        seconds -= sink_seconds[0]  # the loop's own time, without writing the states
        ds = problem.dataset
        outputs = problem.outputs(final)
        train_out = problem.outputs(final, ds.x_train, ds.y_train)
        _check_converged(problem, final, train_out)
        data = {run.final_state.name: state_bytes(final),
                **{run.train_outputs(o).name: npy_bytes(outputs[o]) for o in OUTPUT_FUNCTIONS}}
        for name in (n for n in data if states[n] == "ok"):
            check_intact(name, data[name])
        staged.commit()
    finally:
        staged.discard()
    repaired = _summary([n for n in names if states[n] != "ok" and (states[n] != "missing" or record is not None)])
    for name in (n for n in data if states[n] != "ok"):
        save_artifact(run.train_file(name), data[name], expect)
    seconds_now = {"train_seconds": seconds}
    metrics = record["metrics"] if record is not None else {
        "test_accuracy": float(np.mean(outputs["correct"])),
        "train_accuracy": float(np.mean(train_out["correct"])),
        "test_loss": float(np.mean(outputs["loss"])),
        "train_loss": float(np.mean(train_out["loss"])),
        "steps": T,
        "n_train": ds.n_train,
        "n_test": ds.n_test,
    }  # deterministic: the record holds no timing (metrics.json does)
    save_text(run.config_yaml, to_yaml(config.raw))
    save_text(run.overrides_txt, "".join(f"{o}\n" for o in overrides))
    save_json(run.meta_json, run_meta(config, determinism))
    save_json(run.metrics_json, {**metrics, **seconds_now})
    # Written last: its presence marks a finished training run.
    save_record(run.fingerprint_json, {
        "fingerprint": fingerprint, "slice": config.training_slice(), "steps": T, "metrics": metrics,
        "files": names, "checkpoint_tag": record["checkpoint_tag"] if record else tag})
    status = "trained" if record is None and not repaired else "repaired"
    return TrainResult.of(metrics, status, repaired, seconds, run.train_dir)


def _summary(names: list[str]) -> list[str]:
    """File names for a message: the states of one checkpoint folder as 'checkpoints_<tag>/ (n states)'."""
    out, folders = [], {}
    for name in names:
        folder, sep, _ = name.partition("/")
        if sep:
            folders[folder] = folders.get(folder, 0) + 1
        else:
            out.append(name)
    return out + [f"{f}/ ({n} state{'s' if n > 1 else ''})" for f, n in folders.items()]


DIVERGED = 3.0  # a final train loss above this multiple of the loss at initialisation: diverged


def _check_converged(problem: Problem, final: TrainState, train_out: dict) -> None:
    """Refuse a run whose scores would mean nothing: a non-finite state, or a training loss that
    ends above DIVERGED times its value at initialisation. (A short run may end slightly above
    it: eval-mode BatchNorm with barely updated running statistics.)"""
    lr = f"optimizer.lr={problem.config.optimizer.lr:g}"
    if not all(bool(torch.isfinite(v).all()) for v in flatten_state(final).values()):
        raise NonFiniteError(f"training produced NaN/Inf parameters ({lr}): lower optimizer.lr")
    start = float(np.mean(problem.outputs(problem.init_state(), problem.dataset.x_train,
                                          problem.dataset.y_train)["loss"]))
    end = float(np.mean(train_out["loss"]))
    if not math.isfinite(end) or end > DIVERGED * start:
        raise NonFiniteError(f"training diverged: train loss {start:.4g} at initialisation, {end:.4g} after "
                             f"training ({lr}); lower optimizer.lr")
