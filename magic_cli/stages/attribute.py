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
import os
import time

from magic_cli.errors import StageError
from magic_cli.stages.assemble import assemble

SIGN = "d output / d weight"


def attribute_stage(config, run, test_ids_spec: str, overwrite: bool = False, progress_factory=None) -> dict:
    """Compute the missing groups of test ids with config.attribute.method; merge; return a summary
    of this invocation: method, test_ids (requested), ids_computed, seconds, shape of scores.npy, ..."""
    from magic_cli.determinism import enable_determinism

    # config.py admits only float32/float64: half precision gives meaningless metagradients.
    enable_determinism(config.device, config.threads)
    with run.lock(exclusive=False):
        run.clean(exclusive=False)
        record = run.require_trained(config)
        problem = assemble(config)
        return _attribute(config, run, record, problem, test_ids_spec, overwrite, progress_factory)


def settings_of(config) -> dict:
    import dataclasses

    method = config.attribute.method
    if method == "magic":  # compiled scores have other last bits than eager ones: never mixed
        options = {"compile": True} if config.attribute.compile else {}
    else:
        chosen = {"trak": config.attribute.trak, "ekfac": config.attribute.ekfac}.get(method)
        options = dataclasses.asdict(chosen) if chosen else {}
    return {"method": method, "output": config.attribute.output, "options": options}


def identity(config, record: dict) -> dict:
    """What every artifact of attribute/<method>/ must carry to belong to this run and settings."""
    from magic_cli.run_dir import json_text, sha256_bytes

    settings = sha256_bytes(json_text(settings_of(config)).encode())[:16]
    return {"fingerprint": record["fingerprint"], "settings": settings}


def _attribute(config, run, record, problem, test_ids_spec, overwrite, progress_factory) -> dict:
    from magic_cli.config import parse_test_ids
    from magic_cli.core.baselines import BASELINES
    from magic_cli.core.metagrad import ReverseStats, reverse_pass
    from magic_cli.core.problem import state_size
    from magic_cli.progress import no_progress
    from magic_cli.run_dir import npy_bytes, save_artifact, status
    from magic_cli.stages.checkpoints import checkpoint_param, load_final_and_stored

    ids = parse_test_ids(test_ids_spec, problem.dataset.n_test)
    settings, key = settings_of(config), identity(config, record)
    method, output = settings["method"], settings["output"]
    _prepare_folder(run, method, settings, record["fingerprint"], overwrite)

    template = problem.init_state()
    size, share, plan = config.attribute.batch_size if method == "magic" else len(ids), None, None
    if method == "magic" and config.attribute.memory is not None:  # as many ids per group as fit
        from magic_cli.config import parse_bytes
        from magic_cli.core.memory import plan_groups

        plan = plan_groups(problem, template, parse_bytes(config.attribute.memory), size,
                           config.attribute.replay_groups, len(ids), config.checkpoint.name != "all")
        size, share = plan.batch_size, plan.groups_per_pass
    groups = [ids[i:i + size] for i in range(0, len(ids), size)]
    todo = [g for g in groups if overwrite or any(status(run.test_scores(method, i), {**key, "test_id": i}) != "ok"
                                                  for i in g)]
    stats = ReverseStats(steps=problem.total_steps)
    param = checkpoint_param(config, template)  # binomial's memory in bytes -> states
    computed, failed = sum(map(len, todo)), None
    if todo and config.launcher.name == "slurm":  # one array task per group, each writing its own files
        from magic_cli.launcher import attribute_on_slurm

        begin = time.perf_counter()
        failed = attribute_on_slurm(config, run, key, todo, progress_factory)
        stats.seconds, todo = time.perf_counter() - begin, []
    if todo:
        final, stored = load_final_and_stored(problem, run, record)
        batched_vjp = None
        if method == "magic" and config.attribute.compile:
            from magic_cli.core.metagrad import compiled_vjp

            batched_vjp = compiled_vjp(problem)  # one per command: compiled once per group size
        done = 0
        for passes in _passes(todo, method, config, share):
            n_ids = sum(map(len, passes))
            done += n_ids
            label = (f"{method} {n_ids} id{'s' if n_ids > 1 else ''}"
                     f"{f' in {len(passes)} groups' if len(passes) > 1 else ''} ({done}/{sum(map(len, todo))})")
            begin = time.perf_counter()
            if method == "magic":
                with (progress_factory or no_progress)(label, problem.total_steps) as advance:
                    results, st = reverse_pass(problem, final, stored, config.checkpoint.name,
                                               param, passes, output, progress=advance,
                                               batched_vjp=batched_vjp)
                stats.peak_states = max(stats.peak_states, st.peak_states)
                stats.forward_steps += st.forward_steps
                results = [r.cpu().numpy() for r in results]
                growth = st.growth
            else:
                options = settings["options"]
                results = [BASELINES[method](problem, final, group, output, options).T.to(problem.dtype).cpu().numpy()
                           for group in passes]
                growth = [[None] * len(group) for group in passes]
            seconds = time.perf_counter() - begin
            stats.seconds += seconds
            for group, scores, grown in zip(passes, results, growth):
                for j, test_id in enumerate(group):
                    save_artifact(run.test_scores(method, test_id), npy_bytes(scores[j]),
                                  {**key, "test_id": test_id, "group": group, "seconds": seconds / n_ids,
                                   "adjoint_growth": grown[j]})
    invocation = {
        "method": method, "output": output, "test_ids": ids, "ids_computed": computed,
        "seconds": stats.seconds, "peak_states": stats.peak_states, "forward_steps": stats.forward_steps,
        "steps": problem.total_steps, "batch_size": size, **({"memory": plan.as_dict()} if plan else {}),
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
    from magic_cli.core.metagrad import GROWTH_WARN

    grown = dict(zip(side["test_ids"], side["adjoint_growth"]))
    growth = [grown[i] for i in ids if grown.get(i) is not None]
    return {**invocation, "shape": side["shape"], "merged_ids": len(side["test_ids"]),
            "adjoint_growth": max(growth) if growth else None,
            "grown_ids": [i for i in ids if (grown.get(i) or 0) > GROWTH_WARN]}


def _passes(todo: list[list[int]], method: str, config, share: int | None = None) -> list[list[list[int]]]:
    """The groups each reverse pass takes. With a strategy that recomputes states (sqrt, replay,
    binomial), up to attribute.replay_groups groups (0: all; `share` when attribute.memory chose it)
    share one replay of training; with `all` (nothing recomputed) and for the baselines, one group
    per pass, each written as it ends."""
    share = share or config.attribute.replay_groups or len(todo)
    if method != "magic" or config.checkpoint.name == "all":
        share = 1
    return [todo[i:i + share] for i in range(0, len(todo), share)]


def _prepare_folder(run, method, settings, fingerprint, overwrite) -> None:
    """settings.json names what the folder's per-id files are: scores of another training run are
    deleted (they can never be used), scores of other settings are kept unless --overwrite."""
    from magic_cli.run_dir import load_json, remove_artifact, save_json

    path = run.attribute_settings(method)
    try:
        old = load_json(path) if path.is_file() else None
    except ValueError:
        old = None  # torn or damaged: the per-id sidecars still say what each file is
    if old is not None and old.get("fingerprint") == fingerprint and old.get("settings") != settings:
        if not overwrite:
            raise StageError(f"{run.attribute_dir(method)} holds scores computed with other settings "
                             f"({old.get('settings')}); pass --overwrite to recompute")
    if old is None or old != {"fingerprint": fingerprint, "settings": settings}:
        if old is not None:
            for file in run.attribute_dir(method).glob("test_*.npy"):
                remove_artifact(file)
        save_json(path, {"fingerprint": fingerprint, "settings": settings})


@contextlib.contextmanager
def merge_lock(run, method: str, exclusive: bool):
    """Serialises merges of attribute/<method>/ (and lets a reader see scores.npy and its sidecar
    as one). Waits: a merge takes well under a second per thousand ids."""
    import fcntl

    folder = run.attribute_dir(method)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".merge.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def merge_scores(run, method: str, key: dict, settings: dict, invocation: dict) -> dict:
    """scores.npy (N, n) of every valid per-id file of the folder, ids ascending; its sidecar."""
    import numpy as np

    from magic_cli.run_dir import load_npy, npy_bytes, save_artifact, save_json, valid_record

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
                "shape": list(merged.shape), "dtype": str(merged.dtype)}
        side = save_artifact(run.scores_npy(method), npy_bytes(merged), meta)
        save_json(run.attribute_last_run(method), invocation)
        return side


def load_scores(run, method: str, fingerprint: str):
    """(scores (N, n_ids), sidecar) of attribute/<method>/, verified; StageError naming what to run."""
    from magic_cli.errors import ArtifactError
    from magic_cli.run_dir import load_npy, verify

    with merge_lock(run, method, exclusive=False):
        try:
            side = verify(run.scores_npy(method))
        except ArtifactError as e:
            raise StageError(f"{e}; rerun `magic attribute --method {method}` to rebuild it") from None
        if side.get("fingerprint") != fingerprint:
            raise StageError(f"attribute/{method} was computed for another training run; rerun `magic attribute "
                             f"--method {method} --overwrite`")
        return load_npy(run.scores_npy(method)), side
