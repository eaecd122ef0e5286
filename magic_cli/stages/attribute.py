"""The `magic attribute` stage: scores for the requested test ids by one method, resumable.

    attribute/<method>/settings.json   the settings (output, options) and fingerprint of the folder
    attribute/<method>/test_<id>.npy   (N,) scores of one test id, with its sidecar test_<id>.json
    attribute/<method>/scores.npy      (N, n_ids) every valid test id of the folder, ids ascending
    attribute/<method>/scores.json     its sidecar: test_ids, output, method, sign, fingerprint, sha256, seconds,
                                       adjoint_growth (per id: max_t |lambda_t| / |lambda_T|, MAGIC only)
    attribute/<method>/last_run.json   what the last `attribute` did: ids asked and computed, seconds,
                                       checkpoint strategy, peak states, forward steps (not an input)

A per-id file is reused only if its sidecar carries this run's fingerprint and these settings
and its digest matches; anything else is recomputed, never merged. The requested ids are cut
into fixed groups of attribute.batch_size (in the order given); a group with any id missing
is recomputed whole, so a killed and rerun command gives exactly the bytes of an undisturbed
one. (Batched kernels may round an id's scores differently in another group: float32 scores
of one id computed in two different groups can differ in the last bits.)

The merge into scores.npy holds attribute/<method>/.merge.lock, so processes attributing
disjoint ids of one run never lose each other's results, and scores.npy is written before
its sidecar, which holds its digest: a reader never takes one without the other.

MAGIC (metagrad.py) and the baselines (baselines.py) share the layout and the sign
convention scores[i, j] = d f_j / d w_i, so `magic score` treats them alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magic_cli.config import Config, from_dict, parse_test_ids
from magic_cli.core import metagrad
from magic_cli.core.methods import ATTRIBUTORS
from magic_cli.core.problem import state_size
from magic_cli.determinism import enable_determinism
from magic_cli.errors import ArtifactError, StageError
from magic_cli.launcher import Piece, run_pieces
from magic_cli.progress import no_progress
from magic_cli.run_dir import (
    RunDir,
    json_text,
    load_json,
    load_npy,
    npy_bytes,
    remove_artifact,
    save_artifact,
    save_json,
    sha256_bytes,
    status,
    valid_record,
    verify,
)
from magic_cli.stages.assemble import assemble
from magic_cli.stages.checkpoints import checkpoint_param, load_final_and_stored
from magic_cli.stages.tune import with_tuned

SIGN = "d output / d weight"


def attribute_stage(config: Config, run: RunDir, test_ids_spec: str, overwrite: bool = False,
                    progress_factory=None, apply_tuning: bool = True) -> AttributeResult:
    """Compute the missing groups of test ids with config.attribute.method; merge; say what was done."""
    # config.py admits only float32/float64: half precision gives meaningless metagradients.
    enable_determinism(config.device, config.threads)
    with run.lock(exclusive=False):
        run.clean(exclusive=False)
        record = run.require_trained(config)
        # the values `magic tune` chose, unless given on the command line (a cluster job's config has them)
        tuned, applied = with_tuned(config, run, record) if apply_tuning else (config, {})
        problem = assemble(tuned)
        tuned = resolve_compile(tuned, problem, run, record["fingerprint"])
        result = _attribute(tuned, run, record, problem, test_ids_spec, overwrite, progress_factory)
        return dataclasses.replace(result, tuned=applied)


def resolve_compile(config, problem, run=None, fingerprint: str | None = None):
    """The config with attribute.compile=auto replaced by what it means for this problem: the
    choice the run's attribute/magic/ folder already holds (for the same training run and output:
    its scores stay usable whatever the rule says), else metagrad.should_compile, a function of the
    config alone, so every command decides alike. The baselines never compile."""
    setting = config.attribute.compile
    if isinstance(setting, bool):
        return config
    chosen = False
    if config.attribute.method == "magic":
        held = _held_settings(run, fingerprint) if run is not None else None
        if held is not None and held.get("output") == config.attribute.output:
            chosen = held.get("options", {}).get("compile") is True
        else:
            chosen = metagrad.should_compile(problem, setting)
    # config.raw keeps `auto`: a cluster job rebuilt from it resolves it the same way (the folder's choice)
    return dataclasses.replace(config, attribute=dataclasses.replace(config.attribute, compile=chosen))


def _held_settings(run, fingerprint) -> dict | None:
    """The settings of attribute/magic/'s scores, if they belong to this training run."""
    old = _folder_settings(run, "magic")
    if not isinstance(old, dict) or old.get("fingerprint") != fingerprint or not isinstance(old.get("settings"), dict):
        return None
    return old["settings"]


def _folder_settings(run, method: str) -> dict | None:
    """attribute/<method>/settings.json, or None if absent, torn or damaged (the per-id sidecars
    still say what each file is)."""
    path = run.attribute_settings(method)
    try:
        return load_json(path) if path.is_file() else None
    except ValueError:
        return None


def settings_of(config) -> dict:
    """What identifies a folder's scores besides the run: the method, the output, and the method's
    own settings (compiled MAGIC scores have other last bits than eager ones: never merged)."""
    method = config.attribute.method
    return {"method": method, "output": config.attribute.output, "options": ATTRIBUTORS[method].settings(config)}


def identity(config, record: dict) -> dict:
    """What every artifact of attribute/<method>/ must carry to belong to this run and settings."""

    settings = sha256_bytes(json_text(settings_of(config)).encode())[:16]
    return {"fingerprint": record["fingerprint"], "settings": settings}


@dataclass(frozen=True)
class AttributeResult:
    """What one `magic attribute` did, and the merged scores it left."""

    method: str
    output: str
    test_ids: tuple[int, ...]  # requested, in the order given
    ids_computed: int  # of them, computed by this command (the others were valid already)
    seconds: float
    compile_seconds: float  # of `seconds`, compiling (attribute.compile): once per group size and process
    steps: int  # training steps T
    batch_size: int  # test ids per group
    peak_states: int  # training states held at once (MAGIC's reverse pass; 0 for the baselines)
    forward_steps: int  # training steps recomputed (MAGIC)
    checkpoint: str  # the strategy used for the stored states
    scores_path: Path  # attribute/<method>/scores.npy, (N, merged_ids)
    shape: tuple[int, int]
    merged_ids: int
    adjoint_growth: float | None  # the largest growth of the adjoint over the requested ids (MAGIC)
    grown_ids: tuple[int, ...]  # requested ids whose adjoint grew beyond GROWTH_WARN
    tuned: dict = dataclasses.field(default_factory=dict)  # the values of `magic tune` this command used


def _attribute(config, run, record, problem, test_ids_spec, overwrite, progress_factory) -> AttributeResult:
    ids = parse_test_ids(test_ids_spec, problem.dataset.n_test)
    settings, key = settings_of(config), identity(config, record)
    method, output = settings["method"], settings["output"]
    attributor = ATTRIBUTORS[method]
    _prepare_folder(run, method, settings, record["fingerprint"], overwrite)

    template = problem.init_state()
    plan = attributor.plan(config, problem, template, len(ids))
    size = plan.batch_size
    groups = [ids[i:i + size] for i in range(0, len(ids), size)]
    todo = [g for g in groups if overwrite or any(status(run.test_scores(method, i), {**key, "test_id": i}) != "ok"
                                                  for i in g)]
    seconds, compile_seconds, peak_states, forward_steps = 0.0, 0.0, 0, 0
    param = checkpoint_param(config, template)  # binomial's memory in bytes -> states
    computed, failed = sum(map(len, todo)), None
    if todo and config.launcher.name == "slurm":  # one array task per group, each writing its own files
        begin = time.perf_counter()
        failed = attribute_on_slurm(config, run, key, todo, progress_factory)
        seconds, todo = time.perf_counter() - begin, []
    if todo:
        final, stored = load_final_and_stored(problem, run, record)
        run_pass = attributor.prepare(problem, final, stored, config, param)
        done = 0
        for passes in attributor.passes(todo, config, plan):
            n_ids = sum(map(len, passes))
            done += n_ids
            label = (f"{method} {n_ids} id{'s' if n_ids > 1 else ''}"
                     f"{f' in {len(passes)} groups' if len(passes) > 1 else ''} ({done}/{sum(map(len, todo))})")
            begin = time.perf_counter()
            if attributor.walks_training:  # a walk over the training steps: a progress bar
                with (progress_factory or no_progress)(label, problem.total_steps) as advance:
                    result = run_pass(passes, output, advance)
            else:
                result = run_pass(passes, output)
            peak_states = max(peak_states, result.peak_states)
            forward_steps += result.forward_steps
            pass_seconds = time.perf_counter() - begin
            seconds += pass_seconds
            compile_seconds += result.compile_seconds
            for group, scores, grown in zip(passes, result.scores, result.growth):
                for j, test_id in enumerate(group):
                    save_artifact(run.test_scores(method, test_id), npy_bytes(scores[j]),
                                  {**key, "test_id": test_id, "group": group, "seconds": pass_seconds / n_ids,
                                   "pass": {"ids": n_ids, "seconds": pass_seconds, "fixed": result.fixed_seconds,
                                            "compile": result.compile_seconds},
                                   "adjoint_growth": grown[j]})
    invocation = {
        "method": method, "output": output, "test_ids": ids, "ids_computed": computed,
        "seconds": seconds, "compile_seconds": compile_seconds, "compiled": config.attribute.compile is True,
        "peak_states": peak_states, "forward_steps": forward_steps,
        "steps": problem.total_steps, "batch_size": size,
        "cost_batch": size if attributor.walks_training else None,
        **({"memory": plan.memory.as_dict()} if plan.memory else {}),
        "checkpoint": {"name": config.checkpoint.name, "param": param, "state_bytes": state_size(template),
                       **({"memory": config.checkpoint.memory} if config.checkpoint.name == "binomial" else {})},
    }
    side = merge_scores(run, method, key, settings, invocation)
    if failed:
        raise StageError(failed)
    missing = [i for i in ids if i not in set(side["test_ids"])]
    if missing:  # another process replaced one of ours between our write and the merge
        raise StageError(f"test ids {missing[:5]} of {run.attribute_dir(method)} were overwritten while this "
                         "command ran; run it again")
    grown = dict(zip(side["test_ids"], side["adjoint_growth"]))
    growth = [grown[i] for i in ids if grown.get(i) is not None]
    return AttributeResult(
        method=method, output=output, test_ids=tuple(ids), ids_computed=computed, seconds=seconds,
        compile_seconds=compile_seconds, steps=problem.total_steps, batch_size=size, peak_states=peak_states,
        forward_steps=forward_steps,
        checkpoint=config.checkpoint.name, scores_path=run.scores_npy(method), shape=tuple(side["shape"]),
        merged_ids=len(side["test_ids"]), adjoint_growth=max(growth) if growth else None,
        grown_ids=tuple(i for i in ids if (grown.get(i) or 0) > metagrad.GROWTH_WARN))


def _prepare_folder(run, method, settings, fingerprint, overwrite) -> None:
    """settings.json names what the folder's per-id files are: scores of another training run are
    deleted (they can never be used), scores of other settings are kept unless --overwrite."""

    path = run.attribute_settings(method)
    old = _folder_settings(run, method)
    if old is not None and old.get("fingerprint") == fingerprint and old.get("settings") != settings:
        if not overwrite:
            raise StageError(f"{run.attribute_dir(method)} holds scores computed with other settings "
                             f"({old.get('settings')}; `magic tune` changes a baseline's values, attribute.compile "
                             "MAGIC's); pass --overwrite to recompute")
    if old is None or old != {"fingerprint": fingerprint, "settings": settings}:
        if old is not None:
            for file in run.attribute_dir(method).glob("test_*.npy"):
                remove_artifact(file)
        save_json(path, {"fingerprint": fingerprint, "settings": settings})


@contextlib.contextmanager
def merge_lock(run, method: str, exclusive: bool):
    """Serialises merges of attribute/<method>/ (and lets a reader see scores.npy and its sidecar
    as one). Waits: a merge takes well under a second per thousand ids."""

    path = run.merge_lock_file(method)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def merge_scores(run, method: str, key: dict, settings: dict, invocation: dict) -> dict:
    """scores.npy (N, n) of every valid per-id file of the folder, ids ascending; its sidecar."""
    with merge_lock(run, method, exclusive=True):
        found = sorted(int(p.stem[len("test_"):]) for p in run.attribute_dir(method).glob("test_*.npy")
                       if p.stem[len("test_"):].isdigit())
        records = {i: valid_record(run.test_scores(method, i), {**key, "test_id": i}) for i in found}
        valid = [i for i in found if records[i] is not None]
        arrays = [load_npy(run.test_scores(method, i)) for i in valid]
        seconds = sum(records[i]["seconds"] for i in valid)
        merged = np.stack(arrays, axis=1) if arrays else np.zeros((0, 0))
        growth = [records[i].get("adjoint_growth") for i in valid]  # None for the baselines
        meta = {**key, **settings, "test_ids": valid, "sign": SIGN, "seconds": seconds, "adjoint_growth": growth,
                "cost": cost_split([records[i] for i in valid], invocation.get("cost_batch")),
                "shape": list(merged.shape),
                "dtype": str(merged.dtype)}
        side = save_artifact(run.scores_npy(method), npy_bytes(merged), meta)
        save_json(run.attribute_last_run(method), invocation)
        return side


def cost_split(records: list, batch: int | None) -> dict | None:
    """{fixed, per_id, batch}: a method's seconds split into the part of a pass that does not grow
    with its test ids (the training set's side: a baseline's training gradients and factors) and
    the rest per test id, from the per-id records (None for records written without it); batch:
    the ids a pass takes (MAGIC's attribute.batch_size; None: any number, the baselines); compile:
    the seconds spent compiling (MAGIC with attribute.compile), in neither of the others."""
    passes = {}
    for r in records:
        if "pass" not in r:
            return None
        passes[(r["pass"]["seconds"], r["pass"]["ids"], r["pass"]["fixed"])] = r["pass"]  # shared by its ids
    if not passes:
        return None
    ids = sum(p["ids"] for p in passes.values())
    fixed = sum(p["fixed"] for p in passes.values())
    compiling = sum(p.get("compile", 0.0) for p in passes.values())
    return {"fixed": fixed / len(passes),
            "per_id": (sum(p["seconds"] for p in passes.values()) - fixed - compiling) / ids,
            "batch": batch, "compile": compiling}


def load_scores(run, method: str, fingerprint: str):
    """(scores (N, n_ids), sidecar) of attribute/<method>/, verified; StageError naming what to run."""

    with merge_lock(run, method, exclusive=False):
        try:
            side = verify(run.scores_npy(method))
        except ArtifactError as e:
            raise StageError(f"{e}; rerun `magic attribute --method {method}` to rebuild it") from None
        if side.get("fingerprint") != fingerprint:
            raise StageError(f"attribute/{method} was computed for another training run; rerun `magic attribute "
                             f"--method {method} --overwrite`")
        return load_npy(run.scores_npy(method)), side


# --- launcher=slurm: groups of test ids as array tasks -----------------------------------------

def attribute_on_slurm(config, run, key: dict, groups: list[list[int]], progress_factory=None) -> str | None:
    """Attribution: one array task per group of attribute.batch_size test ids (the groups of a local
    run, so the bytes are a local run's). Returns None or the line saying what failed for good."""
    method = config.attribute.method

    def ok(i: int) -> bool:
        return status(run.test_scores(method, i), {**key, "test_id": i}) == "ok"

    pieces = [Piece(f"ids_{g[0]}-{g[-1]}_{len(g)}", (g,)) for g in groups]
    ids = [i for g in groups for i in g]
    return run_pieces(config, "attribute", pieces, attribute_job, lambda piece: all(map(ok, piece.args[0])),
                      lambda: sum(map(ok, ids)), len(ids), f"{method} on the cluster", progress_factory)


def attribute_job(cwd: str, raw: dict, ids: list[int]) -> int:
    """The body of one array task: attribute one group of test ids here (and merge, under the lock)."""
    os.chdir(cwd)
    config = from_dict(raw)
    # Exactly this group, as the submitting command formed it (with attribute.memory, from its measurement).
    here = dataclasses.replace(config, launcher=dataclasses.replace(config.launcher, name="local"),
                               attribute=dataclasses.replace(config.attribute, batch_size=len(ids), memory=None))
    return attribute_stage(here, RunDir(config.out_dir), ",".join(map(str, ids)), apply_tuning=False).ids_computed
