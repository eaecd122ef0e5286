"""`magic tune --method M`: a baseline's hyperparameters chosen without peeking at the reported ids.

    tune/split.json     the validation test ids: a seeded draw of attribute.tune.n_val of the test
                        set (attribute.tune.seed), the same for every method of the run
    tune/<method>.json  the grid, the validation LDS of every point, and the chosen values

Every point of attribute.tune.<method> (a grid: key -> list of values) scores the validation ids
in memory and is ranked by their mean LDS over the complete ground-truth drop fractions. The
ground truth enters as its validation columns only (`validation_truth`), so tuning cannot read a
reported id's retrainings; `magic score` leaves the validation ids out of every method's LDS.
Afterwards `magic attribute --method M` uses the chosen values, except for a key given on the
command line (attribute.M.KEY=...). MAGIC has no hyperparameter to tune.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magic_cli.config import Config, with_values
from magic_cli.core.methods import ATTRIBUTORS
from magic_cli.core.metrics import per_test_correlations, predicted_change
from magic_cli.determinism import derive_seed, enable_determinism
from magic_cli.errors import ConfigError, StageError
from magic_cli.progress import no_progress
from magic_cli.run_dir import RunDir, load_json, load_npy, save_json, verify
from magic_cli.stages.assemble import assemble, load_data_weights
from magic_cli.stages.checkpoints import REPAIR, load_final
from magic_cli.stages.ground_truth import load_ground_truth, truth_dir


@dataclass(frozen=True)
class Trial:
    values: dict  # the grid point: key -> value
    lds: float  # mean over drop fractions of the mean validation LDS
    per_drop: dict  # drop fraction -> mean validation LDS
    seconds: float  # what the grid's points share (EK-FAC's, SOURCE's factors) counted in the first that made it
    skipped: str = ""  # why this point could not run here ("" if it ran)


@dataclass(frozen=True)
class TuneResult:
    method: str
    validation_ids: tuple[int, ...]
    drop_fractions: tuple[float, ...]
    trials: tuple[Trial, ...]
    best: dict  # the chosen values
    path: Path  # tune/<method>.json
    seconds: float


def validation_ids(n_test: int, n_val: int, seed: int) -> list[int]:
    """The validation test ids: the first n_val of a seeded permutation of the test set, sorted."""
    if not 1 <= n_val < n_test:
        raise ConfigError(f"attribute.tune.n_val must be in 1..{n_test - 1} (the test set has {n_test}), got {n_val}")
    order = np.random.default_rng(derive_seed(seed, "tune", "validation")).permutation(n_test)
    return sorted(int(i) for i in order[:n_val])


def grid_points(grid: dict) -> list[dict]:
    """Every combination of a grid {key: [values]}, in the grid's order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def validation_truth(run, config, record, n_train: int, ids: list[int]) -> dict:
    """{p: (masks (m, N), actual change (m, J) of the validation ids)} for every complete drop
    fraction. Only these columns leave this function: tuning never sees another id's ground truth."""
    output, fingerprint = config.attribute.output, record["fingerprint"]
    truth = {}
    for p in config.ground_truth.drop_fractions:
        loaded = load_ground_truth(run, config, fingerprint, p, output, n_train)
        if loaded is not None:
            masks, outputs = loaded
            truth[p] = (masks, outputs[:, ids])
    if not truth:
        raise StageError(f"no complete ground truth in {run.root}: run `magic retrain-ground-truth` before tuning")
    verify(run.train_outputs(output), {"fingerprint": fingerprint}, REPAIR)
    base = load_npy(run.train_outputs(output))[ids]
    return {p: (masks, outputs - base) for p, (masks, outputs) in truth.items()}


def tune_stage(config: Config, run: RunDir, progress_factory=None) -> TuneResult:
    method = config.attribute.method
    if method == "magic":
        raise ConfigError("magic has no hyperparameter to tune: its scores are exact (tune a baseline: --method trak)")
    grid = dict(config.attribute.tune.grid.get(method) or {})
    if not grid:
        raise ConfigError(f"{method} has no hyperparameter to tune (attribute.tune.grid.{method} is empty)")
    if config.ground_truth.groups is not None:
        raise ConfigError("magic tune uses the single-example ground truth: drop ground_truth.groups")
    enable_determinism(config.device, config.threads)
    with run.lock(exclusive=False):
        run.clean(exclusive=False)
        record = run.require_trained(config)
        return _tune(config, truth_dir(config, run), record, method, grid, progress_factory)


def _tune(config, run, record, method, grid, progress_factory) -> TuneResult:
    start = time.perf_counter()
    problem = assemble(config)
    n_train, n_test = problem.dataset.n_train, problem.dataset.n_test
    tc = config.attribute.tune
    ids = validation_ids(n_test, tc.n_val, tc.seed)
    held = validation_split(run, record)
    if held and held != ids:
        raise ConfigError(f"attribute.tune.n_val={tc.n_val} and attribute.tune.seed={tc.seed} draw other validation "
                          f"ids than the other methods of this run were tuned on ({run.tune_split}): use the same "
                          "values")
    truth = validation_truth(run, config, record, n_train, ids)
    w0 = load_data_weights(config.train.data_weights, n_train) if config.train.data_weights else None
    final = load_final(problem, run, record)
    points = grid_points(grid)
    memo: dict = {}  # states and curvature factors the grid's points share (EK-FAC, SOURCE)
    trials = []
    with (progress_factory or no_progress)(f"tune {method} ({len(points)} points)", len(points)) as advance:
        for n, values in enumerate(points, start=1):
            began = time.perf_counter()
            cfg = with_values(config, [f"attribute.{method}.{k}={json.dumps(v)}" for k, v in values.items()])
            try:
                run_method = ATTRIBUTORS[method].prepare(problem, final, {}, cfg, 0, memo=memo)
                scores = run_method([ids], cfg.attribute.output).scores[0].T  # (N, J)
            except ConfigError as e:  # a point this run cannot have (more TRAK checkpoints than epochs)
                trials.append(Trial(values, float("nan"), {}, 0.0, skipped=str(e)))
                advance(n)
                continue
            per_drop = {}
            for p, (masks, actual) in truth.items():
                rho = per_test_correlations(predicted_change(scores, masks, w0), actual)["spearman"]
                per_drop[f"{p:g}"] = float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")
            finite = [v for v in per_drop.values() if np.isfinite(v)]
            trials.append(Trial(values, float(np.mean(finite)) if finite else float("nan"), per_drop,
                                time.perf_counter() - began))
            advance(n)
    if all(t.skipped for t in trials):
        raise ConfigError(trials[0].skipped)
    ranked = [t for t in trials if np.isfinite(t.lds)]
    if not ranked:
        raise StageError(f"every point of the {method} grid gave NaN validation LDS (no output moved)")
    best = max(ranked, key=lambda t: t.lds)  # the first of equals: the grid's order
    save_json(run.tune_split, {"fingerprint": record["fingerprint"], "seed": tc.seed, "n_val": tc.n_val,
                               "validation_ids": ids})
    path = run.tune_file(method)
    save_json(path, {"method": method, "fingerprint": record["fingerprint"], "output": config.attribute.output,
                     "validation_ids": ids, "drop_fractions": [float(p) for p in truth], "grid": grid,
                     "trials": [vars(t) for t in trials], "best": best.values})
    return TuneResult(method, tuple(ids), tuple(truth), tuple(trials), best.values, path, time.perf_counter() - start)


def tuned_values(run: RunDir, method: str, record: dict, output: str | None = None) -> dict:
    """The values `magic tune` chose for a method of this run ({} if it was not tuned)."""
    path = run.tune_file(method)
    if not path.is_file():
        return {}
    data = load_json(path)
    if data.get("fingerprint") != record["fingerprint"] or (output is not None and data.get("output") != output):
        return {}  # tuned for another training run, or another output: not this run's choice
    return dict(data.get("best") or {})


def overridden(config: Config, method: str) -> set[str]:
    """The keys of attribute.<method> given on the command line (they win over tuned values)."""
    prefix = f"attribute.{method}."
    keys = (o.split("=", 1)[0].lstrip("+~") for o in config.overrides)
    return {key[len(prefix):] for key in keys if key.startswith(prefix)}


def with_tuned(config: Config, run: RunDir, record: dict) -> tuple[Config, dict]:
    """(the config with the tuned values of its method, except the keys given on the command line;
    the values applied)."""
    method = config.attribute.method
    chosen = tuned_values(run, method, record, config.attribute.output)
    values = {k: v for k, v in chosen.items() if k not in overridden(config, method)}
    if not values:
        return config, {}
    return with_values(config, [f"attribute.{method}.{k}={json.dumps(v)}" for k, v in values.items()]), values


def validation_split(run: RunDir, record: dict) -> list[int]:
    """The validation ids of this run's tuning ([] if nothing was tuned), left out of `magic score`."""
    if not run.tune_split.is_file():
        return []
    data = load_json(run.tune_split)
    return list(data["validation_ids"]) if data.get("fingerprint") == record["fingerprint"] else []
