"""The run directory: every artifact path of a run, atomic saves, loads, and stage guards.

    config.yaml overrides.txt meta.json
    train/        fingerprint.json metrics.json checkpoints.pt final.pt outputs_{loss,margin}.npy
    attribute/<method>/  settings.json  test_<id>.npy  scores.npy  scores.json
    ground_truth/drop_<p>/  masks.npy  subset_<k>.npz  outputs_{loss,margin}.npy
    report/       lds.csv summary.json report.md lds_vs_drop.png scatter_<method>_<p>.png

Every write goes to a temporary file in the same folder and is moved into place with
os.replace, so a killed command never leaves a torn file and a rerun resumes.
Tensors are loaded with weights_only=True only; nothing is pickled.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path


class StageError(RuntimeError):
    """A stage cannot run on this run directory (missing or mismatched earlier stage)."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_bytes(path, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def save_text(path, text: str) -> Path:
    return save_bytes(path, text.encode())


def save_json(path, obj) -> Path:
    return save_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def load_json(path):
    return json.loads(Path(path).read_text())


def save_npy(path, array) -> Path:
    import numpy as np

    return _atomic_write(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def load_npy(path, mmap: bool = False):
    import numpy as np

    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def save_npz(path, **arrays) -> Path:
    import numpy as np

    return _atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path) -> dict:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_tensors(path, tensors: dict) -> Path:
    """A flat dict of str -> Tensor, saved with torch.save (loadable with weights_only=True)."""
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
    return save_bytes(path, buf.getvalue())


def load_tensors(path, mmap: bool = False) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


class RunDir:
    """Paths of one run's artifacts; file names live here and nowhere else."""

    def __init__(self, root):
        self.root = Path(root)

    # top level
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
        return self.train_dir / "fingerprint.json"

    @property
    def metrics_json(self) -> Path:
        return self.train_dir / "metrics.json"

    @property
    def checkpoints(self) -> Path:
        return self.train_dir / "checkpoints.pt"

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
        return self.attribute_dir(method) / "scores.json"

    def methods_present(self) -> list[str]:
        base = self.root / "attribute"
        return sorted(p.name for p in base.iterdir() if (p / "scores.json").is_file()) if base.is_dir() else []

    # ground_truth/drop_<p>/
    def ground_truth_dir(self, p: float) -> Path:
        return self.root / "ground_truth" / f"drop_{p:g}"

    def masks(self, p: float) -> Path:
        return self.ground_truth_dir(p) / "masks.npy"

    def subset(self, p: float, k: int) -> Path:
        return self.ground_truth_dir(p) / f"subset_{k:05d}.npz"

    def ground_truth_outputs(self, p: float, output: str) -> Path:
        return self.ground_truth_dir(p) / f"outputs_{output}.npy"

    # report/
    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    # guards
    def require_trained(self, config) -> dict:
        """Check that `train` ran here with the same training config; return its fingerprint record."""
        if not self.fingerprint_json.is_file() or not self.final_state.is_file():
            raise StageError(f"no finished training run in {self.root}: run `magic train` with the "
                             "same overrides first")
        from magic_cli.config import diff_keys

        record = load_json(self.fingerprint_json)
        if record["fingerprint"] != config.fingerprint():
            diffs = diff_keys(record["slice"], config.training_slice())
            raise StageError(f"the run in {self.root} was trained with a different config "
                             f"({'; '.join(diffs)}); use the training overrides or another out_dir")
        return record
