"""Results from Python: read a run directory without parsing its files by hand.

    import magic_cli
    run = magic_cli.load_run("runs/default")
    run.metrics                      # test accuracy, losses, steps, N, n_test
    s = run.scores("magic")          # s.values (N, J) float, s.test_ids [J], s.frame (pandas, N x J)
    masks, outputs = run.ground_truth(0.01)          # bool (m, N), float64 (m, n_test)
    run.lds()                        # the report's per-test LDS table (pandas), after `magic score`
    run.group_scores("label")        # d f_j / d e_g per group of training examples (pandas, G x J)

Everything is verified as the commands verify it (digests, and the fingerprint of the run's
training record); a damaged or foreign artifact raises magic_cli.errors.StageError naming the
file. Nothing is imported or unpickled from the run directory; the training config is read as
plain YAML.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml

from magic_cli.core.groups import Groups
from magic_cli.core.metrics import most_helpful_first
from magic_cli.data import load_dataset
from magic_cli.errors import ArtifactError, ConfigError, StageError
from magic_cli.run_dir import RunDir, load_npy, load_record, verify
from magic_cli.stages.assemble import load_data_weights
from magic_cli.stages.attribute import load_scores
from magic_cli.stages.ground_truth import make_masks
from magic_cli.stages.groups import group_score_frame, resolve_groups


@dataclass
class Scores:
    """Scores of one method: values[i, j] = d f_j / d w_i for training example i and test_ids[j]."""

    method: str
    values: object  # numpy (N, J)
    test_ids: list
    output: str  # loss | margin

    @property
    def frame(self):
        """pandas DataFrame (N, J): index = training example, columns = test ids."""

        return pd.DataFrame(self.values, columns=self.test_ids).rename_axis(index="train_id", columns="test_id")


class Run:
    """A finished run directory, read-only."""

    def __init__(self, root):
        self.dir = RunDir(root)
        self.dir.check_marker()
        if not self.dir.fingerprint_json.is_file():
            raise StageError(f"no finished training run in {root}")
        self.record = load_record(self.dir.fingerprint_json)
        self.fingerprint = self.record["fingerprint"]

    @property
    def root(self) -> Path:
        return self.dir.root

    @property
    def metrics(self) -> dict:
        return dict(self.record["metrics"])

    @property
    def config(self) -> dict:
        """The resolved config the run was trained with (config.yaml, read as plain YAML)."""

        return yaml.safe_load(self.dir.config_yaml.read_text())

    def methods(self) -> list[str]:
        return self.dir.methods_present()

    def scores(self, method: str = "magic") -> Scores:

        if method not in self.methods():
            raise StageError(f"no {method} scores in {self.root} (have: {', '.join(self.methods()) or 'none'})")
        values, side = load_scores(self.dir, method, self.fingerprint)
        return Scores(method, values, list(side["test_ids"]), side["output"])

    def train_outputs(self, output: str = "loss"):
        """f_j(w0) of every test example under the trained model: float64 (n_test,)."""

        verify(self.dir.train_outputs(output), {"fingerprint": self.fingerprint})
        return load_npy(self.dir.train_outputs(output))

    def drop_fractions(self) -> list[float]:
        base = self.dir.ground_truth_root
        return sorted(float(p.name[len("drop_"):]) for p in base.glob("drop_*")) if base.is_dir() else []

    def ground_truth(self, p: float, output: str = "loss"):
        """(masks bool (m, N), outputs float64 (m, n_test)) of drop fraction p, as merged."""

        path = self.dir.ground_truth_outputs(p, output)
        try:
            side = verify(path, {"fingerprint": self.fingerprint, "drop": f"{p:g}"})
        except ArtifactError as e:
            raise StageError(f"{e}; run `magic retrain-ground-truth`") from None
        masks = make_masks(int(self.metrics["n_train"]), p, side["num_subsets"], side["seed"])
        return masks, load_npy(path)

    def explain(self, test_id: int, k: int = 8, method: str = "magic"):
        """The top-k proponents and opponents of a test id as a tidy frame: train_id, score, rank, kind
        (proponent: dropping it is predicted to raise the test loss the most), and label and preview
        where `magic explain` drew this test id (report/explain/); computed from the verified scores."""
        scores = self.scores(method)
        if test_id not in scores.test_ids:
            raise StageError(f"test id {test_id} has no {method} scores: run `magic attribute --test-ids {test_id}`")
        tau = scores.values[:, scores.test_ids.index(test_id)]
        order = most_helpful_first(tau, scores.output)
        rows = [{"train_id": int(i), "score": float(tau[i]), "rank": r + 1, "kind": kind}
                for kind, chosen in (("proponent", order[:k]), ("opponent", order[::-1][:k]))
                for r, i in enumerate(chosen)]
        drawn = self.dir.explain_file(f"{method}.json")
        if drawn.is_file():
            shown = {(r["kind"], r["train_id"]): r for r in json.loads(drawn.read_text())["rows"]
                     if r["test_id"] == test_id}
            for row in rows:
                drawn_row = shown.get((row["kind"], row["train_id"]), {})
                row["label"], row["preview"] = drawn_row.get("label"), drawn_row.get("preview")
        return pd.DataFrame(rows)

    def group_scores(self, groups, method: str = "magic"):
        """d f_j / d e_g for every group g of training examples: the sum of its members' scores weighted
        by their training weights (core/groups.py), as a frame: group, size, then one column per
        test id. groups: "label", a table column, a file of group names (as --groups), or one group
        name per training example (None: in no group)."""
        from magic_cli.config import from_dict

        scores = self.scores(method)
        config = from_dict(self.config)
        n = int(self.metrics["n_train"])
        if isinstance(groups, (str, Path)):
            dataset = load_dataset(config.dataset, config.seed, getattr(torch, config.dtype))
            resolved = resolve_groups(str(groups), dataset)
        else:
            names = list(groups)
            if len(names) != n:
                raise ConfigError(f"groups: {len(names)} names given, one per training example needs {n}")
            resolved = Groups.of(names, "given")
        w0 = load_data_weights(config.train.data_weights, n) if config.train.data_weights else None
        return group_score_frame(scores.values, resolved, w0, scores.test_ids)

    def lds(self):
        """The per-test LDS table of the last `magic score` (method, drop, test_id, spearman, pearson, slope)."""
        summary = self.dir.report_file("summary.json")
        if not summary.is_file():
            raise StageError(f"no report in {self.root}: run `magic score`")
        if json.loads(summary.read_text()).get("fingerprint") != self.fingerprint:
            raise StageError(f"the report in {self.root} belongs to another training run: run `magic score` again")
        return pd.read_csv(self.dir.report_file("lds.csv"))


def load_run(root) -> Run:
    """The run in `root` (a run directory written by `magic train`)."""
    return Run(root)
