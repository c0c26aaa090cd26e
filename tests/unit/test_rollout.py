"""The staged rollout (reconcile/rollout.py) as a pure state machine, and the InferenceService
patches it asks for (builders/promotion.py). The same flow against the real InferenceService CRD:
tests/integration/test_kserve_rollout.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import pytest

from tailor_operator.api.v1alpha1 import (
    ChampionStatus,
    FineTuneJob,
    FineTuneJobStatus,
    HistoryEntry,
    Phase,
    RolloutPhase,
)
from tailor_operator.builders.promotion import build_inference_service_patch
from tailor_operator.reconcile.plan import ApplyPromotion, JobPlan
from tailor_operator.reconcile.rollout import (
    InferenceServiceObserved,
    observe_inference_service,
    reconcile_target,
    set_champion,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
R1 = "s3://acme/runs/support-r1/train/model"
R2 = "s3://acme/runs/support-r2/train/model"


def _job(**isvc: Any) -> FineTuneJob:
    return FineTuneJob.model_validate({
        "apiVersion": "tailor.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "support", "namespace": "team-ml", "uid": "u1", "generation": 1},
        "spec": {"baseModel": {"uri": "hf://acme/tiny"}, "datasetRef": {"name": "tickets"},
                 "output": {"uri": "s3://acme/runs"},
                 "continuousLearning": {"promotion": {"target": {"inferenceService": {"name": "support-llm", **isvc}}}}},
    })


CANARY = {"canaryTrafficPercent": 10, "canaryHoldSeconds": 60, "progressDeadlineSeconds": 300}


def _champion(run: str, model: str) -> ChampionStatus:
    return ChampionStatus(run=run, model=model, metrics={"loss": 1.0}, promoted_at=T0)


def _status_after_promoting_r2(job: FineTuneJob) -> tuple[FineTuneJobStatus, JobPlan]:
    st = FineTuneJobStatus(champion=_champion("support-r1", R1), history=[
        HistoryEntry(run="support-r1", phase=Phase.succeeded, model=R1, promoted=True, reason="FirstChampion"),
        HistoryEntry(run="support-r2", phase=Phase.succeeded, model=R2, promoted=True, reason="Improved")])
    plan = JobPlan(status=st)
    set_champion(job, st, _champion("support-r2", R2), T0, plan)
    return st, plan


def _isvc(uri: str, canary: Optional[int], ready: Optional[str], generation: int = 2, observed: int = 2,
          **status: Any) -> InferenceServiceObserved:
    body = {"metadata": {"generation": generation},
            "spec": {"predictor": {"model": {"storageUri": uri},
                                   **({"canaryTrafficPercent": canary} if canary is not None else {})}},
            "status": {"observedGeneration": observed, **status}}
    if ready is not None:
        body["status"]["conditions"] = [{"type": "Ready", "status": ready, "reason": "RevisionFailed" if ready == "False"
                                         else "", "message": "container exited" if ready == "False" else ""}]
    parsed = observe_inference_service(body)
    assert parsed is not None
    return parsed


def _step(job: FineTuneJob, st: FineTuneJobStatus, isvc: Optional[InferenceServiceObserved], at: datetime) -> JobPlan:
    plan = JobPlan(status=st)
    reconcile_target(job, st, isvc.storage_uri if isvc else None, isvc, 10.0, at, plan)
    return plan


def _actions(plan: JobPlan) -> list[ApplyPromotion]:
    return [a for a in plan.actions if isinstance(a, ApplyPromotion)]


def test_a_better_run_starts_as_a_canary_then_gets_all_traffic_after_the_hold() -> None:
    job = _job(**CANARY)
    st, plan = _status_after_promoting_r2(job)
    assert st.rollout is not None and st.rollout.phase is RolloutPhase.progressing
    assert st.rollout.previous is not None and st.rollout.previous.run == "support-r1"
    assert [e.reason for e in plan.events] == ["RolloutStarted"]
    # the InferenceService still serves r1 only: the patch points it at r2 with 10%
    plan = _step(job, st, _isvc(R1, None, "True", generation=1, observed=1), T0)
    (action,) = _actions(plan)
    assert (action.model_uri, action.canary_traffic_percent, action.manage_canary) == (R2, 10, True)
    # KServe has not observed the new generation yet: its old Ready=True does not count
    plan = _step(job, st, _isvc(R2, 10, "True", generation=2, observed=1), T0 + timedelta(seconds=90))
    assert st.rollout.phase is RolloutPhase.progressing and not _actions(plan)
    assert "not observed generation 2" in (st.rollout.message or "")
    # Ready for the new generation, but not for the hold yet: wait, and look again in time
    plan = _step(job, st, _isvc(R2, 10, "True"), T0 + timedelta(seconds=30))
    assert st.rollout.phase is RolloutPhase.progressing and not _actions(plan)
    assert st.rollout.ready_since == T0 + timedelta(seconds=30) and plan.requeue_after == 10.0
    plan = _step(job, st, _isvc(R2, 10, "True"), T0 + timedelta(seconds=80))  # 50 s Ready: not yet
    assert st.rollout.phase is RolloutPhase.progressing and not _actions(plan)
    # a break in Ready restarts the hold
    _step(job, st, _isvc(R2, 10, "Unknown"), T0 + timedelta(seconds=85))
    assert st.rollout.ready_since is None
    _step(job, st, _isvc(R2, 10, "True"), T0 + timedelta(seconds=90))
    plan = _step(job, st, _isvc(R2, 10, "True"), T0 + timedelta(seconds=140))
    assert st.rollout.phase is RolloutPhase.progressing and plan.requeue_after == 10.0
    # Ready for the whole hold: all traffic (canaryTrafficPercent removed)
    plan = _step(job, st, _isvc(R2, 10, "True"), T0 + timedelta(seconds=150))
    assert st.rollout.phase is RolloutPhase.succeeded and st.champion is not None and st.champion.run == "support-r2"
    (action,) = _actions(plan)
    assert (action.model_uri, action.canary_traffic_percent, action.manage_canary) == (R2, None, True)
    assert [e.reason for e in plan.events] == ["RolloutSucceeded"]
    # done: nothing more to patch
    assert not _actions(_step(job, st, _isvc(R2, None, "True", generation=3, observed=3), T0 + timedelta(seconds=160)))


@pytest.mark.parametrize("status", [
    {"ready": "False"},
    {"ready": "Unknown", "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                                          "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "bad weights"}}},
])
def test_a_canary_the_inferenceservice_reports_failed_is_rolled_back(status: dict[str, Any]) -> None:
    job = _job(**CANARY)
    st, _ = _status_after_promoting_r2(job)
    ready = status.pop("ready")
    plan = _step(job, st, _isvc(R2, 10, ready, **status), T0 + timedelta(seconds=5))
    assert st.rollout is not None and st.rollout.phase is RolloutPhase.failed
    assert st.champion is not None and st.champion.run == "support-r1"
    (action,) = _actions(plan)  # the previous champion's storageUri, canary removed
    assert (action.run, action.model_uri, action.canary_traffic_percent, action.manage_canary) == \
        ("support-r1", R1, None, True)
    assert [(h.run, h.promoted, h.reason) for h in st.history] == [
        ("support-r1", True, "FirstChampion"), ("support-r2", False, "RolledBack")]
    promoted = next(c for c in st.conditions if c.type == "Promoted")
    assert promoted.status.value == "False" and promoted.reason == "RolledBack"
    (event,) = plan.events
    assert event.type == "Warning" and event.reason == "RolledBack"
    assert ("container exited" if ready == "False" else "bad weights") in event.message


def test_a_canary_not_ready_within_the_progress_deadline_is_rolled_back() -> None:
    job = _job(**CANARY)
    st, _ = _status_after_promoting_r2(job)
    plan = _step(job, st, _isvc(R2, 10, "Unknown"), T0 + timedelta(seconds=299))
    assert st.rollout is not None and st.rollout.phase is RolloutPhase.progressing and not plan.events
    plan = _step(job, st, _isvc(R2, 10, "Unknown"), T0 + timedelta(seconds=301))
    assert st.rollout.phase is RolloutPhase.failed and "progressDeadlineSeconds" in (st.rollout.message or "")
    assert st.champion is not None and st.champion.run == "support-r1"


def test_first_champion_pin_and_no_canary_settings_move_the_target_at_once() -> None:
    job = _job(**CANARY)
    st = FineTuneJobStatus()
    plan = JobPlan(status=st)
    set_champion(job, st, _champion("support-r1", R1), T0, plan)  # nothing to fall back to
    assert st.rollout is None and not plan.events
    st, _ = _status_after_promoting_r2(job)
    set_champion(job, st, _champion("support-r1", R1), T0, JobPlan(status=st), staged=False)  # a pin
    assert st.rollout is not None and st.rollout.phase is RolloutPhase.failed and "superseded" in st.rollout.message
    plain = _job()
    st, plan = _status_after_promoting_r2(plain)
    assert st.rollout is None and not plan.events
    (action,) = _actions(_step(plain, st, _isvc(R1, 25, "True"), T0))
    assert action.manage_canary is False  # a job without canary settings leaves canaryTrafficPercent alone
    assert build_inference_service_patch(action.run, action.model_uri) == {
        "metadata": {"annotations": {"tailor.dev/champion-run": "support-r2"}},
        "spec": {"predictor": {"model": {"storageUri": R2}}}}


def test_a_newer_champion_during_a_canary_falls_back_to_the_last_fully_rolled_out_one() -> None:
    job = _job(**CANARY)
    st, plan = _status_after_promoting_r2(job)
    r3 = "s3://acme/runs/support-r3/train/model"
    set_champion(job, st, _champion("support-r3", r3), T0 + timedelta(seconds=10), plan)
    assert st.rollout is not None and st.rollout.run == "support-r3"
    assert st.rollout.previous is not None and st.rollout.previous.run == "support-r1"


def test_canary_patches_set_and_remove_canary_traffic_percent() -> None:
    assert build_inference_service_patch("r2", R2, 10, True)["spec"]["predictor"] == {
        "model": {"storageUri": R2}, "canaryTrafficPercent": 10}
    # JSON merge patch: null removes the field (KServe then routes all traffic to the latest revision)
    assert build_inference_service_patch("r2", R2, None, True)["spec"]["predictor"] == {
        "model": {"storageUri": R2}, "canaryTrafficPercent": None}


def test_canary_fields_are_validated_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="canaryTrafficPercent|canary_traffic_percent"):
        _job(canaryTrafficPercent=100)
    with pytest.raises(ValueError, match="canaryHoldSeconds|canary_hold_seconds"):
        _job(canaryTrafficPercent=10, canaryHoldSeconds=-1)
