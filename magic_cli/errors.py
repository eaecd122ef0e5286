"""The errors a user can act on. The CLI prints each as one line and exits with code 2;
anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a setting, an input file, a run directory): one line, exit 2."""


class ConfigError(UserError, ValueError):
    """A config problem; the message is one line that names the key to fix."""


class StageError(UserError, RuntimeError):
    """A stage cannot run on this run directory (missing or mismatched earlier stage, a lock)."""


class ArtifactError(StageError):
    """A stored artifact is missing, damaged (its digest does not match) or of another run.

    `reason` is one of "missing", "incomplete" (no sidecar), "damaged", "stale"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class NonDeterminismError(UserError, RuntimeError):
    """A recomputed training state or artifact differs from the one `train` stored."""


class NonFiniteError(UserError, RuntimeError):
    """Training or its reverse pass produced NaN/Inf (or diverged): the numbers would mean nothing."""
