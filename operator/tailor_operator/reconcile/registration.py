"""Pure: what status says about a job's model registry (MLflow) registration.

The operator registers runs and moves the `champion` alias after writing status (the I/O is in
``tailor_operator.registry``); what it found last time comes back here as `RegistryObserved`
and becomes the `Registered` condition. A registry that cannot be reached never fails a job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from tailor_operator.api.v1alpha1 import FineTuneJob, FineTuneJobStatus, Phase
from tailor_operator.reconcile.conditions import FALSE, TRUE, UNKNOWN, remove_condition, set_condition

CONDITION = "Registered"


@dataclass(frozen=True)
class RegistryObserved:
    """The outcome of the last registry sync of one job."""

    ok: bool
    reason: str
    """Registered, or why not: RegistryUnavailable (not reached: retried with backoff),
    RegistryRejected (it answered with an error)."""
    message: str


def registry_condition(job: FineTuneJob, st: FineTuneJobStatus, observed: Optional[RegistryObserved],
                       configured: bool, now: datetime) -> None:
    """Set (or remove) the Registered condition."""
    if job.spec.registry is None:
        st.conditions = remove_condition(st.conditions, CONDITION)
        return
    if not configured:
        st.conditions = set_condition(st.conditions, CONDITION, FALSE, "RegistryNotConfigured",
                                      "spec.registry is set but this installation has no model registry "
                                      "(Helm value registry.trackingUri)", now)
        return
    if observed is None:
        if any(h.phase is Phase.succeeded for h in st.history):
            st.conditions = set_condition(st.conditions, CONDITION, UNKNOWN, "Pending",
                                          "not registered yet", now)
        return
    st.conditions = set_condition(st.conditions, CONDITION, TRUE if observed.ok else FALSE, observed.reason,
                                  observed.message, now)
