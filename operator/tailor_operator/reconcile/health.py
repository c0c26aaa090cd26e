"""Health as GitOps tools read it: the kstatus conditions Ready, Reconciling and Stalled.

Argo CD, Flux and `kubectl wait --for=condition=Ready` do not know Tailor's phases; they read the
convention of sigs.k8s.io/cli-utils' kstatus (what Flux's health checks use):

- `status.observedGeneration` equal to `metadata.generation` means the status describes the
  current spec; lower means the operator has not acted on the latest spec yet (InProgress);
- `Ready` is the "normal-true" summary: True when the object is what its spec asks for;
- `Reconciling` ("abnormal-true") is present and True only while the operator is working toward
  the spec (a run or validation in flight, an attempt waiting to be retried, a canary rollout);
- `Stalled` ("abnormal-true") is present and True only when nothing will change without a user
  (a failed job, a Dataset that failed validation or is refused, a job blocked on something
  missing such as its Dataset, a `promotion.pinnedRun` that names no usable run).

Both abnormal-true conditions are removed, not set False, when they do not apply (as Flux does).
These three are computed last, from the rest of the status, at the object's current generation;
every other condition without a generation of its own is stamped with `status.runGeneration`
(the spec generation the current run started from; before any run, the current one), so no
condition lacks one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from tailor_operator.api.v1alpha1 import Condition, DatasetStatus, FineTuneJobStatus, Phase, RolloutPhase
from tailor_operator.reconcile.conditions import FALSE, TRUE, get_condition, is_true, remove_condition, set_condition

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"
# status.error reasons of a Pending job that waits for something expected to happen by itself
# (reconcile/evalset.py: the evaluation Dataset's first validation): Reconciling, not Stalled
WAITING = frozenset({"EvalDatasetValidating"})


def job_health(st: FineTuneJobStatus, generation: Optional[int], now: datetime) -> None:
    """Set Ready / Reconciling / Stalled on a FineTuneJob status (in place)."""
    # conditions about the run are for the spec it started from; before any run, for this one
    conditions = _stamp_generation(st.conditions, st.run_generation if st.run_generation is not None else generation)
    ready: tuple[bool, str, str]
    reconciling: Optional[tuple[str, str]] = None
    stalled: Optional[tuple[str, str]] = None
    run = st.current_run or "the job"
    error_reason = st.error.reason if st.error is not None else None
    error_message = st.error.message if st.error is not None else ""
    rolling_out = st.rollout is not None and st.rollout.phase is RolloutPhase.progressing
    if st.phase is Phase.succeeded and rolling_out:
        assert st.rollout is not None
        # the run is done, but its model is still a canary in the InferenceService (reconcile/rollout.py)
        message = (f"run {run} succeeded; canary {st.rollout.run} at {st.rollout.canary_traffic_percent}% "
                   "of the InferenceService's traffic")
        ready = (False, "RollingOut", message)
        reconciling = ("RollingOut", message)
    elif st.phase is Phase.succeeded:
        champion = f"; champion {st.champion.run}" if st.champion is not None else ""
        ready = (True, "Succeeded", f"run {run} succeeded{champion}")
    elif st.phase is Phase.failed:
        reason = error_reason or "Failed"
        ready = (False, reason, error_message or f"run {run} failed")
        stalled = (reason, error_message or f"run {run} failed; change the spec to start a new run")
    elif st.phase is Phase.suspended:
        ready = (False, "Suspended", "spec.suspend is true")
    else:
        retrying = is_true(st.conditions, "Retrying")
        if st.phase is Phase.pending and st.error is not None and not retrying and st.error.reason not in WAITING:
            # waiting for something outside the operator: a Dataset, a Secret, a permission
            reason = error_reason or "Blocked"
            ready = (False, reason, error_message)
            stalled = (reason, error_message)
        else:
            reason = "Retrying" if retrying else st.phase.value
            ready = (False, reason, _in_flight(st))
            reconciling = (reason, _in_flight(st))
    pin = get_condition(conditions, "Pinned")
    if stalled is None and pin is not None and pin.status is FALSE and pin.reason == "PinnedRunNotFound":
        # promotion.pinnedRun names no run it can move to: nothing moves until the spec changes
        ready = (False, pin.reason, pin.message)
        stalled, reconciling = (pin.reason, pin.message), None
    conditions = set_condition(conditions, READY, TRUE if ready[0] else FALSE, ready[1], ready[2], now, generation)
    conditions = _abnormal(conditions, RECONCILING, reconciling, now, generation)
    st.conditions = _abnormal(conditions, STALLED, stalled, now, generation)


def dataset_health(st: DatasetStatus, generation: Optional[int], now: datetime) -> None:
    """Set Reconciling / Stalled on a Dataset status (in place); Ready is the Dataset's own."""
    conditions = _stamp_generation(st.conditions, st.observed_generation)
    validating = get_condition(conditions, "Validating")
    ready = get_condition(conditions, READY)
    reconciling = stalled = None
    if validating is not None and validating.status is TRUE:
        reconciling = (validating.reason or "Validating", validating.message)
    elif ready is not None and ready.status is FALSE:
        stalled = (ready.reason or "NotReady", ready.message)
    conditions = _abnormal(conditions, RECONCILING, reconciling, now, generation)
    st.conditions = _abnormal(conditions, STALLED, stalled, now, generation)


def _in_flight(st: FineTuneJobStatus) -> str:
    run = st.current_run or "the first run"
    parts = [f"run {run}"]
    if st.phase is Phase.pending and is_true(st.conditions, "Retrying"):
        retrying = get_condition(st.conditions, "Retrying")
        return retrying.message if retrying is not None else f"run {run} waits to be retried"
    parts.append(st.phase.value.lower())
    if st.stage:
        parts.append(f"stage {st.stage}")
    # no progress figures here: they change every few seconds, and a condition change is written
    # at once (reconcile/status.py), which would undo the rate limit on progress-only writes
    return ", ".join(parts)


def _abnormal(conditions: list[Condition], type_: str, value: Optional[tuple[str, str]], now: datetime,
              generation: Optional[int]) -> list[Condition]:
    if value is None:
        return remove_condition(conditions, type_)
    return set_condition(conditions, type_, TRUE, value[0], value[1] or value[0], now, generation)


def _stamp_generation(conditions: list[Condition], generation: Optional[int]) -> list[Condition]:
    if generation is None:
        return conditions
    return [c if c.observed_generation is not None else c.model_copy(update={"observed_generation": generation})
            for c in conditions]
