"""Pure decisions: (object, observed, settings, now) -> plan. No Kubernetes client, no kopf."""

from tailor_operator.reconcile.dataset import DatasetObserved, reconcile_dataset, validation_key
from tailor_operator.reconcile.finetunejob import JobObserved, reconcile_finetunejob
from tailor_operator.reconcile.observe import RunObservation, RunState, ValidationObservation
from tailor_operator.reconcile.plan import DatasetPlan, Event, JobPlan
from tailor_operator.reconcile.settings import OperatorSettings

__all__ = [
    "DatasetObserved",
    "DatasetPlan",
    "Event",
    "JobObserved",
    "JobPlan",
    "OperatorSettings",
    "RunObservation",
    "RunState",
    "ValidationObservation",
    "reconcile_dataset",
    "reconcile_finetunejob",
    "validation_key",
]
