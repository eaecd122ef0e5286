"""The Python API: the same calls the `magic` commands make, returning their typed results.

    import magic_cli

    cfg = magic_cli.compose(["experiment=digits_mlp", "ground_truth.num_subsets=20"])
    magic_cli.train(cfg)                                   # TrainResult
    magic_cli.attribute(cfg, test_ids="0:50")              # AttributeResult (exact MAGIC)
    magic_cli.attribute(cfg, test_ids=[0, 1], method="trak")
    magic_cli.explain(cfg, test_ids=[0, 7], k=8)           # ExplainResult: galleries in report/explain/
    magic_cli.retrain_ground_truth(cfg, workers=2)         # GroundTruthResult
    result = magic_cli.score(cfg)                          # ScoreResult: result.lds["magic"][0.01].mean
    run = magic_cli.load_run(cfg.out_dir)                  # read what the stages wrote

Each call writes exactly what its command writes, in the config's out_dir, and raises a
magic_cli.errors.UserError (one line) where the command prints one. `progress`, where given, is a
factory (description, total) -> context manager yielding advance(done), e.g.
magic_cli.progress.rich_progress; none by default.
"""

from __future__ import annotations

from typing import Sequence

from magic_cli.config import Config, load, with_values
from magic_cli.run_dir import RunDir
from magic_cli.stages.attribute import AttributeResult, attribute_stage
from magic_cli.stages.explain import ExplainResult, explain_stage
from magic_cli.stages.ground_truth import GroundTruthResult, ground_truth_stage
from magic_cli.stages.results import Run, load_run
from magic_cli.stages.score import ScoreResult, score_stage
from magic_cli.stages.smoothness import SmoothnessResult, SweepResult, smoothness_stage, sweep_stage
from magic_cli.stages.train import TrainResult, train_stage
from magic_cli.stages.tune import TuneResult, tune_stage


def compose(overrides: Sequence[str] = (), config_dir: str | None = None) -> Config:
    """The validated config of conf/ (and a folder of your own configs) with Hydra overrides."""
    return load(list(overrides), str(config_dir) if config_dir is not None else None)


def _method_and_ids(cfg: Config, method: str | None, test_ids: str | Sequence[int]) -> tuple[Config, str]:
    """The config with attribute.method set (if given), and the test ids as a --test-ids spec."""
    if method is not None:
        cfg = with_values(cfg, [f"attribute.method={method}"])
    return cfg, test_ids if isinstance(test_ids, str) else ",".join(str(int(i)) for i in test_ids)


def train(cfg: Config, overwrite: bool = False, progress=None) -> TrainResult:
    """`magic train`: train deterministically and write train/ (or verify a finished run)."""
    return train_stage(cfg, RunDir(cfg.out_dir), list(cfg.overrides), overwrite=overwrite, progress_factory=progress)


def attribute(cfg: Config, test_ids: str | Sequence[int], method: str | None = None, overwrite: bool = False,
              progress=None) -> AttributeResult:
    """`magic attribute --test-ids ...`: scores d f_j / d w_i of the test ids (a spec such as
    "0:50" or a list of ids) by MAGIC (default) or another method of magic_cli.names.METHODS."""
    cfg, spec = _method_and_ids(cfg, method, test_ids)
    return attribute_stage(cfg, RunDir(cfg.out_dir), spec, overwrite=overwrite, progress_factory=progress)


def explain(cfg: Config, test_ids: str | Sequence[int], k: int = 8, method: str | None = None,
            verify: bool = False, workers: int = 1, progress=None, groups: str | None = None) -> ExplainResult:
    """`magic explain`: the top-k proponents and opponents of each test id, drawn as the data they
    are (report/explain/); with verify, retrained without them to compare predicted and actual.
    groups ("label", a table column or a file of group names) ranks groups of training examples."""
    cfg, spec = _method_and_ids(cfg, method, test_ids)
    return explain_stage(cfg, RunDir(cfg.out_dir), spec, k=k, verify=verify, workers=workers,
                         progress_factory=progress, groups=groups)


def retrain_ground_truth(cfg: Config, workers: int = 1, shard: str | None = None, merge_only: bool = False,
                         progress=None) -> GroundTruthResult:
    """`magic retrain-ground-truth`: retrain on the seeded random subsets (resumable, shardable)."""
    return ground_truth_stage(cfg, RunDir(cfg.out_dir), shard=shard, workers=workers, progress_factory=progress,
                              merge_only=merge_only)


def tune(cfg: Config, method: str | None = None, progress=None) -> TuneResult:
    """`magic tune --method M`: M's hyperparameters chosen by LDS on validation test ids (never reported)."""
    if method is not None:
        cfg = with_values(cfg, [f"attribute.method={method}"])
    return tune_stage(cfg, RunDir(cfg.out_dir), progress_factory=progress)


def score(cfg: Config, mix_devices: bool = False) -> ScoreResult:
    """`magic score`: LDS of every attribution method against the ground truth; writes report/."""
    return score_stage(cfg, RunDir(cfg.out_dir), mix_devices=mix_devices)


def smoothness(cfg: Config, workers: int = 1, progress=None) -> SmoothnessResult:
    """`magic smoothness`: the metasmoothness S of training in the data weights, with a verdict."""
    return smoothness_stage(cfg, RunDir(cfg.out_dir), workers, progress_factory=progress)


def smoothness_sweep(overrides: Sequence[str], config_dir: str | None = None, workers: int = 1,
                     progress=None) -> SweepResult:
    """`magic smoothness --sweep`: every combination of Hydra sweep overrides, and the recommended one."""
    return sweep_stage(list(overrides), str(config_dir) if config_dir is not None else None, workers,
                       progress_factory=progress)


__all__ = ["AttributeResult", "Config", "ExplainResult", "GroundTruthResult", "Run", "ScoreResult",
           "SmoothnessResult", "SweepResult", "TrainResult", "TuneResult", "attribute", "compose", "explain",
           "load_run", "retrain_ground_truth", "score", "smoothness", "smoothness_sweep", "train", "tune"]
