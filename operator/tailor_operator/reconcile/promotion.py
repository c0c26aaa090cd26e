"""Champion vs candidate: the promotion policy as a pure decision.

The candidate's metrics come from its result.json. The champion's are, in order of preference,
the champion re-evaluated by the candidate's run on the same rows (result.champion: the run's
held-out split, or the fixed evaluation set spec.evaluation.datasetRef), else the metrics recorded
when it was promoted. The run also reports its improvement over that champion with a
paired-bootstrap interval (result.comparison, tailor_trainer.significance); with
`promotion.confidence` set, only an interval whose lower bound clears minImprovement promotes.
While `promotion.pinnedRun` is set nothing is promoted (reconcile/pinning.py holds the champion).
A failed run never reaches this function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import (
    ChampionStatus,
    EvaluatedOn,
    HistoryEntry,
    ImprovementInterval,
    Promotion,
    PromotionMode,
)
from tailor_trainer.config import Metric
from tailor_trainer.contract import Interval, RunResult

PINNED_FIELD = "spec.continuousLearning.promotion.pinnedRun"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str  # FirstChampion | Improved | NotBetter | NotSignificant | MetricMissing | Pinned
    message: str


def _direction(policy: Promotion) -> PromotionMode:
    if policy.mode is not None:
        return policy.mode
    return PromotionMode.max if policy.metric.higher_is_better else PromotionMode.min


def _interval_text(iv: Interval) -> str:
    return (f"improvement {iv.improvement:.4g}, {100 * (iv.confidence or 0):g}% interval "
            f"[{iv.low:.4g}, {iv.high:.4g}] on {iv.rows} rows")


def decide(policy: Promotion, candidate: dict[str, Any], champion: Optional[ChampionStatus],
           champion_rescored: Optional[dict[str, Any]] = None, interval: Optional[Interval] = None,
           evaluated_on: str = "") -> Decision:
    """Promote when the candidate beats the champion by at least minImprovement (strictly better);
    with `confidence`, when the interval's lower bound does. `interval`: the run's improvement over
    this champion on the promotion metric (None when it has none); `evaluated_on`: where, for the
    message."""
    metric = policy.metric.value
    value = candidate.get(metric)
    where = f" on {evaluated_on}" if evaluated_on else ""
    if value is None:
        return Decision(False, "MetricMissing", f"the run reported no {metric}; the champion stays")
    if champion is None:
        return Decision(True, "FirstChampion", f"first successful run ({metric} {value:.4g}{where})")
    baseline = (champion_rescored or {}).get(metric)
    if baseline is None:
        baseline = champion.metrics.get(metric)
    if baseline is None:
        return Decision(True, "Improved", f"champion {champion.run} has no {metric}; {metric} {value:.4g}")
    mode = _direction(policy)
    improvement = (baseline - value) if mode is PromotionMode.min else (value - baseline)
    usable = interval is not None and None not in (interval.low, interval.high, interval.improvement) \
        and interval.against == champion.run and interval.metric == metric
    detail = (f"{metric} {value:.4g} vs champion {champion.run} {baseline:.4g}{where} "
              f"({'lower' if mode is PromotionMode.min else 'higher'} is better, "
              f"minImprovement {policy.min_improvement:g}")
    if usable:
        assert interval is not None
        detail += f"; {_interval_text(interval)}"
    if policy.confidence is not None:
        detail += f"; confidence {policy.confidence:g} required"
    detail += ")"
    better = improvement > 0 and improvement >= policy.min_improvement
    if not better:
        return Decision(False, "NotBetter", detail)
    if policy.confidence is None:
        return Decision(True, "Improved", detail)
    if not usable:
        return Decision(False, "NotSignificant", detail + f"; the run has no interval against champion "
                                                          f"{champion.run} on {metric}: not promoted")
    assert interval is not None and interval.low is not None and interval.confidence is not None
    if interval.confidence + 1e-9 < policy.confidence:
        return Decision(False, "NotSignificant", detail + f"; its interval is at confidence "
                                                          f"{interval.confidence:g}: not promoted")
    if interval.low > 0 and interval.low >= policy.min_improvement:
        return Decision(True, "Improved", detail)
    return Decision(False, "NotSignificant", detail + "; the interval's lower bound does not clear "
                                                      "minImprovement: the difference may be noise")


def where_evaluated(result: Optional[RunResult]) -> str:
    """`evaluation Dataset support-eval@r3 (120 rows)` / `test split (40 rows)` / ''."""
    on = result.evaluated_on if result is not None else None
    if on is None:
        return ""
    rows = f" ({on.rows} rows)" if on.rows is not None else ""
    if on.dataset:
        return f"evaluation Dataset {on.dataset}@{on.revision or '?'}{rows}"
    return f"{on.split or 'held-out'} split{rows}"


def decide_run(policy: Promotion, metrics: dict[str, float], champion: Optional[ChampionStatus],
               result: Optional[RunResult]) -> Decision:
    """The decision for a succeeded run from its result.json; nothing promotes while pinned."""
    rescored = None
    if result is not None and result.champion is not None and champion is not None \
            and result.champion.run == champion.run:  # re-scored the model that is still the champion
        rescored = result.champion.metrics or None
    decision = decide(policy, metrics, champion, rescored, result.comparison if result is not None else None,
                      where_evaluated(result))
    if policy.pinned_run is None:
        return decision
    verdict = "would have been promoted" if decision.promote else f"not better ({decision.reason})"
    return Decision(False, "Pinned", f"{PINNED_FIELD} is {policy.pinned_run}: nothing is promoted while it is "
                                     f"set; this run {verdict}: {decision.message}")


def record_evaluation(entry: HistoryEntry, result: Optional[RunResult], model: Optional[str]) -> None:
    """What the history entry keeps of the run's evaluation: the model, the rows, the interval."""
    if model and not entry.model:
        entry.model = model
    if result is None:
        return
    on = result.evaluated_on
    if on is not None:
        entry.evaluated_on = EvaluatedOn(dataset=on.dataset, revision=on.revision, split=on.split, rows=on.rows)
    iv = result.comparison
    if iv is not None and None not in (iv.metric, iv.against, iv.improvement, iv.low, iv.high, iv.confidence,
                                       iv.rows):
        entry.interval = ImprovementInterval(metric=iv.metric, against=iv.against, improvement=iv.improvement,
                                             low=iv.low, high=iv.high, confidence=iv.confidence, rows=iv.rows)


__all__ = ["Decision", "Metric", "PINNED_FIELD", "decide", "decide_run", "record_evaluation", "where_evaluated"]
