"""metav1.Condition bookkeeping: lastTransitionTime moves only when status flips."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from tailor_operator.api.v1alpha1 import Condition, ConditionStatus

TRUE, FALSE, UNKNOWN = ConditionStatus.true, ConditionStatus.false, ConditionStatus.unknown


def get_condition(conditions: list[Condition], type_: str) -> Optional[Condition]:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return cond is not None and cond.status is TRUE


def set_condition(conditions: list[Condition], type_: str, status: ConditionStatus, reason: str,
                  message: str, now: datetime, generation: Optional[int] = None) -> list[Condition]:
    """A new list with `type_` set; the transition time changes only if the status changed."""
    old = get_condition(conditions, type_)
    transition = now if old is None or old.status is not status else old.last_transition_time
    new = Condition(type=type_, status=status, reason=reason, message=message[:4096],
                    last_transition_time=transition, observed_generation=generation)
    out = [c for c in conditions if c.type != type_]
    out.append(new)
    return sorted(out, key=lambda c: _ORDER.get(c.type, 99))


def remove_condition(conditions: list[Condition], type_: str) -> list[Condition]:
    return [c for c in conditions if c.type != type_]


_ORDER = {t: i for i, t in enumerate(
    ["Ready", "Reconciling", "Stalled", "Validating", "DataValidated", "ModelChecked", "Running", "Retrying", "Evaluated", "Promoted", "Pinned", "Registered", "Failed",
     "Suspended"])}
