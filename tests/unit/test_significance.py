"""The paired bootstrap (tailor_trainer.significance): an interval that excludes 0 for a real
difference and includes it for noise, deterministic, and resampling the metric as it is reported
(token-weighted). Pure numpy; no model."""

from __future__ import annotations

import numpy as np
import pytest

from tailor_trainer.config import Comparison, Metric
from tailor_trainer.significance import compare, paired_bootstrap, row_values


def _rows(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    difficulty = rng.gamma(2.0, 0.6, n)  # rows differ a lot in how hard they are, for both models
    tokens = rng.integers(5, 60, n).astype(float)
    return difficulty, tokens


def test_a_real_difference_gives_an_interval_above_zero() -> None:
    hard, tokens = _rows(200)
    rng = np.random.default_rng(2)
    champion = hard + rng.normal(0, 0.05, 200)
    candidate = hard - 0.08 + rng.normal(0, 0.05, 200)  # 0.08 lower loss on every row, give or take
    out = paired_bootstrap(candidate, champion, tokens, metric=Metric.loss, higher_is_better=False)
    assert out["low"] > 0 and out["high"] > out["low"]
    assert out["low"] < out["improvement"] < out["high"]
    assert out["improvement"] == pytest.approx(0.08, abs=0.02)
    assert out["rows"] == 200 and out["resamples"] == 2000 and out["confidence"] == 0.95


def test_pure_noise_gives_an_interval_around_zero() -> None:
    hard, tokens = _rows(200)
    rng = np.random.default_rng(3)
    a, b = hard + rng.normal(0, 0.1, 200), hard + rng.normal(0, 0.1, 200)  # same model quality
    out = paired_bootstrap(a, b, tokens, metric=Metric.loss, higher_is_better=False)
    assert out["low"] < 0 < out["high"]


def test_a_small_real_difference_is_noise_on_few_rows_and_clear_on_many() -> None:
    """What the issue asks about: 0.01 on 40 rows is noise; the same shift on 4,000 rows is not."""
    def interval(n: int) -> dict:
        hard, tokens = _rows(n, seed=4)
        rng = np.random.default_rng(5)
        champion = hard + rng.normal(0, 0.1, n)
        return paired_bootstrap(champion - 0.01 + rng.normal(0, 0.1, n), champion, tokens, metric=Metric.loss,
                                higher_is_better=False)

    few, many = interval(40), interval(4000)
    assert few["low"] < 0 < few["high"]
    assert many["low"] > 0


def test_deterministic_and_direction_aware() -> None:
    hard, tokens = _rows(150)
    better = hard - 0.1
    first = paired_bootstrap(better, hard, tokens, metric=Metric.loss, higher_is_better=False, seed=7)
    assert first == paired_bootstrap(better, hard, tokens, metric=Metric.loss, higher_is_better=False, seed=7)
    assert first != paired_bootstrap(better, hard, tokens, metric=Metric.loss, higher_is_better=False, seed=8)
    # the same numbers read as a higher-is-better metric: a regression, mirrored
    flipped = paired_bootstrap(better, hard, tokens, metric=Metric.loss, higher_is_better=True, seed=7)
    assert flipped["improvement"] == pytest.approx(-first["improvement"])
    assert flipped["low"] == pytest.approx(-first["high"]) and flipped["high"] == pytest.approx(-first["low"])


def test_the_statistic_is_the_reported_token_weighted_metric() -> None:
    """One long row the candidate gets badly wrong outweighs many short rows it gets slightly
    right, as it does in metrics.loss (sum of token losses / tokens)."""
    per_row_cand = [{"id": f"r{i}", "loss": 1.0, "tokens": 2, "correct": 1} for i in range(20)]
    per_row_cand.append({"id": "long", "loss": 3.0, "tokens": 400, "correct": 100})
    per_row_champ = [{"id": f"r{i}", "loss": 1.2, "tokens": 2, "correct": 0} for i in range(20)]
    per_row_champ.append({"id": "long", "loss": 2.0, "tokens": 400, "correct": 300})
    loss = compare({"perRow": per_row_cand}, {"perRow": per_row_champ}, "ftj-r1", Comparison(metric=Metric.loss))
    cand = (20 * 2 * 1.0 + 400 * 3.0) / 440
    champ = (20 * 2 * 1.2 + 400 * 2.0) / 440
    assert loss["improvement"] == pytest.approx(champ - cand)  # negative: worse as reported
    assert loss["against"] == "ftj-r1" and loss["metric"] == "loss" and loss["rows"] == 21
    acc = compare({"perRow": per_row_cand}, {"perRow": per_row_champ}, "base", Comparison(metric=Metric.accuracy))
    assert acc["improvement"] == pytest.approx((120 - 300) / 440)  # correct tokens / tokens
    ppl = compare({"perRow": per_row_cand}, {"perRow": per_row_champ}, "base", Comparison(metric=Metric.perplexity))
    assert ppl["improvement"] == pytest.approx(np.exp(champ) - np.exp(cand))


def test_only_rows_both_models_scored_are_paired() -> None:
    cand = [{"id": "a", "loss": 1.0, "tokens": 3}, {"id": "b", "loss": None, "tokens": 0},
            {"id": "c", "loss": 2.0, "tokens": 3, "exact": 1}]
    assert set(row_values(cand, Metric.loss)) == {"a", "c"}
    assert row_values(cand, Metric.exact_match) == {"c": (1.0, 1.0)}
    assert compare({"perRow": cand}, {"perRow": [{"id": "z", "loss": 1.0, "tokens": 3}]}, "base") is None
