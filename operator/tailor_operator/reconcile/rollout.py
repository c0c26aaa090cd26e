"""Pure: moving the rollout target to the champion, with an optional canary (KServe).

Every change of champion goes through `set_champion` (a promotion, a rollback, a pin), and the
target follows `st.champion` level-based through `reconcile_target`: whatever the target points
at, the next reconcile repairs it to the desired state below.

A staged rollout (InferenceService target with `canaryTrafficPercent`) is a small state machine in
`status.rollout` (vocabulary from KServe and Flagger):

    Progressing  storageUri = new model, spec.predictor.canaryTrafficPercent = N (KServe sends N%
                 to the new revision, the rest to the last rolled-out one)
      -> Succeeded  the InferenceService reported the new generation Ready for canaryHoldSeconds
                    without a break: canaryTrafficPercent is removed (KServe: all traffic to the latest
                    ready revision)
      -> Failed     it reported Ready False (or a model load failure) for the new generation, or
                    was not Ready within progressDeadlineSeconds: the previous champion is restored
                    (its storageUri, canaryTrafficPercent removed), the run's history entry says
                    RolledBack, a Warning event says why

KServe's status is trusted only when it describes the spec we wrote: status.observedGeneration
must have caught up with metadata.generation and the storageUri must be the canary's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import (
    ChampionStatus,
    FineTuneJob,
    FineTuneJobStatus,
    InferenceServiceTarget,
    RolloutPhase,
    RolloutStatus,
)
from tailor_operator.reconcile.conditions import FALSE, set_condition
from tailor_operator.reconcile.plan import ApplyPromotion, Event, JobPlan, sooner

# KServe's modelStatus: states and transitions that mean the model did not load
_FAILED_STATES = frozenset({"FailedToLoad"})
_FAILED_TRANSITIONS = frozenset({"BlockedByFailedLoad", "InvalidSpec"})
_MAX_MESSAGE = 1024  # of KServe's text carried into status (the CRD caps messages at 4096)


@dataclass(frozen=True)
class InferenceServiceObserved:
    """What the rollout needs to know about the target InferenceService."""

    storage_uri: Optional[str] = None
    canary_traffic_percent: Optional[int] = None
    generation: Optional[int] = None
    observed_generation: Optional[int] = None
    ready: Optional[str] = None
    """The Ready condition's status: True, False, Unknown, or None when absent."""
    message: str = ""
    """The Ready condition's reason and message, or the model's failure."""
    model_failed: bool = False
    """status.modelStatus reports that the model failed to load."""
    traffic: tuple[tuple[str, int], ...] = ()
    """status.components.predictor.traffic as (revision, percent)."""


def observe_inference_service(body: Optional[dict[str, Any]]) -> Optional[InferenceServiceObserved]:
    """Parse an InferenceService (serving.kserve.io/v1beta1) body; None when it does not exist."""
    if not body:
        return None
    predictor = (body.get("spec") or {}).get("predictor") or {}
    status = body.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    model_status = status.get("modelStatus") or {}
    failure = model_status.get("lastFailureInfo") or {}
    states = model_status.get("states") or {}
    failed = (states.get("targetModelState") in _FAILED_STATES or states.get("activeModelState") in _FAILED_STATES
              or model_status.get("transitionStatus") in _FAILED_TRANSITIONS)
    message = ""
    if ready is not None:
        message = ": ".join(x for x in (ready.get("reason"), ready.get("message")) if x)
    if failed and failure:
        message = ": ".join(x for x in (failure.get("reason"), failure.get("message")) if x) or message
    component = (status.get("components") or {}).get("predictor") or {}
    traffic = tuple((str(t.get("revisionName") or t.get("tag") or ""), int(t.get("percent") or 0))
                    for t in component.get("traffic") or [])
    canary = predictor.get("canaryTrafficPercent")
    return InferenceServiceObserved(
        storage_uri=(predictor.get("model") or {}).get("storageUri"),
        canary_traffic_percent=int(canary) if canary is not None else None,
        generation=(body.get("metadata") or {}).get("generation"),
        observed_generation=status.get("observedGeneration"),
        ready=ready.get("status") if ready is not None else None,
        message=message[:_MAX_MESSAGE],
        model_failed=failed,
        traffic=traffic,
    )


def canary_target(job: FineTuneJob) -> Optional[InferenceServiceTarget]:
    """The job's InferenceService target when it asks for a staged rollout."""
    cl = job.spec.continuous_learning
    target = cl.promotion.target if cl is not None else None
    isvc = target.inference_service if target is not None else None
    return isvc if isvc is not None and isvc.canary_traffic_percent is not None else None


def set_champion(job: FineTuneJob, st: FineTuneJobStatus, champion: ChampionStatus, now: datetime,
                 plan: JobPlan, *, staged: bool = True) -> None:
    """Make `champion` the champion; the target follows (reconcile_target). With `staged` and a
    canary target, and an earlier champion to fall back to, the move starts as a canary; otherwise
    (first champion, a pin, a rollback, no canary settings) the target moves at once and any
    canary in progress ends."""
    in_flight = st.rollout is not None and st.rollout.phase is RolloutPhase.progressing
    # the fallback is the last champion that got all traffic, not an unproven canary
    previous = st.rollout.previous if in_flight and st.rollout is not None else st.champion
    st.champion = champion
    target = canary_target(job)
    if not (staged and target is not None and previous is not None and previous.model
            and champion.model and previous.model != champion.model):
        if in_flight and st.rollout is not None:
            st.rollout = st.rollout.model_copy(update={
                "phase": RolloutPhase.succeeded if st.rollout.run == champion.run else RolloutPhase.failed,
                "finished_at": now, "message": f"superseded: {champion.run} is the champion"})
        return
    percent = target.canary_traffic_percent
    st.rollout = RolloutStatus(phase=RolloutPhase.progressing, run=champion.run, model=champion.model,
                               canary_traffic_percent=percent, started_at=now, previous=previous,
                               message=f"canary at {percent}% of InferenceService {target.name}")
    plan.events.append(Event("Normal", "RolloutStarted",
                             f"run {champion.run} gets {percent}% of InferenceService {target.name} "
                             f"(the rest stays on {previous.run}); all traffic after "
                             f"{target.canary_hold_seconds}s Ready"))


def _health(isvc: Optional[InferenceServiceObserved], model: str) -> tuple[str, str]:
    """(ready | failed | pending, why) of the canary as KServe reports it."""
    if isvc is None:
        return "pending", "the InferenceService does not exist"
    if isvc.storage_uri != model:
        return "pending", "the InferenceService does not point at the canary yet"
    if isvc.generation is not None and (isvc.observed_generation or 0) < isvc.generation:
        return "pending", f"KServe has not observed generation {isvc.generation} yet"
    if isvc.model_failed:
        return "failed", isvc.message or "the model failed to load"
    if isvc.ready == "False":
        return "failed", isvc.message or "Ready is False"
    if isvc.ready == "True":
        return "ready", "Ready"
    return "pending", isvc.message or "Ready is not reported yet"


def advance(job: FineTuneJob, st: FineTuneJobStatus, isvc: Optional[InferenceServiceObserved],
            poll_seconds: float, now: datetime, plan: JobPlan) -> None:
    """One step of a canary in progress: hold, promote to all traffic, or roll back."""
    r = st.rollout
    if r is None or r.phase is not RolloutPhase.progressing:
        return
    target = canary_target(job)
    if target is None or st.champion is None or st.champion.run != r.run:
        st.rollout = r.model_copy(update={"phase": RolloutPhase.succeeded, "finished_at": now,
                                          "message": "canary settings removed: all traffic to the champion"})
        return
    state, why = _health(isvc, r.model)
    elapsed = (now - r.started_at).total_seconds()
    ready_since = (r.ready_since or now) if state == "ready" else None  # Ready without a break
    held = (now - ready_since).total_seconds() if ready_since is not None else 0.0
    if state == "failed":
        _roll_back(st, r, f"the InferenceService reports the canary failed: {why}", now, plan)
    elif state == "ready" and held >= target.canary_hold_seconds:
        st.rollout = r.model_copy(update={
            "phase": RolloutPhase.succeeded, "finished_at": now, "ready_since": ready_since,
            "message": f"Ready for {int(held)}s at {r.canary_traffic_percent}%: all traffic"})
        plan.events.append(Event("Normal", "RolloutSucceeded",
                                 f"run {r.run} gets all traffic of InferenceService {target.name} "
                                 f"(Ready for {int(held)}s at {r.canary_traffic_percent}%)"))
    elif state != "ready" and elapsed >= target.progress_deadline_seconds:
        _roll_back(st, r, f"not Ready within progressDeadlineSeconds ({target.progress_deadline_seconds}s): "
                          f"{why}", now, plan)
    else:
        st.rollout = r.model_copy(update={"ready_since": ready_since,
                                          "message": f"canary at {r.canary_traffic_percent}%: {why}"})
        left = (target.canary_hold_seconds - held) if state == "ready" else \
            (target.progress_deadline_seconds - elapsed)
        plan.requeue_after = sooner(plan.requeue_after, max(min(left, poll_seconds), 1.0))


def _roll_back(st: FineTuneJobStatus, r: RolloutStatus, why: str, now: datetime, plan: JobPlan) -> None:
    previous = r.previous
    st.champion = previous
    st.rollout = r.model_copy(update={"phase": RolloutPhase.failed, "finished_at": now, "message": why})
    for h in st.history:
        if h.run == r.run:
            h.promoted = False
            h.reason = "RolledBack"
    back = f"champion {previous.run} restored" if previous is not None else "no champion"
    st.conditions = set_condition(st.conditions, "Promoted", FALSE, "RolledBack",
                                  f"run {r.run} rolled back ({why}); {back}", now)
    plan.events.append(Event("Warning", "RolledBack", f"run {r.run} rolled back: {why}; {back}"))


def desired_canary(job: FineTuneJob, st: FineTuneJobStatus) -> Optional[int]:
    """The canaryTrafficPercent the InferenceService should have now (None: removed)."""
    r = st.rollout
    if r is None or r.phase is not RolloutPhase.progressing or st.champion is None or st.champion.run != r.run:
        return None
    return r.canary_traffic_percent


def reconcile_target(job: FineTuneJob, st: FineTuneJobStatus, target_model_uri: Optional[str],
                     isvc: Optional[InferenceServiceObserved], poll_seconds: float, now: datetime,
                     plan: JobPlan) -> None:
    """Level-based rollout: advance a canary, then repair the target to point at the champion
    (with the canary's traffic share while one runs). A job without canary settings never touches
    canaryTrafficPercent."""
    cl = job.spec.continuous_learning
    target = cl.promotion.target if cl is not None else None
    advance(job, st, isvc, poll_seconds, now, plan)
    if target is None or st.champion is None or not st.champion.model:
        return
    staged = canary_target(job) is not None
    canary = desired_canary(job, st) if staged else None
    observed_canary = isvc.canary_traffic_percent if isvc is not None else None
    if target_model_uri != st.champion.model or (staged and observed_canary != canary):
        plan.actions.append(ApplyPromotion(run=st.champion.run, model_uri=st.champion.model, target=target,
                                           canary_traffic_percent=canary, manage_canary=staged))
