"""Champion vs candidate: the promotion policy as a pure decision.

The candidate's metrics come from its result.json. The champion's are, in order of preference,
the champion re-evaluated by the candidate's run on the same held-out data (result.champion),
else the metrics recorded when it was promoted. A failed run never reaches this function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import ChampionStatus, Promotion, PromotionMode
from tailor_trainer.config import Metric


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str  # FirstChampion | Improved | NotBetter | MetricMissing
    message: str


def _direction(policy: Promotion) -> PromotionMode:
    if policy.mode is not None:
        return policy.mode
    return PromotionMode.max if policy.metric.higher_is_better else PromotionMode.min


def decide(policy: Promotion, candidate: dict[str, Any], champion: Optional[ChampionStatus],
           champion_rescored: Optional[dict[str, Any]] = None) -> Decision:
    """Promote when the candidate beats the champion by at least minImprovement (strictly better)."""
    metric = policy.metric.value
    value = candidate.get(metric)
    if value is None:
        return Decision(False, "MetricMissing", f"the run reported no {metric}; the champion stays")
    if champion is None:
        return Decision(True, "FirstChampion", f"first successful run ({metric} {value:.4g})")
    baseline = (champion_rescored or {}).get(metric)
    if baseline is None:
        baseline = champion.metrics.get(metric)
    if baseline is None:
        return Decision(True, "Improved", f"champion {champion.run} has no {metric}; {metric} {value:.4g}")
    mode = _direction(policy)
    improvement = (baseline - value) if mode is PromotionMode.min else (value - baseline)
    detail = (f"{metric} {value:.4g} vs champion {champion.run} {baseline:.4g} "
              f"({'lower' if mode is PromotionMode.min else 'higher'} is better, "
              f"minImprovement {policy.min_improvement:g})")
    if improvement > 0 and improvement >= policy.min_improvement:
        return Decision(True, "Improved", detail)
    return Decision(False, "NotBetter", detail)


__all__ = ["Decision", "Metric", "decide"]
