"""LDS and friends as pure array functions (scipy for the statistics).

For test example j and masks k = 1..m (True = kept), with the run's data weights w0
(train.data_weights; ones by default) and retraining k trained on w0 * mask_k:
    predicted_k = tau_j^T (w0 * mask_k - w0) = - sum_{i dropped by k} w0_i * scores[i, j]
    actual_k    = f_j(w0 * mask_k) - f_j(w0)                  (retraining minus the full run)
LDS_j = Spearman(predicted, actual); also Pearson and the slope of actual on predicted (1 when
the predictions are on the right scale). LDS = mean over test examples, with a bootstrap CI.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def predicted_change(scores: np.ndarray, masks: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(m, J): minus the weighted sum of the dropped examples' scores.

    scores (N, J) = d f_j / d w_i at w0, masks bool (m, N), weights w0 (N,) (None = ones)."""
    dropped = (~masks).astype(np.float64)
    if weights is not None:
        dropped = dropped * np.asarray(weights, dtype=np.float64)[None, :]
    return -(dropped @ scores.astype(np.float64))


def per_test_correlations(predicted: np.ndarray, actual: np.ndarray) -> dict[str, np.ndarray]:
    """Spearman, Pearson and slope (actual on predicted) per column of (m, J) arrays."""

    out = {"spearman": [], "pearson": [], "slope": []}
    for j in range(predicted.shape[1]):
        x, y = predicted[:, j], actual[:, j]
        if np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant series has no correlation
            out["spearman"].append(np.nan)
            out["pearson"].append(np.nan)
            out["slope"].append(np.nan)
            continue
        out["spearman"].append(stats.spearmanr(x, y).statistic)
        out["pearson"].append(stats.pearsonr(x, y).statistic)
        out["slope"].append(stats.linregress(x, y).slope)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def mean_with_ci(values: np.ndarray, seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and a percentile-bootstrap CI over the finite values (scipy.stats.bootstrap)."""

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(values) == 1 or np.ptp(values) == 0:
        return float(values.mean()), float(values.mean()), float(values.mean())
    res = stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=2000,
                          method="percentile", rng=np.random.default_rng(seed))
    return float(values.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def most_helpful_first(scores, output: str):
    """Training ids ordered from the strongest proponent to the strongest opponent of one test
    output: scores (N,) = d f_j / d w. For the loss a proponent has the most negative score
    (dropping it raises the loss the most); for the margin the most positive."""
    helpful = -1.0 if output == "loss" else 1.0
    return np.argsort(-helpful * np.asarray(scores), kind="stable")


COST_IDS = (1, 16, 64, 256)  # test ids at which lds_vs_cost.png compares the methods


def cost_of(cost: dict, n_ids: int) -> float:
    """Seconds to attribute n_ids test ids, extrapolated from a method's split {fixed, per_id, batch}.
    A baseline (batch None) takes any number of ids in one pass: its fixed part once. MAGIC runs
    ceil(n / batch) reverse passes of `batch` ids each (a pass of fewer ids costs no more), so
    this is an upper bound below a multiple of its batch."""
    batch = cost.get("batch")
    if not batch:
        return cost["fixed"] + n_ids * cost["per_id"]
    passes = -(-n_ids // batch)
    return passes * (cost["fixed"] + batch * cost["per_id"])


def crossover(magic: dict, other: dict, limit: int = 1_000_000) -> int | None:
    """The fewest test ids at which MAGIC costs more than `other` (None: not up to `limit`)."""
    n = 1
    while n <= limit:
        if cost_of(magic, n) > cost_of(other, n):
            return n
        n += 1 if n < 4096 else n // 64
    return None
