"""meta.json: what produced a run (versions, device, determinism switches, git sha)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_meta(config, determinism: dict) -> dict:
    import numpy
    import torch

    import magic_cli

    return {
        "magic_version": magic_cli.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": config.device,
        "cuda_device": torch.cuda.get_device_name() if config.device == "cuda" else None,
        "determinism": determinism,
        "git_sha": git_sha(),
        "fingerprint": config.fingerprint(),
        **_optional_versions(),
    }


def _optional_versions() -> dict:
    """Versions of the optional libraries a run used (transformers' kernels shape the numbers)."""
    import sys

    return {name: sys.modules[name].__version__ for name in ("transformers", "peft") if name in sys.modules}
