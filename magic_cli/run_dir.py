"""The run directory: every artifact path of a run, atomic saves, verified loads, the run
marker and the run lock.

    magic-run.json  config.yaml overrides.txt meta.json
    train/        fingerprint.json  metrics.json  final.pt  checkpoints_<tag>/state_<t>.pt  outputs_{loss,margin}.npy
    attribute/<method>/  settings.json  test_<id>.npy  scores.npy  scores.json  last_run.json
    ground_truth/drop_<p>/  masks.npy  subset_<k>.npz  outputs_{loss,margin}.npy
    ground_truth/groups-<name>/drop_<p>/  the same, dropping whole groups (ground_truth.groups)
    tune/         split.json <method>.json (magic tune: validation ids, grid, chosen values)
    report/       index.html lds.csv summary.json report.md lds_vs_drop.png scatter_<method>_<p>.png
    report/groups-<name>/  the same for the group ground truth, and group_scores_<method>.csv
    report/explain/  <method>_<test id>.png <method>.md <method>.json verify/ (magic explain)

Integrity (DESIGN.md §8):
- Every write goes to a temporary file in the same folder and is moved into place with
  os.replace, so a killed command never leaves a torn file.
- Every binary artifact X.ext has a sidecar X.json, written after it, holding its sha256 and
  the fingerprint of the run it belongs to (plus what else identifies it: a test id, a mask).
  `verify` checks both on every load; a missing sidecar means the write did not finish. If two
  writers race on one artifact the digest no longer matches and it is recomputed, never used.
- A folder becomes a run directory only if it is new or empty; it then carries MARKER, and
  nothing is ever written into or deleted from a folder without it.
- `lock`: `train` holds the run exclusively, the later stages share it, so a retraining can
  never replace a run under a stage that is reading or writing it.
Tensors are loaded with weights_only=True only; nothing is pickled or imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

from magic_cli.config import diff_keys
from magic_cli.core.replay import root_boundaries
from magic_cli.errors import ArtifactError, StageError  # noqa: F401  (StageError is re-exported)
from magic_cli.storage import (  # noqa: F401  (the stages save and load through run_dir)
    UMASK,
    json_text,
    load_json,
    load_npy,
    load_npz,
    load_tensors,
    npy_bytes,
    npz_bytes,
    save_bytes,
    save_json,
    save_npy,
    save_tensors,
    save_text,
    sha256_bytes,
    sha256_file,
    sha256_tree,
    tensors_bytes,
    write_tmp,
)

MARKER = "magic-run.json"
FORMAT = 2  # run directory layout version; runs of another format are refused
LOCK = ".lock"
TRASH = ".trash"

class Staged:
    """Artifacts written to temporary files now and put in place by commit() once the writer
    knows they are right (e.g. training states, before the rest of training is checked); an
    uncommitted file is a temporary file, which discard() or the next command's clean removes."""

    def __init__(self):
        self.items: list[tuple[Path, Path, dict]] = []

    def add(self, path, data: bytes, meta: dict) -> None:
        record = {**meta, "file": Path(path).name, "sha256": sha256_bytes(data), "bytes": len(data)}
        self.items.append((write_tmp(path, data), Path(path), record))

    def commit(self) -> list[Path]:
        for tmp, path, record in self.items:
            os.replace(tmp, path)
            save_json(sidecar(path), record)  # after the file, as save_artifact does
        done, self.items = [p for _, p, _ in self.items], []
        return done

    def discard(self) -> None:
        for tmp, _, _ in self.items:
            tmp.unlink(missing_ok=True)
        self.items = []


# --- artifacts: a file and its sidecar ----------------------------------------------------------

def sidecar(path) -> Path:
    """X.npy -> X.json: the digest and identity of an artifact."""
    path = Path(path)
    return path.with_name(path.stem + ".json")


def save_artifact(path, data: bytes, meta: dict) -> dict:
    """Write `data` to path, then its sidecar {sha256, bytes, **meta}; return the sidecar record."""
    record = {**meta, "file": Path(path).name, "sha256": sha256_bytes(data), "bytes": len(data)}
    save_bytes(path, data)
    save_json(sidecar(path), record)
    return record


def _rel(path: Path) -> str:
    """A path as the user should see it in a message."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def verify(path, expect: dict | None = None, what: str = "") -> dict:
    """The sidecar record of a complete, undamaged artifact of the expected identity.

    Raises ArtifactError (reason missing | incomplete | damaged | stale) naming the file.
    `expect`: sidecar keys and the values they must have (e.g. the run's fingerprint).
    """
    path = Path(path)
    hint = f"; {what}" if what else ""
    if not path.is_file():
        raise ArtifactError(f"{_rel(path)} is missing{hint}", "missing")
    try:
        record = load_json(sidecar(path))
        if not isinstance(record, dict) or "sha256" not in record:
            raise ValueError
    except FileNotFoundError:
        raise ArtifactError(f"{_rel(path)} was not finished (no {sidecar(path).name}){hint}", "incomplete") from None
    except ValueError:
        raise ArtifactError(f"{_rel(sidecar(path))} is damaged (not a sidecar record){hint}", "damaged") from None
    if record.get("bytes") != path.stat().st_size or sha256_file(path) != record["sha256"]:
        raise ArtifactError(f"{_rel(path)} is damaged (its sha256 does not match {sidecar(path).name}){hint}",
                            "damaged")
    for key, value in (expect or {}).items():
        if record.get(key) != value:
            raise ArtifactError(f"{_rel(path)} belongs to another run or setting ({key}: {record.get(key)} "
                                f"-> {value}){hint}", "stale")
    return record


def status(path, expect: dict | None = None) -> str:
    """'ok' or the ArtifactError reason, without raising."""
    try:
        verify(path, expect)
        return "ok"
    except ArtifactError as e:
        return e.reason


def valid_record(path, expect: dict | None = None) -> dict | None:
    """The sidecar record of a valid artifact (as verify), or None: one hash, no exception."""
    try:
        return verify(path, expect)
    except ArtifactError:
        return None


def remove_artifact(path) -> None:
    Path(path).unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


def save_record(path, record: dict) -> dict:
    """A JSON artifact that carries its own digest (of its canonical content)."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    record = {**body, "sha256": sha256_bytes(json.dumps(body, sort_keys=True, default=str).encode())}
    save_json(path, record)
    return record


def load_record(path, what: str = "") -> dict:
    """Load a save_record JSON; ArtifactError if missing, torn or altered."""
    path = Path(path)
    hint = f"; {what}" if what else ""
    if not path.is_file():
        raise ArtifactError(f"{_rel(path)} is missing{hint}", "missing")
    try:
        record = load_json(path)
        body = {k: v for k, v in record.items() if k != "sha256"}
        ok = record.get("sha256") == sha256_bytes(json.dumps(body, sort_keys=True, default=str).encode())
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ArtifactError(f"{_rel(path)} is damaged{hint}", "damaged")
    return record


# --- the run directory --------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


PARAMETERISED = ("replay", "binomial")  # strategies whose checkpoint folder's name carries their parameter


def checkpoint_tag(strategy: str, param: int) -> str:
    """The name of a strategy's checkpoint folder: all | sqrt | replay<k> | binomial<memory>."""
    return f"{strategy}{param}" if strategy in PARAMETERISED else strategy


def strategy_of(tag: str) -> tuple[str, int]:
    """(strategy, parameter) of a checkpoint tag (checkpoint_tag's inverse)."""
    for strategy in PARAMETERISED:
        if tag.startswith(strategy):
            return strategy, int(tag[len(strategy):])
    return tag, 4


class RunDir:
    """Paths of one run's artifacts; file names live here and nowhere else."""

    def __init__(self, root, unit: str = ""):
        self.root = Path(root)
        self.unit = unit  # "" (single examples) or groups-<name>: where a group ground truth and its report go

    def for_unit(self, unit: str) -> "RunDir":
        """The same run, its ground truth and report those of `unit` (ground_truth/<unit>/, report/<unit>/)."""
        return RunDir(self.root, unit)

    # top level
    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def overrides_txt(self) -> Path:
        return self.root / "overrides.txt"

    @property
    def meta_json(self) -> Path:
        return self.root / "meta.json"

    # train/
    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def fingerprint_json(self) -> Path:
        """The finished-training record (fingerprint, config slice, metrics); written last."""
        return self.train_dir / "fingerprint.json"

    @property
    def metrics_json(self) -> Path:
        return self.train_dir / "metrics.json"

    def checkpoints(self, tag: str) -> Path:
        """The folder of one checkpoint strategy's stored states, one file per state."""
        return self.train_dir / f"checkpoints_{tag}"

    def checkpoint_state(self, tag: str, t: int) -> Path:
        return self.checkpoints(tag) / f"state_{t:06d}.pt"

    def checkpoint_names(self, tag: str, total_steps: int) -> list[str]:
        """The files of a strategy's stored states, relative to train/ (as the training record
        lists them): one per root boundary of the strategy's tree."""
        strategy, param = strategy_of(tag)
        return [str(self.checkpoint_state(tag, t).relative_to(self.train_dir))
                for t in root_boundaries(strategy, total_steps, param)]

    def checkpoint_states(self, tag: str, total_steps: int) -> dict[int, Path]:
        """{step: file} of a strategy's stored states."""
        strategy, param = strategy_of(tag)
        return {t: self.checkpoint_state(tag, t) for t in root_boundaries(strategy, total_steps, param)}

    def train_file(self, name: str) -> Path:
        """A file of train/ by its name relative to train/ (as the training record lists it)."""
        return self.train_dir / name

    @staticmethod
    def step_of(name: str) -> int:
        """The step of a checkpoint state's file name (checkpoints_<tag>/state_<t>.pt)."""
        return int(name.rsplit("_", 1)[1][:-len(".pt")])

    @property
    def final_state(self) -> Path:
        return self.train_dir / "final.pt"

    def train_outputs(self, output: str) -> Path:
        return self.train_dir / f"outputs_{output}.npy"

    # attribute/<method>/
    def attribute_dir(self, method: str) -> Path:
        return self.root / "attribute" / method

    def test_scores(self, method: str, test_id: int) -> Path:
        return self.attribute_dir(method) / f"test_{test_id}.npy"

    def attribute_settings(self, method: str) -> Path:
        return self.attribute_dir(method) / "settings.json"

    def scores_npy(self, method: str) -> Path:
        return self.attribute_dir(method) / "scores.npy"

    def scores_json(self, method: str) -> Path:
        return sidecar(self.scores_npy(method))

    def merge_lock_file(self, method: str) -> Path:
        """The lock serialising merges of attribute/<method>/ (stages/attribute.merge_lock)."""
        return self.attribute_dir(method) / ".merge.lock"

    def attribute_last_run(self, method: str) -> Path:
        return self.attribute_dir(method) / "last_run.json"

    def methods_present(self) -> list[str]:
        base = self.root / "attribute"
        return sorted(p.name for p in base.iterdir() if (p / "scores.json").is_file()) if base.is_dir() else []

    # ground_truth/drop_<p>/ (ground_truth/groups-<name>/drop_<p>/ for a unit of groups)
    @property
    def ground_truth_root(self) -> Path:
        return self.root / "ground_truth" / self.unit if self.unit else self.root / "ground_truth"

    def ground_truth_dir(self, p: float) -> Path:
        return self.ground_truth_root / f"drop_{p:g}"

    def masks(self, p: float) -> Path:
        return self.ground_truth_dir(p) / "masks.npy"

    def subset(self, p: float, k: int) -> Path:
        return self.ground_truth_dir(p) / f"subset_{k:05d}.npz"

    def ground_truth_outputs(self, p: float, output: str) -> Path:
        return self.ground_truth_dir(p) / f"outputs_{output}.npy"

    # tune/
    @property
    def tune_split(self) -> Path:
        """The validation test ids of `magic tune` (left out of every reported LDS)."""
        return self.root / "tune" / "split.json"

    def tune_file(self, method: str) -> Path:
        """A baseline's grid, validation LDS and chosen hyperparameters."""
        return self.root / "tune" / f"{method}.json"

    # smoothness/
    @property
    def smoothness_dir(self) -> Path:
        return self.root / "smoothness"

    def smoothness_direction(self, i: int) -> Path:
        return self.smoothness_dir / f"direction_{i:03d}.npz"

    @property
    def smoothness_base(self) -> Path:
        return self.smoothness_dir / "base.npz"

    @property
    def smoothness_summary(self) -> Path:
        return self.smoothness_dir / "summary.json"

    # report/
    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def explain_dir(self) -> Path:
        return self.report_dir / "explain"

    def explain_file(self, name: str) -> Path:
        """A file of report/explain/: <method>_<test id>.png, <method>.md, <method>.json."""
        return self.explain_dir / name

    def explain_verify_file(self, method: str, test_id: int, kind: str, k: int) -> Path:
        """One retraining of `magic explain --verify`: without the top-k `kind` examples of a test id."""
        return self.explain_dir / "verify" / f"{method}_{test_id}_{kind}_{k}.npz"

    def report_file(self, name: str) -> Path:
        """A file of report/ (report/<unit>/ for groups): lds.csv, summary.json, report.md, index.html,
        lds_vs_drop.png, scatter_<method>_<p>.png, group_scores_<method>.csv."""
        return self.report_dir / self.unit / name if self.unit else self.report_dir / name

    # --- ownership, locking, cleaning ---------------------------------------------------------

    def claim(self) -> None:
        """Make `root` a run directory, or check that it is one, before anything is written there.

        A folder that exists and holds anything without the marker is refused: magic never
        writes over or deletes files it did not make.
        """
        root = self.root
        if root.exists() and not root.is_dir():
            raise StageError(f"out_dir {_rel(root)} is a file, not a folder; choose another out_dir")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StageError(f"out_dir {_rel(root)} lies under a file; choose another out_dir") from None
        if self.marker.is_file():
            try:
                load_json(self.marker)
            except ValueError:  # torn or damaged, but the name says magic made this folder
                save_json(self.marker, {"magic_run": True, "format": FORMAT})
            self.check_marker()
            return
        self._refuse_older_layout()
        if any(root.iterdir()):
            raise StageError(f"out_dir {_rel(root)} is not empty and is not a magic run directory (no {MARKER}); "
                             "choose another out_dir")
        save_json(self.marker, {"magic_run": True, "format": FORMAT})

    def check_marker(self) -> None:
        """The folder is a run directory of this layout version (stages that only read or add)."""
        if not self.marker.is_file():
            self._refuse_older_layout()
            if self.root.is_dir() and any(self.root.iterdir()):
                raise StageError(f"{_rel(self.root)} is not a magic run directory (no {MARKER}); check out_dir")
            raise StageError(f"no finished training run in {_rel(self.root)}: run `magic train` with the same "
                             "overrides first")
        try:
            info = load_json(self.marker)
            fmt = info.get("format")
        except (ValueError, AttributeError):
            raise StageError(f"{_rel(self.marker)} is damaged: run `magic train` with the same overrides to "
                             "repair the run") from None
        if fmt != FORMAT:
            raise StageError(f"{_rel(self.root)} was made by another version of magic (format {fmt}, this is "
                             f"{FORMAT}); train again with --overwrite or choose another out_dir")

    def require_trained(self, config) -> dict:
        """The finished-training record of this run, checked against the config's fingerprint."""

        self.check_marker()
        if not self.fingerprint_json.is_file():
            raise StageError(f"no finished training run in {_rel(self.root)}: run `magic train` with the "
                             "same overrides first")
        record = load_record(self.fingerprint_json, "run `magic train` with the same overrides to repair the run")
        if record["fingerprint"] != config.fingerprint():
            diffs = diff_keys(record["slice"], config.training_slice())
            raise StageError(f"the run in {_rel(self.root)} was trained with a different config "
                             f"({'; '.join(diffs)}); use the training overrides or another out_dir")
        return record

    def _refuse_older_layout(self) -> None:
        if (self.train_dir / "fingerprint.json").is_file() and not self.marker.is_file():
            raise StageError(f"{_rel(self.root)} was made by an older version of magic (no {MARKER}); its files "
                             "cannot be verified: delete it or choose another out_dir")

    @contextlib.contextmanager
    def lock(self, exclusive: bool):
        """Hold the run: exclusively (train, after claim) or shared (every later stage, on a run
        directory only). Never waits."""

        if not exclusive:
            self.check_marker()

        try:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
        except FileNotFoundError:
            raise StageError(f"no finished training run in {_rel(self.root)}: run `magic train` with the same "
                             "overrides first") from None
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                if exclusive:
                    raise StageError(f"another magic command is using {_rel(self.root)}; wait for it to finish "
                                     "(or stop it) before training here") from None
                raise StageError(f"magic train is writing {_rel(self.root)}; wait for it to finish") from None
            yield
        finally:
            os.close(fd)

    def clean(self, exclusive: bool) -> None:
        """Remove what killed commands left: temporary files (all of them when holding the run
        exclusively, else those of dead processes on this host) and the trash of an --overwrite."""
        host = socket.gethostname()
        for tmp in self.root.rglob(".*~*~*~*.tmp"):
            _, name, pid, _ = tmp.name.rsplit("~", 3)
            dead = name == host and pid.isdigit() and not _pid_alive(int(pid))
            if exclusive or dead:
                tmp.unlink(missing_ok=True)
        if exclusive and (self.root / TRASH).exists():
            shutil.rmtree(self.root / TRASH, ignore_errors=True)

    def clear(self) -> None:
        """Delete the run's results (with the run held exclusively). train/ goes first, in one
        rename, so an interrupted clear leaves no finished training next to older results."""
        trash = self.root / TRASH
        trash.mkdir(exist_ok=True)
        for sub in ("train", "attribute", "ground_truth", "report", "smoothness", "tune"):
            if (self.root / sub).exists():
                os.replace(self.root / sub, trash / f"{sub}-{uuid.uuid4().hex}")
        shutil.rmtree(trash, ignore_errors=True)


class SweepDir:
    """`magic smoothness --sweep`'s folder, <out_dir>-sweep/: one run directory per combination
    (NN-<overrides>/), the table (sweep.csv, sweep.md, sweep.json), the plot (sweep.png), and
    SWEEP_MARKER, without which an existing non-empty folder is never written into."""

    MARKER = "magic-sweep.json"

    def __init__(self, out_dir):
        root = Path(out_dir)
        self.root = root.parent / f"{root.name}-sweep"

    @property
    def marker(self) -> Path:
        return self.root / self.MARKER

    def combination(self, k: int, slug: str) -> Path:
        """The run directory of combination k."""
        return self.root / f"{k:02d}-{slug}"

    def file(self, name: str) -> Path:
        """sweep.csv, sweep.md, sweep.json or sweep.png."""
        return self.root / name
