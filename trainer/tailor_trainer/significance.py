"""How sure is "better"? A paired bootstrap of the improvement of one model over another.

Both models are scored on the same rows (evaluate.measure's per-row values), so the rows are
resampled *together*: each of ``resamples`` draws picks n rows with replacement and computes the
metric for both models on that draw; the spread of the difference is the interval (percentile
method, two-sided). Pairing removes the row-to-row variance both models share (an easy row is
easy for both), which is what makes a 0.01 loss difference on 40 rows testable at all.

The statistic resampled is the metric exactly as it is reported, not a per-row average of it:

- ``loss``: the token-weighted mean (sum of token losses / label tokens), so a long row counts
  by its tokens, as in ``metrics.loss``; each row contributes (mean loss, tokens).
- ``perplexity``: exp of that loss on each draw.
- ``accuracy``: correct next tokens / label tokens (token-weighted, as reported).
- ``exactMatch``: the share of judged rows whose greedy generation matches (each row weighs 1).

``improvement`` is signed so that positive is better (champion - candidate for lower-is-better
metrics). Deterministic: a fixed seed and a row order fixed by row id give the same interval on
every machine. numpy only; 2,000 resamples of 10,000 rows take well under a second.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from tailor_trainer.config import Comparison, Metric

# Cap on resamples x rows held in memory at once (float64: ~32 MB per array).
_CHUNK_CELLS = 4_000_000


def row_values(per_row: list[dict[str, Any]], metric: Metric) -> dict[str, tuple[float, float]]:
    """Row id -> (value, weight) for ``metric`` from evaluate.measure's per-row records; rows
    without a value (no label tokens, not judged) are left out."""
    out: dict[str, tuple[float, float]] = {}
    for p in per_row:
        tokens = p.get("tokens") or 0
        if metric in (Metric.loss, Metric.perplexity):
            if p.get("loss") is not None and tokens:
                out[p["id"]] = (float(p["loss"]), float(tokens))
        elif metric is Metric.accuracy:
            if p.get("correct") is not None and tokens:
                out[p["id"]] = (float(p["correct"]) / tokens, float(tokens))
        elif p.get("exact") is not None:
            out[p["id"]] = (float(p["exact"]), 1.0)
    return out


def _aggregate(metric: Metric, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The reported metric from (draws of) per-row values: weighted means over the last axis."""
    mean = (values * weights).sum(axis=-1) / weights.sum(axis=-1)
    if metric is Metric.perplexity:
        return np.exp(np.minimum(mean, 700.0))
    return mean


def paired_bootstrap(candidate: np.ndarray, other: np.ndarray, weights: np.ndarray, *, metric: Metric,
                     higher_is_better: bool, confidence: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> dict[str, Any]:
    """The improvement of ``candidate`` over ``other`` (same rows, same order) and its interval.

    Returns improvement (on all rows), low, high, confidence, rows, resamples, seed; positive
    means the candidate is better in the metric's direction."""
    candidate, other, weights = (np.asarray(a, dtype=np.float64) for a in (candidate, other, weights))
    n = len(candidate)
    if n == 0 or len(other) != n or len(weights) != n:
        raise ValueError("paired bootstrap needs the same non-empty rows for both models")
    sign = 1.0 if higher_is_better else -1.0
    point = sign * float(_aggregate(metric, candidate, weights) - _aggregate(metric, other, weights))
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    step = max(1, _CHUNK_CELLS // n)
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        w = weights[idx]
        diffs[start:start + k] = sign * (_aggregate(metric, candidate[idx], w) - _aggregate(metric, other[idx], w))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
    return {"improvement": point, "low": float(low), "high": float(high), "confidence": confidence,
            "rows": n, "resamples": resamples, "seed": seed}


def compare(tuned: dict[str, Any], other: dict[str, Any], against: str,
            spec: Optional[Comparison] = None) -> Optional[dict[str, Any]]:
    """The tuned model's improvement over ``other`` (champion or base, as evaluate_model returned
    them) on the promotion metric, with its interval; None when they share no scored row."""
    spec = spec or Comparison()
    a = row_values(tuned.get("perRow") or [], spec.metric)
    b = row_values(other.get("perRow") or [], spec.metric)
    ids = sorted(set(a) & set(b))
    if not ids:
        return None
    # the weights are the candidate's tokens; both models see the same tokenized rows
    out = paired_bootstrap(np.array([a[i][0] for i in ids]), np.array([b[i][0] for i in ids]),
                           np.array([a[i][1] for i in ids]), metric=spec.metric, higher_is_better=spec.higher,
                           confidence=spec.confidence, resamples=spec.resamples, seed=spec.seed)
    if not all(math.isfinite(out[k]) for k in ("improvement", "low", "high")):
        return None
    return {"metric": spec.metric.value, "against": against, **out}


def describe(interval: dict[str, Any]) -> str:
    """``improvement 0.051, 95% interval [0.012, 0.093] on 120 rows``."""
    return (f"improvement {interval['improvement']:.4g}, {100 * interval['confidence']:g}% interval "
            f"[{interval['low']:.4g}, {interval['high']:.4g}] on {interval['rows']} rows")


__all__ = ["compare", "describe", "paired_bootstrap", "row_values"]
