"""Figures as PNG bytes: matplotlib on its non-interactive backend, written without a timestamp
(the same figure gives the same bytes). The stages draw with pyplot() and save figure_bytes(fig)
through run_dir."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    return plt


def figure_bytes(fig) -> bytes:
    """The figure as PNG bytes (no software/date metadata), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
