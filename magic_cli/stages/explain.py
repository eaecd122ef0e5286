"""`magic explain`: which training examples made this prediction, shown as the data they are, and,
with --verify, what actually happens when they are dropped.

    report/explain/<method>_<test id>.png     the gallery: the test example, top-k proponents, top-k opponents
    report/explain/<method>.md, <method>.json  the tables (Markdown for people, JSON rows for programs)
    report/index.html                          the page of the whole report (stages/page.py)
    report/explain/verify/<method>_<id>_<kind>_<k>.npz  one retraining without k examples (--verify;
                                               resumable, each with its sidecar)
    report/explain/<method>_groups-<name>_*    the same with --groups: groups of training examples
                                               ranked by their group score (core/groups.py)

Sign convention (DESIGN.md §1): scores[i, j] = d f_j / d w_i. Dropping a set D of training
examples is predicted to change f_j by -sum_{i in D} w0_i scores[i, j]. For the loss output a
**proponent** of test example j is one whose dropping is predicted to raise its loss the most
(the most negative scores) and an **opponent** one whose dropping is predicted to lower it the
most (the most positive); for the margin output the signs are reversed (a proponent supports
the margin). --verify retrains without the top-k proponents, without the top-k opponents and
without k random examples (the control), with the same determinism as the ground truth, and
compares the actual change of f_j with the predicted one.

With --groups the units are groups of training examples (stages/groups.py): a group's score is
d f_j / d e_g = sum of its members' w0_i scores[i, j], the derivative with respect to scaling the
group's weight; dropping the group is predicted to change f_j by minus that. A group is shown by
its most influential member; --verify drops whole groups (k = 1, 2, 4, ... groups).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from magic_cli.config import Config, parse_test_ids
from magic_cli.core.groups import Groups, group_mask, group_scores
from magic_cli.core.metrics import most_helpful_first
from magic_cli.data.files import load_tokenizer
from magic_cli.data.text import ALPHABET
from magic_cli.determinism import derive_seed, enable_determinism
from magic_cli.errors import ConfigError, StageError
from magic_cli.progress import no_progress
from magic_cli.render import Shown, gallery_png, image_of, kind_of, snippet, text_of
from magic_cli.run_dir import (
    RunDir,
    load_npz,
    npz_bytes,
    save_artifact,
    save_bytes,
    save_text,
    sha256_bytes,
    status,
)
from magic_cli.stages.assemble import assemble, load_data_weights
from magic_cli.stages.attribute import load_scores, resolve_compile, settings_of
from magic_cli.stages.checkpoints import load_final
from magic_cli.stages.ground_truth import init_worker, worker
from magic_cli.stages.groups import resolve_groups, unit_of
from magic_cli.stages.page import write_index
from magic_cli.workers import run_tasks

VERIFY_KS = (1, 4, 16, 64)  # examples dropped by --verify (those above a quarter of N are skipped)
VERIFY_GROUPS = (1, 2, 4, 8)  # groups dropped by --verify --groups (at most a quarter of them)
KINDS = ("proponents", "opponents", "random")


@dataclass(frozen=True)
class Example:
    """One training example in an explanation."""

    train_id: int
    rank: int  # 1 = the strongest
    kind: str  # proponent | opponent
    score: float  # d f_j / d w_i (with --groups: the group's score, d f_j / d e_g)
    label: str
    preview: str  # the example as text (decoded tokens, a feature row), "" for an image
    group: str | None = None  # with --groups: the group, train_id being its most influential member
    size: int = 1  # examples in the group


@dataclass(frozen=True)
class Explanation:
    test_id: int
    label: str
    prediction: str  # the trained model's predicted class ("" for sequences)
    output: float  # f_j(w0): the test loss (or margin) of the trained model
    proponents: tuple[Example, ...]
    opponents: tuple[Example, ...]
    gallery: Path  # the PNG


@dataclass(frozen=True)
class Check:
    """One counterfactual of --verify: retrained without k examples of one kind."""

    test_id: int
    kind: str  # proponents | opponents | random
    k: int
    predicted: float  # predicted change of f_j
    actual: float  # measured change of f_j after retraining
    flipped: bool  # the predicted class of the test example changed

    @property
    def ratio(self) -> float:
        return self.actual / self.predicted if self.predicted != 0 else float("nan")


@dataclass(frozen=True)
class ExplainResult:
    method: str
    output: str
    k: int
    groups: str | None  # --groups (None: single examples)
    explanations: tuple[Explanation, ...]
    checks: tuple[Check, ...]  # empty without --verify
    retrained: int  # retrainings this command ran (--verify)
    seconds: float
    markdown: Path
    table: Path  # the JSON rows


def explain_stage(config: Config, run: RunDir, test_ids_spec: str, k: int = 8, verify: bool = False,
                  workers: int = 1, progress_factory=None, groups: str | None = None) -> ExplainResult:
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    enable_determinism(config.device, config.threads)
    with run.lock(exclusive=False):
        run.clean(exclusive=False)
        record = run.require_trained(config)
        problem = assemble(config)
        config = resolve_compile(config, problem, run, record["fingerprint"])
        return _explain(config, run, record, problem, test_ids_spec, k, verify, workers, progress_factory, groups)


def _explain(config, run, record, problem, spec, k, verify, workers, progress_factory, groups_spec) -> ExplainResult:
    start = time.perf_counter()
    ds, method = problem.dataset, config.attribute.method
    ids = parse_test_ids(spec, ds.n_test)
    groups = resolve_groups(groups_spec, ds) if groups_spec is not None else None
    units = Units(ds.n_train, groups)
    if k > units.n:
        raise ConfigError(f"--k {k} is more than the {units.n} {units.what}")
    scores, side = load_scores(run, method, record["fingerprint"])
    missing = [i for i in ids if i not in side["test_ids"]]
    if missing:
        listed = ",".join(map(str, missing[:8]))
        many = len(missing) > 1
        raise StageError(f"test id{'s' * many} {listed} {'have' if many else 'has'} no {method} scores yet: run `magic "
                         f"attribute --test-ids {listed} --method {method}` first")
    output = side["output"]
    column = {t: c for c, t in enumerate(side["test_ids"])}
    tau = {j: np.asarray(scores[:, column[j]], dtype=np.float64) for j in ids}  # (N,) each
    w0 = load_data_weights(config.train.data_weights, ds.n_train) if config.train.data_weights else np.ones(ds.n_train)
    unit_scores = {j: units.scores(tau[j], w0) for j in ids}  # (N,) or (G,) each
    stem = f"{method}_{units.name}" if groups is not None else method

    final = load_final(problem, run, record)
    base, predicted_class = _outputs(problem, final, ids, output)
    # as a person reads them: before standardising where the dataset kept that
    x_train, x_test = ds.raw if ds.raw is not None else (ds.x_train.cpu().numpy(), ds.x_test.cpu().numpy())
    kind = kind_of(x_train, ds.name)
    decode = _decoder(config, kind)
    columns = list(ds.columns) if ds.columns is not None else None
    label = lambda y: "" if y.dim() else str(int(y))  # noqa: E731  (sequences have no one label)

    def shown(x, title) -> Shown:
        if ds.show is not None:
            return _shown_by_plugin(ds, x, title)
        return Shown(title, image_of(x, kind), text_of(x, kind, decode, columns))

    def example(u: int, rank: int, name: str, j: int) -> Example:
        if groups is None:
            return Example(u, rank, name, float(tau[j][u]), label(ds.y_train[u]),
                           shown(x_train[u], f"train {u}").text)
        members = groups.members(u)  # shown by its member that pushes hardest in the group's direction
        ordered = members[most_helpful_first(w0[members] * tau[j][members], output)]
        i = int(ordered[0] if name == "proponent" else ordered[-1])
        return Example(i, rank, name, float(unit_scores[j][u]), label(ds.y_train[i]),
                       shown(x_train[i], f"train {i}").text, groups.names[u], len(members))

    def caption(e: Example) -> str:
        if e.group is None:
            return _title(f"train {e.train_id}", e.label, "", f"{e.score:+.3g}")
        return " · ".join([f"group {e.group}", f"{e.size} ex.", f"e.g. train {e.train_id}", f"{e.score:+.3g}"])

    explanations = []
    for j in ids:
        order = most_helpful_first(unit_scores[j], output)
        # a proponent's dropping is predicted to raise a loss: only units of that sign (and the reverse)
        sign = -1.0 if output == "loss" else 1.0
        picks = {"proponent": [u for u in order[:k] if sign * unit_scores[j][u] > 0],
                 "opponent": [u for u in order[::-1][:k] if sign * unit_scores[j][u] < 0]}
        rows = {name: tuple(example(int(u), r + 1, name, j) for r, u in enumerate(chosen))
                for name, chosen in picks.items()}
        test_title = _title(f"test {j}", label(ds.y_test[j]), predicted_class[j], f"{output} {base[j]:.3f}")
        gallery = run.explain_file(f"{stem}_{j}.png")
        heading = f"{method}: test id {j}, top {k} proponent and opponent {units.what} (scores d {output} / d w)"
        save_bytes(gallery, gallery_png(
            shown(x_test[j], test_title), [shown(x_train[e.train_id], caption(e)) for e in rows["proponent"]],
            [shown(x_train[e.train_id], caption(e)) for e in rows["opponent"]], heading))
        explanations.append(Explanation(j, label(ds.y_test[j]), predicted_class[j], float(base[j]),
                                        rows["proponent"], rows["opponent"], gallery))

    checks, retrained = ((), 0)
    if verify:
        checks, retrained = _verify(config, run, record, problem, ids, tau, w0, base, predicted_class, output,
                                    workers, progress_factory, units, unit_scores, stem)
    result_rows = [{"test_id": e.test_id, "kind": ex.kind, "rank": ex.rank, "train_id": ex.train_id,
                    "score": ex.score, "label": ex.label, "preview": snippet(ex.preview, 200),
                    **({} if ex.group is None else {"group": ex.group, "size": ex.size})}
                   for e in explanations for ex in (*e.proponents, *e.opponents)]
    table = run.explain_file(f"{stem}.json")
    save_text(table, json.dumps({"method": method, "stem": stem, "groups": groups_spec, "output": output, "k": k,
                                 "rows": result_rows, "verify": [{**vars(c), "ratio": c.ratio} for c in checks]},
                                indent=1) + "\n")
    markdown = run.explain_file(f"{stem}.md")
    save_text(markdown, _markdown(method, output, k, explanations, checks, units))
    write_index(run, config.name)
    return ExplainResult(method, output, k, groups_spec, tuple(explanations), tuple(checks), retrained,
                         time.perf_counter() - start, markdown, table)


@dataclass(frozen=True)
class Units:
    """What explain ranks and drops: single training examples, or groups of them."""

    n_train: int
    groups: Groups | None

    @property
    def n(self) -> int:
        return self.n_train if self.groups is None else self.groups.n_groups

    @property
    def what(self) -> str:
        return "training examples" if self.groups is None else "groups"

    @property
    def name(self) -> str:
        return "" if self.groups is None else unit_of(self.groups.source)

    @property
    def ks(self) -> list[int]:
        """How many units --verify drops: examples 1, 4, 16, 64; groups 1, 2, 4, 8; at most a quarter."""
        steps = VERIFY_KS if self.groups is None else VERIFY_GROUPS
        return [k for k in steps if k <= max(1, self.n // 4)]

    def scores(self, tau: np.ndarray, w0: np.ndarray) -> np.ndarray:
        """Each unit's score for one test id: tau itself, or the group scores sum w0_i tau_i."""
        return tau if self.groups is None else group_scores(tau[:, None], self.groups, w0)[:, 0]

    def examples(self, chosen) -> np.ndarray:
        """The training examples of the chosen units, sorted."""
        if self.groups is None:
            return np.sort(np.asarray(chosen, dtype=np.int64))
        return np.flatnonzero(~group_mask(self.groups, chosen))


def _shown_by_plugin(ds, x, title: str) -> Shown:
    """An example drawn by the dataset's own show(x): an image in [0, 1] or a str; one line otherwise."""
    where = f"dataset={ds.name}: its show function"
    try:
        value = ds.show(x)
    except Exception as e:  # the plugin's code: any fault is one line naming it
        raise ConfigError(f"{where} failed on {title.split(' · ')[0]}: {type(e).__name__}: {e}") from None
    if isinstance(value, str):
        return Shown(title, None, value)
    image = np.asarray(value, dtype=np.float64) if isinstance(value, np.ndarray) else None
    if image is None or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ConfigError(f"{where} must return a str or a numpy image (H, W) or (H, W, 3), got "
                          f"{type(value).__name__}{'' if image is None else f' of shape {image.shape}'}")
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise ConfigError(f"{where} must return an image with values in [0, 1]")
    return Shown(title, image, "")


def _title(name: str, label: str, predicted: str, value: str) -> str:
    """'train 12 · label 3 · +0.021' (no label or prediction for sequences)."""
    parts = [name] + ([f"label {label}"] if label else []) + ([f"predicted {predicted}"] if predicted else [])
    return " · ".join(parts + [value])


def _outputs(problem, state, ids, output):
    """f_j(w0) (the chosen output) and the predicted class of each test id ("" for sequences)."""
    ds = problem.dataset
    outputs = problem.outputs(state)[output]
    with torch.no_grad():
        logits, _ = problem.model.apply(state.params, state.buffers, ds.x_test[ids], train=False)
    classes = {j: ("" if logits.dim() > 2 else str(int(logits[n].argmax()))) for n, j in enumerate(ids)}
    return outputs, classes


def _decoder(config, kind):
    """Token ids -> text for the dataset: its tokenizer, or the character alphabet, or None."""
    if kind != "tokens":
        return None
    name, options = config.dataset["name"], config.dataset
    if options.get("tokenizer"):
        tokenizer = load_tokenizer(options["tokenizer"])
        return lambda ids: tokenizer.decode(ids)
    if name in ("text_chars", "text_file"):
        return lambda ids: "".join(ALPHABET[i] if 0 <= i < len(ALPHABET) else "?" for i in ids)
    return None


# --- --verify: the counterfactuals, actually run ------------------------------------------------

def _drops(j: int, unit_scores: np.ndarray, output: str, k: int, seed: int, units: Units) -> dict[str, np.ndarray]:
    """The training examples each counterfactual drops: those of the top-k proponent units, of the
    top-k opponent units, and of k random units (seeded by the test id and k). Proponents and
    opponents are those of the right sign only, as shown: a kind with fewer than k is not run."""
    order = most_helpful_first(unit_scores, output)
    sign = -1.0 if output == "loss" else 1.0
    rng = np.random.default_rng(derive_seed(seed, "explain", j, k) if units.groups is None
                                else derive_seed(seed, "explain", units.name, j, k))
    drops = {"proponents": order[:k], "opponents": order[::-1][:k]}
    out = {kind: units.examples(chosen) for kind, chosen in drops.items()
           if np.all(sign * unit_scores[chosen] * (1 if kind == "proponents" else -1) > 0)}
    out["random"] = units.examples(rng.choice(len(unit_scores), size=k, replace=False))
    return out


def _retrain_without(task):
    """(task, f of every test example after retraining without task's examples, predicted classes)."""
    problem = worker()["problem"]
    key, dropped = task
    mask = torch.ones(problem.dataset.n_train, dtype=problem.dtype, device=problem.device)
    mask[torch.as_tensor(dropped, dtype=torch.long, device=problem.device)] = 0
    final, _, _ = problem.run(weights=problem.weights * mask)
    outputs = problem.outputs(final)
    with torch.no_grad():
        logits, _ = problem.model.apply(final.params, final.buffers, problem.dataset.x_test, train=False)
    classes = logits.argmax(-1).cpu().numpy() if logits.dim() == 2 else np.zeros(0, dtype=np.int64)
    return task, outputs, classes, worker()["fingerprint"]


def _verify(config, run, record, problem, ids, tau, w0, base, predicted_class, output, workers, progress_factory,
            units: Units, unit_scores: dict, stem: str):
    settings = sha256_bytes(json.dumps(settings_of(config), sort_keys=True).encode())[:16]
    plan = {}  # (j, kind, k) -> (path, identity, dropped)
    for j in ids:
        for k in units.ks:
            for kind, dropped in _drops(j, unit_scores[j], output, k, config.seed, units).items():
                identity = {"fingerprint": record["fingerprint"], "settings": settings, "test_id": j, "kind": kind,
                            "k": k, "dropped": sha256_bytes(dropped.astype(np.int64).tobytes())[:16]}
                plan[(j, kind, k)] = (run.explain_verify_file(stem, j, kind, k), identity, dropped)
    todo = [(key, dropped) for key, (path, identity, dropped) in plan.items() if status(path, identity) != "ok"]
    with (progress_factory or no_progress)(f"verify ({len(todo)} retrainings)", len(todo)) as advance:
        for done, (task, outputs, classes, fingerprint) in enumerate(
                run_tasks(todo, workers, _retrain_without, init_worker, (config.raw,)), start=1):
            if fingerprint != record["fingerprint"]:
                raise StageError("the training config changed while retraining; rerun `magic explain --verify`")
            path, identity, _ = plan[task[0]]
            save_artifact(path, npz_bytes(output=outputs[output], classes=classes), identity)
            advance(done)
    checks = []
    for (j, kind, k), (path, identity, dropped) in plan.items():
        z = load_npz(path)
        predicted = -float(np.sum(w0[dropped] * tau[j][dropped]))
        flipped = bool(len(z["classes"])) and str(int(z["classes"][j])) != predicted_class[j]
        checks.append(Check(j, kind, k, predicted, float(z["output"][j] - base[j]), flipped))
    return checks, len(todo)


def _markdown(method, output, k, explanations, checks, units: Units) -> str:
    by_group = units.groups is not None
    lines = [f"# magic explain: {method}" + (f", groups of {units.groups.source}" if by_group else ""), "",
             f"Scores are d {output} / d w_i. A **proponent** of a test example is a training example whose "
             f"dropping is predicted to {'raise' if output == 'loss' else 'lower'} its {output} the most; an "
             f"**opponent** one whose dropping is predicted to {'lower' if output == 'loss' else 'raise'} it the "
             f"most. Dropping a set D changes the {output} by about -sum of their scores.", "",
             *([f"Ranked: {units.n} groups; a group's score is the sum of its members' scores (weighted by "
                "their training weights), and each group is shown by its most influential member.", ""]
               if by_group else [])]
    for e in explanations:
        lines += [f"## Test id {e.test_id}", "",
                  f"Label {e.label or '-'}, predicted {e.prediction or '-'}, {output} {e.output:.4f}.", "",
                  f"![test {e.test_id}]({e.gallery.name})", "",
                  *(["| kind | rank | group | size | e.g. train id | label | score | example |",
                     "|---|---|---|---|---|---|---|---|"] if by_group else
                    ["| kind | rank | train id | label | score | example |", "|---|---|---|---|---|---|"])]
        for ex in (*e.proponents, *e.opponents):
            group = f"{ex.group} | {ex.size} | " if by_group else ""
            lines.append(f"| {ex.kind} | {ex.rank} | {group}{ex.train_id} | {ex.label or '-'} | {ex.score:+.4g} | "
                         f"{snippet(ex.preview, 50).replace('|', '/') or '(image)'} |")
        mine = [c for c in checks if c.test_id == e.test_id]
        if mine:
            lines += ["", f"Retrained without k {units.what} (`--verify`): predicted and actual change of the "
                          f"{output}.",
                      "", "| dropped | k | predicted | actual | actual / predicted | class flips |",
                      "|---|---|---|---|---|---|"]
            for c in sorted(mine, key=lambda c: (c.kind != "proponents", c.kind != "opponents", c.k)):
                lines.append(f"| {c.kind} | {c.k} | {c.predicted:+.4f} | {c.actual:+.4f} | {c.ratio:.2f} | "
                             f"{'yes' if c.flipped else 'no'} |")
        lines.append("")
    return "\n".join(lines)
