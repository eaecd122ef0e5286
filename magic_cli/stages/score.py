"""`magic score`: compare every attribution method's predictions with the retraining ground
truth, and write the report (CSV, JSON, Markdown, plots; a rich table for the terminal).

    report/lds.csv            method, drop, test_id, spearman, pearson, slope
    report/summary.json       {"lds": {METHOD: {"<p>": {mean, ci_low, ci_high, n_test, pearson, slope}}},
                               "seconds": {METHOD: attribution seconds}, ...}
    report/report.md          the tables and the run's config summary
    report/lds_vs_drop.png    mean LDS vs drop fraction, one line per method, CI bands
    report/scatter_<method>_<p>.png   predicted vs actual change for a few test ids
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from magic_cli.config import Config
from magic_cli.core.metrics import COST_IDS, cost_of, crossover, mean_with_ci, per_test_correlations, predicted_change
from magic_cli.plots import figure_bytes, pyplot
from magic_cli.run_dir import RunDir, StageError, load_npy, save_bytes, save_json, save_text, verify
from magic_cli.stages.assemble import load_data_weights
from magic_cli.stages.attribute import load_scores
from magic_cli.stages.checkpoints import REPAIR
from magic_cli.stages.ground_truth import config_groups, load_ground_truth, truth_dir
from magic_cli.stages.groups import group_score_frame
from magic_cli.stages.page import write_index
from magic_cli.stages.tune import tuned_values, validation_split

SCATTER_IDS = 4  # test ids per scatter plot
LOW_LDS = 0.5  # `score` names the test ids whose LDS is below this, with their slope


@dataclass(frozen=True)
class Lds:
    """The LDS of one method at one drop fraction, over its test ids."""

    mean: float  # mean Spearman correlation of predicted and actual change
    ci_low: float  # 95 % bootstrap confidence interval of the mean
    ci_high: float
    n_test: int
    n_subsets: int
    pearson: float  # mean Pearson correlation
    slope: float  # median regression slope of actual on predicted change (1: the right scale)
    low_lds: tuple[tuple[int, float, float], ...]  # (test id, LDS, slope) below LOW_LDS, worst first


@dataclass(frozen=True)
class ScoreResult:
    """What `magic score` measured; `summary` is report/summary.json as written."""

    lds: dict[str, dict[float, Lds]]  # method -> drop fraction -> LDS
    seconds: dict[str, float | None]  # method -> seconds its attribution took
    output: str
    missing_drop_fractions: tuple[float, ...]  # configured, with no complete ground truth yet
    test_accuracy: float
    report_dir: Path
    report_path: Path  # report/report.md
    summary: dict = field(repr=False)

    @classmethod
    def of(cls, summary: dict, run: RunDir) -> "ScoreResult":
        lds = {method: {float(p): Lds(s["mean"], s["ci_low"], s["ci_high"], s["n_test"], s["n_subsets"],
                                      s["pearson"], s["slope"],
                                      tuple((w["test_id"], w["lds"], w["slope"]) for w in s["low_lds"]))
                        for p, s in per_drop.items()} for method, per_drop in summary["lds"].items()}
        return cls(lds, dict(summary["seconds"]), summary["output"], tuple(summary["missing_drop_fractions"]),
                   summary["test_accuracy"], run.report_file("report.md").parent, run.report_file("report.md"), summary)

    def low_lds_lines(self, limit: int = 6) -> list[str]:
        return low_lds_lines(self.summary, limit)


def score_stage(config: Config, run: RunDir, mix_devices: bool = False) -> ScoreResult:
    """Compute LDS for every method x drop fraction with ground truth; write report/. Ground truth
    retrained on several device types is refused unless mix_devices."""
    run = truth_dir(config, run)
    with run.lock(exclusive=False):
        run.clean(exclusive=False)
        record = run.require_trained(config)
        return _score(config, run, record, mix_devices)


def _score(config, run: RunDir, record: dict, mix_devices: bool = False) -> ScoreResult:
    output, fingerprint = config.attribute.output, record["fingerprint"]
    methods = run.methods_present()
    if not methods:
        raise StageError(f"no attribution in {run.root}: run `magic attribute --test-ids 0:50` first")
    n_train = int(record["metrics"]["n_train"])
    groups = config_groups(config)
    truth = {}
    for p in config.ground_truth.drop_fractions:
        loaded = load_ground_truth(run, config, fingerprint, p, output, n_train, mix_devices, groups)
        if loaded is not None:
            truth[p] = loaded
    if not truth:
        also = f" --groups {config.ground_truth.groups}" if groups is not None else ""
        raise StageError(f"no complete ground truth in {run.ground_truth_root}: run `magic retrain-ground-truth{also}` "
                         "first")
    verify(run.train_outputs(output), {"fingerprint": fingerprint}, REPAIR)
    base = load_npy(run.train_outputs(output))  # f_j(w0): (n_test,)
    # The prediction for retraining on w0 * mask is tau^T (w0 * mask - w0): the dropped examples'
    # scores weighted by their training weights (ones unless train.data_weights).
    w0 = load_data_weights(config.train.data_weights, n_train) if config.train.data_weights else None

    held_out = set(validation_split(run, record))  # magic tune's validation ids: never reported
    rows, summary, scatter_data, seconds, costs = [], {}, {}, {}, {}
    for method in methods:
        scores, side = load_scores(run, method, fingerprint)
        if side.get("output") != output:
            raise StageError(f"attribute/{method} scores the {side.get('output')} output but attribute.output="
                             f"{output}; rerun `magic attribute` with attribute.output={output}")
        reported = [c for c, i in enumerate(side["test_ids"]) if i not in held_out]
        if not reported:
            raise StageError(f"every test id of attribute/{method} is a validation id of `magic tune` "
                             f"({run.tune_split}): attribute others to report")
        scores = scores[:, reported]
        ids = [side["test_ids"][c] for c in reported]
        seconds[method] = side.get("seconds")
        costs[method] = side.get("cost")
        if groups is not None:  # d f_j / d e_g of every group, for the reader
            frame = group_score_frame(scores, groups, w0, ids)
            save_text(run.report_file(f"group_scores_{method}.csv"), frame.to_csv(index=False))
        summary[method] = {}
        for p, (masks, outputs) in truth.items():
            actual = outputs[:, ids] - base[ids]  # (m, J)
            predicted = predicted_change(scores, masks, w0)  # (m, J)
            corr = per_test_correlations(predicted, actual)
            for j, test_id in enumerate(ids):
                rows.append({"method": method, "drop": p, "test_id": test_id,
                             **{k: float(v[j]) for k, v in corr.items()}})
            weak = sorted((float(corr["spearman"][j]), test_id, float(corr["slope"][j]))
                          for j, test_id in enumerate(ids) if corr["spearman"][j] < LOW_LDS)
            mean, low, high = mean_with_ci(corr["spearman"], seed=config.ground_truth.seed)
            summary[method][f"{p:g}"] = {
                "mean": mean, "ci_low": low, "ci_high": high,
                "n_test": int(np.isfinite(corr["spearman"]).sum()), "n_subsets": int(masks.shape[0]),
                "pearson": float(np.nanmean(corr["pearson"])), "slope": float(np.nanmedian(corr["slope"])),
                "low_lds": [{"test_id": i, "lds": v, "slope": sl} for v, i, sl in weak],  # worst first
            }
            scatter_data[(method, p)] = (predicted[:, :SCATTER_IDS], actual[:, :SCATTER_IDS], ids[:SCATTER_IDS])

    table = pd.DataFrame(rows)
    drops = list(truth)
    result = {"lds": summary, "seconds": seconds, "cost": costs, "output": output, "drop_fractions": drops,
              "missing_drop_fractions": [p for p in config.ground_truth.drop_fractions if p not in truth],
              "methods": methods, "fingerprint": fingerprint,
              "validation_ids_left_out": sorted(held_out),
              "tuned": {m: v for m in methods if (v := tuned_values(run, m, record, output))},
              "unit": "examples" if groups is None else f"groups ({groups.source}, {groups.n_groups})",
              "test_accuracy": record["metrics"]["test_accuracy"]}
    save_text(run.report_file("lds.csv"), table.to_csv(index=False))
    save_json(run.report_file("summary.json"), result)
    save_text(run.report_file("report.md"), _markdown(result, config))
    save_bytes(run.report_file("lds_vs_drop.png"), _plot_lds(result))
    if any(costs.values()):
        save_bytes(run.report_file("lds_vs_cost.png"), _plot_cost(result))
    else:  # no method measured its cost split: no plot from an earlier score
        run.report_file("lds_vs_cost.png").unlink(missing_ok=True)
    for (method, p), (pred, act, sids) in scatter_data.items():
        save_bytes(run.report_file(f"scatter_{method}_{p:g}.png"), _plot_scatter(method, p, pred, act, sids))
    write_index(run, config.name)
    return ScoreResult.of(result, run)


def low_lds_lines(result: dict, limit: int = 6) -> list[str]:
    """One line per method x drop fraction with test ids whose LDS is below LOW_LDS, worst first."""
    lines = []
    for method, per_drop in result["lds"].items():
        for p, s in per_drop.items():
            weak = s.get("low_lds") or []
            if weak:
                shown = ", ".join(f"{w['test_id']} ({w['lds']:.2f}, slope {w['slope']:.2f})" for w in weak[:limit])
                lines.append(f"{method}, drop {p}: {len(weak)} of {s['n_test']} test ids have LDS < {LOW_LDS}: "
                             f"{shown}{' ...' if len(weak) > limit else ''}")
    return lines


def _markdown(result: dict, config) -> str:
    lines = ["# magic report", "",
             f"Run `{config.name}` (fingerprint `{result['fingerprint']}`): dataset `{config.dataset['name']}`, "
             f"model `{config.model['name']}`, optimizer `{config.optimizer.name}` (lr {config.optimizer.lr}), "
             f"{config.train.epochs} epochs of batch {config.train.batch_size}, dtype {config.dtype}, "
             f"seed {config.seed}. Test accuracy {result['test_accuracy']:.4f}.", "",
             f"Output: `{result['output']}`. LDS = Spearman correlation between predicted and actual change "
             "of the output over retrainings with random subsets dropped, averaged over test examples "
             "(95 % bootstrap CI). Slope: median regression slope of actual on predicted change.", "",
             *([f"Ground truth drops whole groups: {result['unit']}; a group's score is the sum of its "
                "members' weighted scores (group_scores_<method>.csv).", ""]
               if result.get("unit", "examples") != "examples" else []),
             "| method | drop | mean LDS | 95 % CI | n test | subsets | Pearson | slope | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, per_drop in result["lds"].items():
        secs = result["seconds"].get(method)
        for p, s in per_drop.items():
            lines.append(f"| {method} | {p} | {s['mean']:.3f} | [{s['ci_low']:.3f}, {s['ci_high']:.3f}] | "
                         f"{s['n_test']} | {s['n_subsets']} | {s['pearson']:.3f} | {s['slope']:.3f} | "
                         f"{'-' if secs is None else f'{secs:.1f}'} |")
    if result.get("validation_ids_left_out"):
        lines += ["", f"The {len(result['validation_ids_left_out'])} validation ids of `magic tune` are left out of "
                      "every method's LDS (tune/split.json)."]
    for method, values in (result.get("tuned") or {}).items():
        lines.append(f"- {method}: tuned on them, " + ", ".join(f"{k}={v}" for k, v in values.items()))
    weak = low_lds_lines(result, limit=20)
    if weak:
        lines += ["", f"Test ids whose LDS is below {LOW_LDS} (LDS, slope), worst first: where training is not "
                      "smooth for them, or their output barely moves.", ""] + [f"- {line}" for line in weak]
    lines += cost_lines(result)
    lines += ["", "![LDS vs drop fraction](lds_vs_drop.png)", ""]
    if any((result.get("cost") or {}).values()):
        lines += ["![LDS vs cost](lds_vs_cost.png)", ""]
    return "\n".join(lines)


def _plot_lds(result: dict) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    for method, per_drop in result["lds"].items():
        finite = {float(p): s for p, s in per_drop.items() if np.isfinite(s["mean"])}  # NaN: no output moved
        if not finite:
            continue
        ax.plot(list(finite), [s["mean"] for s in finite.values()], marker="o", label=method)
        ax.fill_between(list(finite), [s["ci_low"] for s in finite.values()], [s["ci_high"] for s in finite.values()],
                        alpha=0.2)
    ax.set_xscale("log")
    groups = result.get("unit", "examples") != "examples"
    ax.set_xlabel("fraction of groups dropped" if groups else "fraction of training data dropped")
    ax.set_ylabel("mean LDS (Spearman)")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_bytes(fig)


def cost_lines(result: dict) -> list[str]:
    """The Markdown table of each method's cost split and the extrapolated seconds."""
    costs = {m: c for m, c in (result.get("cost") or {}).items() if c}
    if not costs:
        return []
    lines = ["", "Cost: each method's seconds split into a fixed part (the training set's side: gradients, "
                 "factors) and a part per test id, measured by `magic attribute`; the seconds for 1, 16, 64, 256 "
                 "ids are extrapolated from that split. MAGIC has no fixed part and runs ceil(n / batch) reverse "
                 "passes of attribute.batch_size ids, each costing what a full pass cost (an upper bound between "
                 "multiples of the batch).", "",
             "| method | fixed s | s per id | " + " | ".join(f"{n} ids (extrap.)" for n in COST_IDS)
             + " | MAGIC costs more from |", "|---|---|---|" + "---|" * len(COST_IDS) + "---|"]
    for m, c in costs.items():
        cross = crossover(costs["magic"], c) if "magic" in costs and m != "magic" else None
        lines.append(f"| {m} | {c['fixed']:.2f} | {c['per_id']:.3f} | "
                     + " | ".join(f"{cost_of(c, n):.1f}" for n in COST_IDS)
                     + f" | {'-' if cross is None else f'{cross} ids'} |")
    return lines


def _plot_cost(result: dict) -> bytes:
    plt = pyplot()
    p = min(result["drop_fractions"])
    costs = {m: c for m, c in result["cost"].items() if c and f"{p:g}" in result["lds"].get(m, {})}
    fig, axes = plt.subplots(1, len(COST_IDS), figsize=(3.3 * len(COST_IDS), 3.4), sharey=True, layout="constrained")
    for ax, n in zip(axes, COST_IDS):
        for m, c in costs.items():
            ax.scatter([cost_of(c, n)], [result["lds"][m][f"{p:g}"]["mean"]], s=30, label=m)
        ax.set_xscale("log")
        ax.set_title(f"{n} test id{'s' * (n > 1)}")
        ax.set_xlabel("seconds (extrapolated)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean LDS at drop {p:g}")
    axes[-1].legend(fontsize=7)
    fig.suptitle("accuracy against cost: seconds extrapolated from each method's fixed and per-id cost")
    return figure_bytes(fig)


def _plot_scatter(method: str, p: float, predicted, actual, ids) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ids), figsize=(3.2 * len(ids), 3.2), squeeze=False, layout="constrained")
    for ax, j, test_id in zip(axes[0], range(len(ids)), ids):
        x, y = predicted[:, j], actual[:, j]
        ax.scatter(x, y, s=8)
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
        ax.set_title(f"test {test_id}")
        ax.set_xlabel("predicted change")
    axes[0][0].set_ylabel("actual change")
    fig.suptitle(f"{method}, drop {p:g}")
    return figure_bytes(fig)
