"""Groups of training examples (a data source, a class, a column's values): the exact derivative
with respect to a group's weight, and ground-truth masks that drop whole groups.

Scaling the weights of group g's members by (1 + e_g), w_i = w0_i (1 + e_g), gives

    d f_j / d e_g = sum_{i in g} w0_i * scores[i, j]        (group_scores)

and dropping group g (e_g = -1) is predicted to change f_j by minus that sum: the same formula
as for single examples (metrics.predicted_change), so a group's LDS is computed from the
example-level scores and masks that drop every member of the chosen groups.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

NONE = -1  # the group index of a training example that belongs to no group


@dataclass(frozen=True)
class Groups:
    """A partition of (some of) the N training examples into named groups.

    names: the group names, sorted; index: int64 (N,), the position in `names` of each training
    example's group, or NONE (never dropped as part of a group, not in any group score)."""

    names: tuple[str, ...]
    index: np.ndarray
    source: str  # how they were given: "label", a column name, or a file

    def __post_init__(self):
        if self.index.ndim != 1 or self.index.dtype != np.int64:
            raise ValueError("Groups.index must be int64 (N,)")
        if len(self.index) and (self.index.max() >= len(self.names) or self.index.min() < NONE):
            raise ValueError("Groups.index points outside the names")

    @classmethod
    def of(cls, values, source: str) -> "Groups":
        """From one group name per training example (None: in no group)."""
        names = tuple(sorted({str(v) for v in values if v is not None}))
        position = {n: g for g, n in enumerate(names)}
        index = np.array([NONE if v is None else position[str(v)] for v in values], dtype=np.int64)
        return cls(names, index, source)

    @property
    def n_groups(self) -> int:
        return len(self.names)

    def members(self, g: int) -> np.ndarray:
        return np.flatnonzero(self.index == g)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.index[self.index != NONE], minlength=self.n_groups)

    def digest(self) -> str:
        """What the assignment is, for the identity of artifacts that depend on it."""
        h = hashlib.sha256("\0".join(self.names).encode())
        h.update(self.index.tobytes())
        return h.hexdigest()[:16]


def group_scores(scores: np.ndarray, groups: Groups, weights: np.ndarray | None = None) -> np.ndarray:
    """(G, J): d f_j / d e_g = sum over g's members of w0_i * scores[i, j] (weights w0; None = ones)."""
    s = np.asarray(scores, dtype=np.float64)
    if weights is not None:
        s = s * np.asarray(weights, dtype=np.float64)[:, None]
    out = np.zeros((groups.n_groups, s.shape[1]))
    inside = groups.index != NONE
    np.add.at(out, groups.index[inside], s[inside])
    return out


def group_mask(groups: Groups, dropped_groups) -> np.ndarray:
    """bool (N,): False for every member of the dropped groups."""
    return ~np.isin(groups.index, np.asarray(dropped_groups, dtype=np.int64))


def draw_group_mask(groups: Groups, p: float, rng: np.random.Generator) -> np.ndarray:
    """A ground-truth mask that drops round(p * G) of the G groups, drawn with rng."""
    chosen = rng.choice(groups.n_groups, size=int(round(p * groups.n_groups)), replace=False)
    return group_mask(groups, chosen)
