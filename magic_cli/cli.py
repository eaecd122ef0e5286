"""The `magic` command line: a thin Typer front over the library.

Each command composes the config (conf/ + Hydra overrides) -> validates it -> calls ONE
function of the Python API (api.py) -> prints what it returned and where the artifacts went.
No math and no file names here.
Errors a user can fix are one line on stderr and exit code 2; torch is imported inside
the commands so `magic --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Exact data attribution by differentiating through training (MAGIC metagradients).\n\n"
         "Every command takes Hydra overrides: magic train experiment=digits_mlp optimizer.lr=3e-3 seed=7",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect the composed config.", no_args_is_help=True)
app.add_typer(config_app, name="config")

Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="Hydra overrides KEY=VALUE or GROUP=OPTION, e.g. experiment=digits_mlp optimizer.lr=3e-3 seed=7.",
    show_default=False)]
ConfigDir = Annotated[Optional[Path], typer.Option(
    "--config-dir", help="A folder of your own configs (same layout as conf/), searched before the packaged ones.",
    show_default=False)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Recompute and replace existing results.")]
Method = Annotated[Optional[str], typer.Option(
    "--method", help="magic (exact, default) | grad-dot | tracin | trak | ekfac | source; same as attribute.method=.",
    show_default=False)]

Groups = Annotated[Optional[str], typer.Option(
    "--groups", help="Groups of training examples instead of single ones: label | a table column | a file of "
                     "group names (one a line, or a .csv with a group column).", show_default=False)]


def _with_method(overrides, method: str | None) -> list[str]:
    return list(overrides or []) + ([f"attribute.method={method}"] if method else [])


def _with_groups(overrides, groups: str | None) -> list[str]:
    """--groups of retrain-ground-truth and score: the same as ground_truth.groups=."""
    quoted = str(groups).replace("\\", "\\\\").replace("'", "\\'")  # a string, whatever it looks like
    return list(overrides or []) + ([f"ground_truth.groups='{quoted}'"] if groups else [])


def _fail(message: str, code: int = 2):
    typer.echo(f"magic: error: {message}", err=True)
    raise typer.Exit(code)


def _load(overrides, config_dir):
    from magic_cli.config import ConfigError, load  # = magic_cli.compose, without importing the stages (torch)

    try:
        return load(list(overrides or []), str(config_dir) if config_dir else None)
    except ConfigError as e:
        _fail(str(e))


OUT_OF_MEMORY = {
    "attribute": "lower attribute.batch_size (test ids per reverse pass) or use checkpoint=replay",
    "train": "lower train.batch_size or use a smaller model",
    "retrain-ground-truth": "lower --workers or train.batch_size",
    "score": "attribute fewer test ids",
    "smoothness": "lower --workers or train.batch_size",
    "explain": "lower --workers or train.batch_size",
}


def _run(command: str, fn, *args, **kwargs):
    """Call a library stage, turning the errors a user can act on into one line (exit 2).

    Only UserError (bad config or input, a run directory in the wrong state, non-finite or
    non-deterministic training), running out of GPU memory, and failing to write a file become
    one line; anything else is a bug and keeps its traceback.
    """
    from magic_cli.errors import UserError

    try:
        return fn(*args, **kwargs)
    except UserError as e:
        _fail(str(e))
    except OSError as e:
        if e.filename is None:
            raise
        _fail(f"cannot write or read {e.filename}: {e.strerror or e}")
    except RuntimeError as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            _fail(f"out of GPU memory in `magic {command}`: {OUT_OF_MEMORY[command]}")
        raise


def _console():
    from rich.console import Console

    return Console(stderr=True)


@app.command()
def train(overrides: Overrides = None, config_dir: ConfigDir = None, overwrite: Overwrite = False):
    """Train the model deterministically and store the checkpoints the reverse pass needs."""
    from magic_cli import api
    from magic_cli.progress import rich_progress

    cfg = _load(overrides, config_dir)
    result = _run("train", api.train, cfg, overwrite=overwrite, progress=rich_progress)
    if result.status == "already":
        typer.echo(f"already trained in {cfg.out_dir} (same config, every file verified); pass --overwrite to "
                   "train again")
        return
    if result.repaired:
        _console().print(f"repaired {', '.join(result.repaired)} (retrained; the intact files were "
                         "reproduced bit for bit)")
    _console().print(f"test accuracy [bold]{result.test_accuracy:.4f}[/]  test loss {result.test_loss:.4f}  "
                     f"{result.steps} steps in {result.train_seconds:.2f}s")
    typer.echo(f"wrote {result.train_dir}")


@app.command()
def attribute(
    test_ids: Annotated[str, typer.Option(
        "--test-ids", help="Test examples to attribute: 3 | 0,5,9 | 0:50 | 0:50:5 (slice) | @file (one id per line).",
        show_default=False)],
    overrides: Overrides = None, config_dir: ConfigDir = None, overwrite: Overwrite = False, method: Method = None,
):
    """Scores d f_j / d w_i for the test ids: exact MAGIC (the reverse pass through training) or a baseline."""
    from magic_cli import api
    from magic_cli.progress import rich_progress

    cfg = _load(_with_method(overrides, method), config_dir)
    result = _run("attribute", api.attribute, cfg, test_ids, overwrite=overwrite, progress=rich_progress)
    extra = f", peak {result.peak_states} states, checkpoint={result.checkpoint}" \
        if result.peak_states and result.ids_computed else ""
    if result.compile_seconds:
        extra += f", of which {result.compile_seconds:.1f}s compiling (attribute.compile)"
    _console().print(f"{result.method}: {len(result.test_ids)} test ids ({result.ids_computed} computed) in "
                     f"{result.seconds:.2f}s{extra}")
    if result.grown_ids:
        ids = ", ".join(map(str, result.grown_ids[:8])) + (" ..." if len(result.grown_ids) > 8 else "")
        _console().print(f"[yellow]warning:[/] the adjoint grew {result.adjoint_growth:.1e}x over the reverse pass "
                         f"(test ids {ids}): training amplifies perturbations, so expect a low LDS; "
                         "`magic smoothness` measures it before attribution")
    if result.tuned:
        chosen = ", ".join(f"{k}={v}" for k, v in result.tuned.items())
        _console().print(f"with the values `magic tune` chose: {chosen}")
    typer.echo(f"wrote {result.scores_path} {result.shape} ({result.merged_ids} test ids)")


@app.command()
def explain(
    test_ids: Annotated[str, typer.Option(
        "--test-ids", help="Test examples to explain (attributed already): 3 | 0,5,9 | 0:4 | @file.",
        show_default=False)],
    overrides: Overrides = None, config_dir: ConfigDir = None,
    k: Annotated[int, typer.Option("--k", help="Proponents and opponents shown per test id.")] = 8,
    method: Method = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Retrain without the top-k proponents, the top-k opponents and k random examples "
                         "(k = 1, 4, 16, 64) and compare the actual change of the test loss with the predicted "
                         "one.")] = False,
    workers: Annotated[int, typer.Option(
        "--workers", help="Parallel retraining processes for --verify (results do not depend on it).")] = 1,
    groups: Groups = None,
):
    """Which training examples made these predictions: the top proponents and opponents, drawn as the
    data they are (report/explain/); --verify checks the claim by retraining without them."""
    from magic_cli import api
    from magic_cli.progress import rich_progress

    cfg = _load(_with_method(overrides, method), config_dir)
    res = _run("explain", api.explain, cfg, test_ids, k=k, verify=verify, workers=workers, progress=rich_progress,
               groups=groups)
    sign = "raise" if res.output == "loss" else "lower"
    typer.echo(f"{res.method} scores d {res.output} / d w: dropping a proponent is predicted to {sign} the "
               f"{res.output}, dropping an opponent the opposite")
    for e in res.explanations:
        top = ", ".join(f"{p.train_id if p.group is None else p.group} ({p.score:+.3g})" for p in e.proponents[:4])
        typer.echo(f"test {e.test_id} (label {e.label or '-'}, {res.output} {e.output:.4f}): proponents {top} ...")
        for c in (c for c in res.checks if c.test_id == e.test_id):
            typer.echo(f"  without {c.k:>2} {c.kind:<10} predicted {c.predicted:+.4f}  actual {c.actual:+.4f}"
                       f"{'  (class flips)' if c.flipped else ''}")
    typer.echo(f"wrote {res.markdown} and {len(res.explanations)} galleries")


@app.command("retrain-ground-truth")
def retrain_ground_truth(
    overrides: Overrides = None, config_dir: ConfigDir = None,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", help="Do only subsets with index = I mod N (I/N), to spread one job over machines.",
        show_default=False)] = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="Parallel processes, one torch thread each (results do not depend on it); with "
                          "device=cuda spread over the visible GPUs.")] = 1,
    merge_only: Annotated[bool, typer.Option(
        "--merge-only", help="Retrain nothing: merge the subsets already written (e.g. by cluster jobs that "
                             "finished while no command watched them) and say what is missing.")] = False,
    groups: Groups = None,
):
    """Retrain on random subsets (ground_truth.drop_fractions x num_subsets); resumable and shardable;
    on a SLURM cluster with launcher=slurm. With --groups the subsets drop whole groups."""
    from magic_cli import api
    from magic_cli.progress import rich_progress

    cfg = _load(_with_groups(overrides, groups), config_dir)
    res = _run("retrain-ground-truth", api.retrain_ground_truth, cfg, workers=workers, shard=shard,
               merge_only=merge_only, progress=rich_progress)
    if res.redone:
        _console().print(f"{res.redone} damaged or out-of-date subsets were retrained")
    where = "on the cluster" if cfg.launcher.name == "slurm" else f"with {workers} worker{'s' if workers > 1 else ''}"
    rate = f" ({res.per_minute:.1f} subsets/min {where})" if res.per_minute else ""
    _console().print(f"retrained {res.done} subsets in {res.seconds:.1f}s{rate}")
    if res.missing:
        _console().print(f"{res.missing} subsets are still missing: run `magic retrain-ground-truth` "
                         f"{'without --merge-only ' if merge_only else ''}to retrain them")
    merged = ", ".join(f"{p:g}" for p in res.merged) or "none yet"
    typer.echo(f"wrote {res.folder} (complete drop fractions: {merged})")


@app.command()
def tune(
    method: Annotated[str, typer.Option(
        "--method", help="The baseline to tune: trak | ekfac | tracin | source (MAGIC has nothing to tune).",
        show_default=False)],
    overrides: Overrides = None, config_dir: ConfigDir = None,
):
    """Pick a baseline's hyperparameters by LDS on validation test ids (a seeded draw, never reported),
    against the ground truth; later `magic attribute --method M` uses them."""
    from rich.table import Table

    from magic_cli import api
    from magic_cli.progress import rich_progress

    cfg = _load(_with_method(overrides, method), config_dir)
    res = _run("tune", api.tune, cfg, progress=rich_progress)
    table = Table(title=f"{res.method}: mean LDS of {len(res.validation_ids)} validation ids "
                        f"(drop {', '.join(f'{p:g}' for p in res.drop_fractions)})")
    keys = list(res.trials[0].values)
    for col in (*keys, "LDS", "sec"):
        table.add_column(col, justify="right", no_wrap=True)
    for t in res.trials:
        mark = "[bold]" if t.values == res.best else ""
        lds = f"{mark}{t.lds:.3f}" if t.lds == t.lds else ("skipped" if t.skipped else "nan")
        table.add_row(*(str(t.values[k]) for k in keys), lds, f"{t.seconds:.1f}")
    _console().print(table)
    chosen = ", ".join(f"{k}={v}" for k, v in res.best.items())
    typer.echo(f"chose {chosen}; wrote {res.path} (magic attribute --method {res.method} uses it)")


@app.command()
def score(
    overrides: Overrides = None, config_dir: ConfigDir = None,
    mix_devices: Annotated[bool, typer.Option(
        "--mix-devices", help="Accept ground truth retrained on several device types (e.g. two GPU models), "
                              "whose bits differ.")] = False,
    groups: Groups = None,
):
    """LDS of every attribution method against the ground truth; writes report/ (with --groups, against
    the ground truth that dropped whole groups: report/groups-<name>/)."""
    from rich.console import Console

    from magic_cli import api

    cfg = _load(_with_groups(overrides, groups), config_dir)
    result = _run("score", api.score, cfg, mix_devices=mix_devices)
    Console().print(_lds_table(result))
    for line in result.low_lds_lines():
        _console().print(f"[yellow]low LDS:[/] {line}")
    if result.missing_drop_fractions:
        _console().print("no ground truth yet for drop " + ", ".join(f"{p:g}" for p in result.missing_drop_fractions)
                         + " (run `magic retrain-ground-truth`)")
    typer.echo(f"wrote {result.report_path}")


def _lds_table(result):
    """The terminal table of a ScoreResult: one row per method x drop fraction."""
    from rich.table import Table

    table = Table(title=f"LDS ({result.output} output, Spearman over retrained subsets)")
    for col in ("method", "drop", "LDS", "95% CI", "n", "pearson", "slope", "sec"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for method, per_drop in result.lds.items():
        secs = result.seconds.get(method)
        for p, s in per_drop.items():
            table.add_row(method, f"{p:g}", f"{s.mean:.3f}", f"{s.ci_low:.3f}-{s.ci_high:.3f}", str(s.n_test),
                          f"{s.pearson:.3f}", f"{s.slope:.3f}", f"{secs:.1f}" if secs is not None else "-")
    return table


@app.command()
def smoothness(
    overrides: Overrides = None, config_dir: ConfigDir = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="Parallel training processes, one torch thread each (results do not depend on it).")] = 1,
    sweep: Annotated[bool, typer.Option(
        "--sweep", help="Overrides with Hydra sweep syntax (optimizer.lr=1e-3,3e-3 model.head_scale=0.1,1): every "
                        "combination, one table, and the recommended one.")] = False,
):
    """Will MAGIC work here? The metasmoothness S of training in the data weights (no metagradient),
    over the parameters and the test outputs, with a verdict; --sweep searches recipes."""
    from magic_cli import api
    from magic_cli.progress import rich_progress
    from magic_cli.stages.smoothness import VERDICTS

    if sweep:
        res = _run("smoothness", api.smoothness_sweep, list(overrides or []), config_dir, workers,
                   progress=rich_progress)
        typer.echo("metasmoothness S over the test outputs (± over directions), over the parameters, accuracy; "
                   "* on the Pareto front")
        for line in res.table_lines():
            typer.echo(line)
        _console().print(res.recommendation_reason())
        typer.echo(f"recommended: {res.recommended}")
        typer.echo(f"wrote {res.folder}/sweep.md (and sweep.csv, sweep.png)")
        return
    cfg = _load(overrides, config_dir)
    res = _run("smoothness", api.smoothness, cfg, workers, progress=rich_progress)
    so, sp = res.s_outputs, res.s_params
    _console().print(f"S over test outputs [bold]{so.mean:.3f}[/] ± {so.std:.3f}, over parameters "
                     f"{sp.mean:.3f} ± {sp.std:.3f} ({res.directions} directions, h={res.h}); "
                     f"test accuracy {res.test_accuracy:.4f}, train {res.train_seconds:.2f}s")
    typer.echo(VERDICTS[res.verdict])
    typer.echo(f"wrote {res.summary_path}")


@config_app.command("show")
def config_show(overrides: Overrides = None, config_dir: ConfigDir = None):
    """Print the resolved config YAML (after validation)."""
    from magic_cli.config import to_yaml

    cfg = _load(overrides, config_dir)
    typer.echo(to_yaml(cfg.raw), nl=False)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: usage errors (unknown option, missing value) become one line, exit 2.

    Typer's parser errors are click-style exceptions (format_message(), exit_code); they are
    recognised by that interface, not by class, because recent Typer vendors its own click.
    """
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="magic", standalone_mode=False)
    except typer.Abort:
        typer.echo("magic: aborted", err=True)
        return 130
    except Exception as e:
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        message = e.format_message()
        ctx = getattr(e, "ctx", None)
        if getattr(e, "option_name", None) and ctx is not None:
            valid = sorted(o for p in ctx.command.params for o in p.opts if o.startswith("--"))
            message = f"no such option {e.option_name}; valid options: {', '.join(valid)}"
        typer.echo(f"magic: error: {message}", err=True)
        return 2
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())
