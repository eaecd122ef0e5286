"""`magic smoothness`: will MAGIC's linear prediction hold for this recipe? The empirical
metasmoothness of training in the data weights (MGD paper, Engstrom et al. 2025, §3, Def. 2),
from three trainings per direction v and no metagradient:

    θ_0 = A(w), θ_h = A(w + h v), θ_2h = A(w + 2h v)
    Δ_1 = (θ_h − θ_0)/h, Δ_2 = (θ_2h − θ_h)/h, d = |θ_2h − θ_0|
    S = sign(Δ_1)ᵀ diag(d / ‖d‖₁) sign(Δ_2) ∈ [−1, 1]        (1: the two halves move alike)

read over the final parameters and over the test outputs f_j (what LDS depends on). A direction
is v = −w ⊙ 1_D for a seeded random set D of smoothness.drop_fraction of the training examples,
so that h = 0.5 reaches the drop of a ground-truth subset at LDS's own scale.

    smoothness/direction_<i>.npz   outputs at w + h v and w + 2h v, S over parameters and outputs
    smoothness/base.npz            the base run's test outputs and training seconds
    smoothness/summary.json        mean and spread over directions, accuracy, train seconds, verdict

Every training runs with one torch thread, so the files do not depend on --workers; each
direction's file is kept and reused (resumable), keyed by the training fingerprint and the
smoothness settings. With launcher=slurm each direction is an array task. `--sweep` runs this
over the combinations of Hydra sweep overrides.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from magic_cli.config import Config, from_dict, load
from magic_cli.determinism import derive_seed
from magic_cli.errors import ConfigError, StageError
from magic_cli.launcher import Piece, run_pieces
from magic_cli.plots import figure_bytes, pyplot
from magic_cli.progress import no_progress
from magic_cli.run_dir import (
    RunDir,
    SweepDir,
    json_text,
    load_npz,
    npz_bytes,
    save_artifact,
    save_bytes,
    save_json,
    save_text,
    sha256_bytes,
    status,
    valid_record,
)
from magic_cli.stages.ground_truth import init_worker, worker
from magic_cli.workers import run_tasks

# Verdict thresholds on S over the test outputs, calibrated against measured LDS at 1 % over
# the configurations in the README ("Will MAGIC work here?").
SMOOTH, CHAOTIC = 0.95, 0.7
VERDICTS = {
    "smooth": "smooth: training responds to the data weights almost linearly; expect a high LDS",
    "marginal": "marginal: expect a moderate LDS; a lower learning rate, eps_root > 0 or a scaled-down last layer "
                "usually helps (try --sweep)",
    "chaotic": "chaotic: the linear prediction will be poor (low LDS) whatever the attribution method; lower the "
               "learning rate, raise eps_root, scale down the last layer, or search with --sweep",
}


def metasmoothness(a0, ah, a2h, h: float) -> float:
    """S of three readings (arrays of one shape) at w, w + h v, w + 2h v; NaN if nothing moved."""

    d1, d2, d = (ah - a0) / h, (a2h - ah) / h, np.abs(a2h - a0)
    total = d.sum()
    if not total > 0:
        return float("nan")
    return float((np.sign(d1) * np.sign(d2) * d).sum() / total)


def verdict(s: float) -> str:
    if s != s:  # NaN
        return "chaotic"
    return "smooth" if s >= SMOOTH else "marginal" if s >= CHAOTIC else "chaotic"


def direction_set(n_train: int, cfg, i: int):
    """The examples D_i that direction i moves: bool (N,)."""
    rng = np.random.default_rng(derive_seed(cfg.seed, "smoothness", f"{cfg.drop_fraction:g}", i))
    chosen = np.zeros(n_train, dtype=bool)
    chosen[rng.choice(n_train, size=max(1, int(round(cfg.drop_fraction * n_train))), replace=False)] = True
    return chosen


def identity(config, i: int | None) -> dict:
    """What direction i's file (None: the base run's) must carry: this training, these settings."""

    cfg = dataclasses.asdict(config.smoothness)
    cfg.pop("directions")  # how many directions does not change direction i
    return {"fingerprint": config.fingerprint(), "settings": sha256_bytes(json_text(cfg).encode())[:16],
            "direction": "base" if i is None else i}


# --- one training (in this process or a worker; ground_truth's worker builds the problem) ----

def _train_one(task: tuple):
    """(direction i or None for the base run, multiple c of h) -> (task, flat parameters, outputs, seconds)."""
    problem = worker()["problem"]
    i, c = task
    weights = problem.weights
    if i is not None:
        cfg = problem.config.smoothness
        moved = torch.as_tensor(direction_set(problem.dataset.n_train, cfg, i), device=problem.device)
        weights = weights * torch.where(moved, 1.0 - c * cfg.h, 1.0).to(problem.dtype)
    final, _, seconds = problem.run(weights=weights)
    flat = np.concatenate([v.detach().double().flatten().cpu().numpy() for v in final.params.values()])
    return task, flat, problem.outputs(final), seconds


@dataclass(frozen=True)
class Spread:
    mean: float  # over the directions
    std: float
    per_direction: tuple[float, ...]


@dataclass(frozen=True)
class SmoothnessResult:
    """`magic smoothness`: the metasmoothness S and its verdict; `summary` is smoothness/summary.json."""

    s_outputs: Spread  # S over the test outputs
    s_params: Spread  # S over the parameters
    directions: int
    h: float
    test_accuracy: float
    train_seconds: float
    verdict: str  # a key of VERDICTS
    directions_computed: int
    summary_path: Path
    summary: dict = field(repr=False)

    @classmethod
    def of(cls, summary: dict, path: Path) -> "SmoothnessResult":
        spread = lambda d: Spread(d["mean"], d["std"], tuple(d["per_direction"]))  # noqa: E731
        return cls(spread(summary["S_outputs"]), spread(summary["S_params"]), summary["directions"], summary["h"],
                   summary["test_accuracy"], summary["train_seconds"], summary["verdict"],
                   summary["directions_computed"], Path(path), summary)


@dataclass(frozen=True)
class SweepResult:
    """`magic smoothness --sweep`: one row per combination, the recommended one; `summary` is sweep.json."""

    rows: tuple[dict, ...]  # overrides, S_outputs, S_outputs_std, S_params, test_accuracy, train_seconds, ...
    recommended: str  # the overrides of the recommended combination
    recommended_index: int
    accuracy_gap: float  # accuracy of the most accurate combination minus the recommended one's
    smooth_found: bool
    folder: Path
    summary: dict = field(repr=False)

    def table_lines(self) -> list[str]:
        return table_lines(self.summary)

    def recommendation_reason(self) -> str:
        return recommendation_reason(self.summary)


def smoothness_stage(config: Config, run: RunDir, workers: int = 1, progress_factory=None) -> SmoothnessResult:
    """S over parameters and outputs for each direction (missing ones computed), and the summary."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    run.claim()
    with run.lock(exclusive=False):
        run.clean(exclusive=False)
        if run.fingerprint_json.is_file():
            run.require_trained(config)  # a run directory of another training is refused, not mixed
        return _smoothness(config, run, workers, progress_factory)


def _smoothness(config, run, workers, progress_factory) -> SmoothnessResult:
    sc, output = config.smoothness, config.attribute.output
    paths = [run.smoothness_direction(i) for i in range(sc.directions)]
    todo = [i for i in range(sc.directions) if status(paths[i], identity(config, i)) != "ok"]
    start = time.perf_counter()
    if todo and config.launcher.name == "slurm":  # one array task per direction, and one for the base run
        failed = smoothness_on_slurm(config, run, todo, progress_factory)
        if failed:
            raise StageError(failed)
        written = len(todo)
    else:
        written = compute_directions(config, run, todo, workers, progress_factory)
    if status(run.smoothness_base, identity(config, None)) != "ok":
        compute_directions(config, run, [], workers, progress_factory)  # the base run only
    base = load_npz(run.smoothness_base)
    train_seconds = valid_record(run.smoothness_base, identity(config, None))["seconds"]  # timings live in sidecars
    per = [load_npz(p) for p in paths]
    s_out = np.array([float(d["S_outputs"]) for d in per])
    s_par = np.array([float(d["S_params"]) for d in per])
    spread = lambda s: {"mean": float(np.nanmean(s)), "std": float(np.nanstd(s)), "per_direction": s.tolist()}  # noqa: E731
    summary = {
        "fingerprint": config.fingerprint(), "output": output, **dataclasses.asdict(sc),
        "S_outputs": spread(s_out), "S_params": spread(s_par),
        "test_accuracy": float(np.mean(base["correct"])), "train_seconds": train_seconds,
        "directions_computed": written, "seconds": time.perf_counter() - start,
    }
    summary["verdict"] = verdict(summary["S_outputs"]["mean"])
    save_json(run.smoothness_summary, summary)
    return SmoothnessResult.of(summary, run.smoothness_summary)


def compute_directions(config, run, todo: list[int], workers: int = 1, progress_factory=None,
                       write_base: bool = True) -> int:
    """Train the base run and w + h v, w + 2h v for each direction of `todo`; write each direction's
    file as soon as its two trainings are in (and, with write_base, smoothness/base.npz: the base
    run's outputs and training seconds, for the summary). Returns the directions written."""
    sc, output = config.smoothness, config.attribute.output
    tasks = [(None, 0)] + [(i, c) for i in todo for c in (1, 2)]
    results, todo, written = {}, list(todo), 0
    with (progress_factory or no_progress)(f"smoothness ({sc.directions} directions)", len(tasks)) as advance:
        trainings = run_tasks(tasks, workers, _train_one, init_worker, (config.raw,))
        for done, (task, flat, outputs, seconds) in enumerate(trainings):
            results[task] = (flat, outputs, seconds)
            advance(done + 1)
            base = results.get((None, 0))
            for i in [i for i in todo if base and (i, 1) in results and (i, 2) in results]:
                (p1, o1, _), (p2, o2, _) = results.pop((i, 1)), results.pop((i, 2))
                if not all(np.isfinite(o[output]).all() for o in (o1, o2)):
                    raise StageError(f"training along smoothness direction {i} gave NaN/Inf outputs: training is "
                                     "unstable (lower optimizer.lr)")
                arrays = {"outputs_h": o1[output], "outputs_2h": o2[output],
                          "S_params": np.float64(metasmoothness(base[0], p1, p2, sc.h)),
                          "S_outputs": np.float64(metasmoothness(base[1][output], o1[output], o2[output], sc.h))}
                save_artifact(run.smoothness_direction(i), npz_bytes(**arrays), identity(config, i))
                todo.remove(i)
                written += 1
    _, outputs, seconds = results[(None, 0)]
    if write_base and status(run.smoothness_base, identity(config, None)) != "ok":
        save_artifact(run.smoothness_base, npz_bytes(**outputs), {**identity(config, None), "seconds": seconds})
    return written


# --- --sweep -----------------------------------------------------------------------------------

def parse_sweep(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Hydra overrides -> (fixed overrides, [(key, [value, ...]) per sweep axis]); one line if bad."""

    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    except HydraException as e:
        raise ConfigError(f"--sweep: {' '.join(str(e).split())[:300]}") from None
    fixed, axes = [], []
    for o in parsed:
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            if not values:
                raise ConfigError(f"--sweep: {o.input_line!r} sweeps over no values")
            axes.append((o.get_key_element(), values))
        else:
            fixed.append(o.input_line)
    if not axes:
        raise ConfigError("--sweep needs at least one sweep override KEY=a,b,... (e.g. optimizer.lr=1e-3,3e-3,1e-2)")
    return fixed, axes


def combinations(axes) -> list[list[str]]:
    """Every combination of the sweep axes as overrides, the first axis slowest."""
    return [[f"{key}={value}" for (key, _), value in zip(axes, values)]
            for values in itertools.product(*(v for _, v in axes))]


def _slug(overrides: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(o.lstrip("+~") for o in overrides))[:120]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (accuracy, S) that no other point beats in both (ties allowed)."""
    return [i for i, (a, s) in enumerate(points)
            if not any(a2 >= a and s2 >= s and (a2 > a or s2 > s) for a2, s2 in points)]


def recommend(rows: list[dict]) -> int:
    """The most accurate combination whose verdict is smooth (S over outputs >= SMOOTH); if none
    is, the smoothest one."""
    smooth = [i for i, r in enumerate(rows) if r["S_outputs"] >= SMOOTH]
    if smooth:
        return max(smooth, key=lambda i: (rows[i]["test_accuracy"], rows[i]["S_outputs"]))
    return max(range(len(rows)), key=lambda i: (rows[i]["S_outputs"], rows[i]["test_accuracy"]))


def sweep_stage(overrides: list[str], config_dir: str | None, workers: int = 1,
                progress_factory=None) -> SweepResult:
    """`magic smoothness --sweep`: smoothness_stage for every combination, each in its own run
    directory under <out_dir>-sweep/; the table (CSV, Markdown), the plot, the recommendation."""
    fixed, axes = parse_sweep(overrides)
    base = load(fixed, config_dir)
    combos = combinations(axes)
    configs = [load(fixed + combo, config_dir) for combo in combos]  # every combination validated first
    sweep = SweepDir(base.out_dir)
    _claim_sweep(sweep)

    rows = []
    for k, (combo, config) in enumerate(zip(combos, configs)):
        out = sweep.combination(k, _slug(combo))
        config = dataclasses.replace(config, out_dir=str(out), raw={**config.raw, "out_dir": str(out)})
        s = smoothness_stage(config, RunDir(out), workers, _labelled(progress_factory, f"[{k + 1}/{len(combos)}] "
                                                                                     f"{' '.join(combo)}"))
        rows.append({"overrides": " ".join(combo), **{key: value for key, value in (c.split("=", 1) for c in combo)},
                     "S_outputs": s.s_outputs.mean, "S_outputs_std": s.s_outputs.std,
                     "S_params": s.s_params.mean, "test_accuracy": s.test_accuracy,
                     "train_seconds": s.train_seconds, "verdict": s.verdict, "run": str(out)})
    front = pareto_front([(r["test_accuracy"], r["S_outputs"]) for r in rows])
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    pick = recommend(rows)
    table = pd.DataFrame(rows)
    best = max(r["test_accuracy"] for r in rows)
    result = {"fixed": fixed, "axes": [{"key": k, "values": v} for k, v in axes], "rows": rows,
              "recommended": rows[pick]["overrides"], "recommended_index": pick,
              "accuracy_gap": best - rows[pick]["test_accuracy"], "smooth_found": rows[pick]["S_outputs"] >= SMOOTH}
    save_text(sweep.file("sweep.csv"), table.to_csv(index=False))
    save_text(sweep.file("sweep.md"), _sweep_markdown(result))
    save_bytes(sweep.file("sweep.png"), _sweep_plot(rows, pick))
    save_json(sweep.file("sweep.json"), result)
    return SweepResult(tuple(rows), result["recommended"], pick, result["accuracy_gap"], result["smooth_found"],
                       sweep.root, result)


def _labelled(progress_factory, label: str):
    """The progress factory with its bar named `label` (None stays None)."""
    if progress_factory is None:
        return None
    return lambda _description, total: progress_factory(label, total)


def _claim_sweep(sweep: SweepDir) -> None:
    folder = sweep.root
    if folder.exists() and not sweep.marker.is_file() and any(folder.iterdir()):
        raise StageError(f"{folder} is not empty and is not a magic sweep folder (no {sweep.MARKER}); "
                         "choose another out_dir")
    folder.mkdir(parents=True, exist_ok=True)
    if not sweep.marker.is_file():
        save_json(sweep.marker, {"magic_sweep": True})


def _sweep_markdown(result: dict) -> str:
    lines = ["# magic smoothness --sweep", "",
             f"Fixed overrides: `{' '.join(result['fixed']) or '(none)'}`. S: empirical metasmoothness over the test "
             f"outputs (mean over directions; 1 is smooth); * on the Pareto front of accuracy and S.", "",
             "| combination | S (outputs) | ± | S (params) | test accuracy | train s | verdict | |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(result["rows"]):
        mark = ("*" if r["pareto"] else "") + (" recommended" if i == result["recommended_index"] else "")
        lines.append(f"| `{r['overrides']}` | {r['S_outputs']:.3f} | {r['S_outputs_std']:.3f} | {r['S_params']:.3f} | "
                     f"{r['test_accuracy']:.4f} | {r['train_seconds']:.2f} | {r['verdict']} | {mark} |")
    lines += ["", f"Recommended: `{result['recommended']}`, {recommendation_reason(result)}.", "",
              "![S against accuracy](sweep.png)", ""]
    return "\n".join(lines)


def recommendation_reason(result: dict) -> str:
    gap = 100 * result["accuracy_gap"]
    if result["smooth_found"]:
        return (f"the most accurate smooth combination (S >= {SMOOTH}), {gap:.1f} points below the most accurate "
                "one" if gap > 0 else f"the most accurate combination, and smooth (S >= {SMOOTH})")
    return f"the smoothest, though none reaches S >= {SMOOTH}: widen the sweep (lower learning rates, eps_root)"


def table_lines(result: dict) -> list[str]:
    """The sweep as a plain-text table (for the terminal)."""
    width = max(len("combination"), *(len(r["overrides"]) for r in result["rows"]))
    lines = [f"{'combination':<{width}}  {'S':>6} {'±':>6} {'S par':>6} {'acc':>7} {'train s':>8}  verdict"]
    for i, r in enumerate(result["rows"]):
        mark = (" *" if r["pareto"] else "") + (" <- recommended" if i == result["recommended_index"] else "")
        numbers = (f"{r['S_outputs']:>6.3f} {r['S_outputs_std']:>6.3f} {r['S_params']:>6.3f} "
                   f"{r['test_accuracy']:>7.4f} {r['train_seconds']:>8.2f}")
        lines.append(f"{r['overrides']:<{width}}  {numbers}  {r['verdict']}{mark}")
    return lines


def _sweep_plot(rows: list[dict], pick: int) -> bytes:

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    acc = [r["test_accuracy"] for r in rows]
    s = [r["S_outputs"] for r in rows]
    ax.scatter(acc, s, s=24, color="tab:blue")
    front = sorted((i for i, r in enumerate(rows) if r["pareto"]), key=lambda i: acc[i])
    ax.plot([acc[i] for i in front], [s[i] for i in front], color="tab:orange", lw=1.2, label="Pareto front")
    ax.scatter([acc[pick]], [s[pick]], s=90, facecolors="none", edgecolors="tab:red", label="recommended")
    for r, a, y in zip(rows, acc, s):
        ax.annotate(r["overrides"], (a, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(SMOOTH, color="gray", ls="--", lw=0.8)
    ax.axhline(CHAOTIC, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("test accuracy")
    ax.set_ylabel("metasmoothness S (test outputs)")
    ax.set_ylim(min(-0.05, min(s) - 0.05), 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure_bytes(fig)


# --- launcher=slurm: directions as array tasks --------------------------------------------------

def smoothness_on_slurm(config, run, todo: list[int], progress_factory=None) -> str | None:
    """Smoothness: one array task per direction of `todo` (each trains the base run, w + h v and
    w + 2h v) and one for the base run's outputs. Returns None or the line saying what failed."""
    def ok(i) -> bool:
        path = run.smoothness_base if i is None else run.smoothness_direction(i)
        return status(path, identity(config, i)) == "ok"

    pieces = [Piece("base", (None,))] + [Piece(f"direction_{i}", (i,)) for i in todo]
    return run_pieces(config, "smoothness", pieces, smoothness_job, lambda piece: ok(piece.args[0]),
                      lambda: sum(ok(p.args[0]) for p in pieces), len(pieces), "smoothness on the cluster",
                      progress_factory)


def smoothness_job(cwd: str, raw: dict, direction: int | None) -> int:
    """The body of one array task: one direction (or, for None, the base run only)."""
    os.chdir(cwd)
    config = from_dict(raw)
    run = RunDir(config.out_dir)
    with run.lock(exclusive=False):
        todo = [] if direction is None else [direction]
        return compute_directions(config, run, todo, 1, write_base=direction is None)
