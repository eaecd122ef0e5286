"""Training and test examples shown as the data they are, for `magic explain`.

The kind of a dataset's inputs picks the picture (a dataset may name its own, RENDERERS):

    images    (C, H, W)      thumbnails, contrast-stretched per image
    digits    64 features    8 x 8 thumbnails (scikit-learn's handwritten digits)
    tokens    (L,) ids       the decoded text (characters, or a tokenizer's decode), else the ids
    features  (F,)           a row of numbers with the column names

A gallery is one PNG per test id: the test example first, then the top-k proponents and the
top-k opponents in two rows, each labelled with its training id, label and score. Text and
features have no thumbnail: they are drawn as labelled lines of text in the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from magic_cli.plots import figure_bytes, pyplot

SNIPPET = 60  # characters of a text example shown in a gallery


@dataclass(frozen=True)
class Shown:
    """One example in a gallery."""

    title: str  # e.g. "train 412 · label 3 · +0.021"
    image: np.ndarray | None  # (H, W) or (H, W, 3) in [0, 1], or None for text
    text: str  # the decoded text, or the feature row, or "" for images


def kind_of(x: np.ndarray, dataset_name: str) -> str:
    """'images', 'digits', 'tokens' or 'features' for one split's inputs x (N, ...)."""
    if x.dtype.kind in "iu":
        return "tokens"
    if x.ndim == 4:
        return "images"
    if dataset_name == "digits" and x.shape[1:] == (64,):
        return "digits"
    return "features"


def _stretch(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    low, high = float(a.min()), float(a.max())
    return (a - low) / (high - low) if high > low else np.zeros_like(a)


def image_of(x: np.ndarray, kind: str) -> np.ndarray | None:
    """An example as an image in [0, 1]: (H, W) gray or (H, W, 3), or None."""
    if kind == "images":
        a = np.moveaxis(x, 0, -1)
        return _stretch(a[..., 0] if a.shape[-1] == 1 else a[..., :3])
    if kind == "digits":  # ink is dark on white paper, as the digits were written
        return 1.0 - _stretch(x.reshape(8, 8))
    return None


def text_of(x: np.ndarray, kind: str, decode: Callable | None, columns: list[str] | None = None) -> str:
    """An example as text: decoded tokens, or the feature row with its column names."""
    if kind == "tokens":
        ids = [int(i) for i in x]
        return decode(ids) if decode is not None else " ".join(map(str, ids))
    if kind == "features":  # inputs of another shape are shown flat: the first values, numbered
        flat = np.ravel(x)
        names = columns if columns is not None and len(columns) == flat.size else [f"x{i}" for i in range(flat.size)]
        shown = ", ".join(f"{n}={float(v):.3g}" for n, v in zip(names[:16], flat[:16]))
        return shown + (", ..." if flat.size > 16 else "")
    return ""


def snippet(text: str, width: int = SNIPPET) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def gallery_png(test: Shown, proponents: list[Shown], opponents: list[Shown], heading: str) -> bytes:
    """The gallery of one test id as PNG bytes: the test example, then two rows."""
    plt = pyplot()
    k = max(len(proponents), len(opponents), 1)
    if all(s.image is not None for s in (test, *proponents, *opponents)):
        fig, axes = plt.subplots(3, k + 1, figsize=(1.45 * (k + 1), 5.0), squeeze=False, layout="constrained")
        for ax in axes.flat:
            ax.axis("off")
        rows = [("test", [test]), ("proponents", proponents), ("opponents", opponents)]
        for r, (name, shown) in enumerate(rows):
            axes[r, 0].text(0.5, 0.5, name, ha="center", va="center", fontsize=9, weight="bold")
            for c, s in enumerate(shown, start=1):
                axes[r, c].imshow(s.image, cmap="gray" if s.image.ndim == 2 else None, vmin=0, vmax=1,
                                  interpolation="nearest")
                axes[r, c].set_title(s.title.replace(" · ", "\n"), fontsize=6.5)
        fig.suptitle(heading, fontsize=9)
        return figure_bytes(fig)
    lines = [(heading, "bold"), ("", None), (f"test: {snippet(test.text, 90)}", None), (test.title, "italic"),
             ("", None), ("proponents (dropping them raises the test loss the most)", "bold")]
    lines += [(f"{s.title}:  {snippet(s.text)}", None) for s in proponents]
    lines += [("", None), ("opponents (dropping them lowers the test loss the most)", "bold")]
    lines += [(f"{s.title}:  {snippet(s.text)}", None) for s in opponents]
    fig = plt.figure(figsize=(9.5, 0.24 * len(lines) + 0.4))
    for i, (line, style) in enumerate(lines):
        fig.text(0.01, 1 - (i + 1) / (len(lines) + 1), line, fontsize=8, family="monospace",
                 weight="bold" if style == "bold" else "normal", style="italic" if style == "italic" else "normal")
    return figure_bytes(fig)
