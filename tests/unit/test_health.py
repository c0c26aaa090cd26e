"""GitOps health (reconcile/health.py): Ready, Reconciling and Stalled as kstatus defines them.

Checked on every reconcile golden (tests/data/{ftj,ds}-*/expected.yaml, which the reconcile
itself wrote), so each phase, blocked state and failure the goldens cover is held to the rules,
plus the cases the goldens cannot show (progress-only changes, a spec edit mid-run, suspend)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from tailor_operator.api.v1alpha1 import (
    Condition,
    ConditionStatus,
    DatasetStatus,
    FineTuneJobStatus,
    JobError,
    Phase,
    Progress,
    RolloutPhase,
    RolloutStatus,
)
from tailor_operator.reconcile.health import dataset_health, job_health

DATA = Path(__file__).resolve().parents[1] / "data"
NOW = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
IN_FLIGHT = {"Pending", "Validating", "Queued", "Running", "Evaluating"}


def _expected(prefix: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for case in sorted(DATA.glob(f"{prefix}-*")):
        path = case / "expected.yaml"
        if path.is_file() and (case / "input.yaml").is_file():
            out.append((case.name, yaml.safe_load(path.read_text())["status"]))
    return out


def _conds(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


@pytest.mark.parametrize("name,status", _expected("ftj"), ids=[n for n, _ in _expected("ftj")])
def test_every_finetunejob_golden_follows_kstatus(name: str, status: dict[str, Any]) -> None:
    conds = _conds(status)
    phase = status["phase"]
    assert all("observedGeneration" in c for c in conds.values()), f"{name}: a condition lacks observedGeneration"
    assert "observedGeneration" in status, name
    ready = conds["Ready"]
    bad_pin = conds.get("Pinned", {}).get("reason") == "PinnedRunNotFound"
    rolling_out = (status.get("rollout") or {}).get("phase") == "Progressing"
    assert ready["status"] == ("True" if phase == "Succeeded" and not bad_pin and not rolling_out else "False"), \
        (name, ready)
    # abnormal-true: present only when True
    for kind in ("Reconciling", "Stalled"):
        assert kind not in conds or conds[kind]["status"] == "True", (name, conds[kind])
    assert not ("Reconciling" in conds and "Stalled" in conds), name
    blocked = phase == "Pending" and "error" in status and conds.get("Retrying", {}).get("status") != "True" \
        and status["error"]["reason"] != "EvalDatasetValidating"
    assert ("Stalled" in conds) == (phase == "Failed" or blocked or bad_pin), (name, phase, status.get("error"))
    assert ("Reconciling" in conds) == (phase in IN_FLIGHT and not blocked and not bad_pin), (name, phase)
    if "Stalled" in conds and not bad_pin:
        assert conds["Stalled"]["reason"] == status["error"]["reason"], name
        assert conds["Stalled"]["message"], name


@pytest.mark.parametrize("name,status", _expected("ds"), ids=[n for n, _ in _expected("ds")])
def test_every_dataset_golden_follows_kstatus(name: str, status: dict[str, Any]) -> None:
    conds = _conds(status)
    assert all("observedGeneration" in c for c in conds.values()), name
    validating = conds.get("Validating", {}).get("status") == "True"
    assert ("Reconciling" in conds) == validating, name
    assert ("Stalled" in conds) == (not validating and conds["Ready"]["status"] == "False"), name
    for kind in ("Reconciling", "Stalled"):
        assert kind not in conds or conds[kind]["status"] == "True", name


def _running(**kw: Any) -> FineTuneJobStatus:
    base = dict(phase=Phase.running, current_run="j-r1", run_count=1, attempts=1, observed_generation=1,
                stage="train", progress=Progress(summary="10% 3/30", percent=10, step=3, total_steps=30))
    base.update(kw)
    return FineTuneJobStatus(**base)


def test_progress_alone_never_changes_a_condition() -> None:
    """Conditions are written at once (reconcile/status.py); progress is rate-limited: a condition
    that carried progress figures would turn every progress tick into an immediate write."""
    a = _running()
    job_health(a, 1, NOW)
    b = a.model_copy(deep=True)
    b.progress = Progress(summary="90% 27/30", percent=90, step=27, total_steps=30, loss=0.1)
    job_health(b, 1, NOW + timedelta(seconds=5))
    assert a.conditions == b.conditions
    reconciling = next(c for c in a.conditions if c.type == "Reconciling")
    assert reconciling.reason == "Running" and "stage train" in reconciling.message


def test_transition_time_moves_only_when_ready_flips() -> None:
    st = _running()
    job_health(st, 1, NOW)
    st.phase = Phase.evaluating
    job_health(st, 1, NOW + timedelta(minutes=1))
    ready = next(c for c in st.conditions if c.type == "Ready")
    assert ready.reason == "Evaluating" and ready.last_transition_time == NOW
    st.phase = Phase.succeeded
    job_health(st, 1, NOW + timedelta(minutes=2))
    ready = next(c for c in st.conditions if c.type == "Ready")
    assert ready.status is ConditionStatus.true and ready.last_transition_time == NOW + timedelta(minutes=2)
    assert {c.type for c in st.conditions}.isdisjoint({"Reconciling", "Stalled"})


def test_spec_edited_mid_run_stamps_the_current_generation_on_health_only() -> None:
    """The run goes on with generation 1's config (status.runGeneration 1): its conditions say 1,
    while the summary conditions are computed at 2 (still Reconciling: kstatus reads InProgress)."""
    st = _running(run_generation=1, conditions=[Condition(type="Running", status=ConditionStatus.true,
                                                          reason="Running")])
    job_health(st, 2, NOW)
    by_type = {c.type: c for c in st.conditions}
    assert by_type["Running"].observed_generation == 1
    assert by_type["Ready"].observed_generation == 2 and by_type["Reconciling"].observed_generation == 2


def test_retry_backoff_is_reconciling_not_stalled() -> None:
    st = _running(phase=Phase.pending, error=JobError(reason="OOMKilled", message="attempt 1: OOMKilled"),
                  conditions=[Condition(type="Retrying", status=ConditionStatus.true, reason="BackingOff",
                                        message="attempt 1 of 3 failed; attempt 2 starts in 10s")])
    job_health(st, 1, NOW)
    by_type = {c.type: c for c in st.conditions}
    assert "Stalled" not in by_type
    assert by_type["Reconciling"].reason == "Retrying" and "attempt 2 starts" in by_type["Reconciling"].message


def test_suspended_is_neither_reconciling_nor_stalled() -> None:
    st = _running(phase=Phase.suspended)
    job_health(st, 1, NOW)
    by_type = {c.type: c for c in st.conditions}
    assert by_type["Ready"].reason == "Suspended" and by_type["Ready"].status is ConditionStatus.false
    assert "Reconciling" not in by_type and "Stalled" not in by_type


def test_a_canary_still_rolling_out_is_reconciling() -> None:
    """A Succeeded run whose model is a canary in the InferenceService (reconcile/rollout.py) is not
    done yet: Ready False, Reconciling True; once the canary has all traffic, Ready."""
    st = _running(phase=Phase.succeeded, rollout=RolloutStatus(
        phase=RolloutPhase.progressing, run="j-r1", model="s3://b/j-r1/model", canary_traffic_percent=10,
        started_at=NOW))
    job_health(st, 1, NOW)
    by_type = {c.type: c for c in st.conditions}
    assert by_type["Ready"].status is ConditionStatus.false and by_type["Reconciling"].reason == "RollingOut"
    assert "10%" in by_type["Reconciling"].message
    assert st.rollout is not None
    st.rollout.phase = RolloutPhase.succeeded
    job_health(st, 1, NOW)
    assert [(c.type, c.status) for c in st.conditions] == [("Ready", ConditionStatus.true)]


def test_recovery_removes_stalled() -> None:
    st = FineTuneJobStatus(phase=Phase.pending, observed_generation=1,
                           error=JobError(reason="DatasetNotFound", message='Dataset "x" not found'))
    job_health(st, 1, NOW)
    assert any(c.type == "Stalled" for c in st.conditions)
    st.error, st.phase, st.current_run = None, Phase.queued, "j-r1"
    job_health(st, 1, NOW)
    assert [c.type for c in st.conditions] == ["Ready", "Reconciling"]


def test_dataset_keeps_its_own_ready_and_adds_reconciling_while_validating() -> None:
    st = DatasetStatus(observed_generation=3, conditions=[
        Condition(type="Ready", status=ConditionStatus.true, reason="Validated", observed_generation=3),
        Condition(type="Validating", status=ConditionStatus.true, reason="Validating", message="v-abc is running",
                  observed_generation=4)])
    dataset_health(st, 4, NOW)
    by_type = {c.type: c for c in st.conditions}
    assert by_type["Ready"].status is ConditionStatus.true and by_type["Ready"].observed_generation == 3
    assert by_type["Reconciling"].message == "v-abc is running"
    assert "Stalled" not in by_type


# ------------------------------------------------- the real kstatus library on every golden

def _tool(name: str) -> Path:
    import json
    import subprocess
    r = subprocess.run([str(DATA.parents[1] / "scripts" / "testenv"), "env", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"`scripts/testenv env --json` failed: {r.stderr}", pytrace=False)
    path = Path(json.loads(r.stdout)["tools"][name])
    if not path.is_file():
        pytest.fail(f"{path} is not built: run `scripts/testenv build` (docs/testenv.md)", pytrace=False)
    return path


def _objects(prefix: str, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """Each golden's object as the API server would serve it after the reconcile: the input's
    metadata (generation) with the status the reconcile wrote."""
    out = []
    for name, status in _expected(prefix):
        doc = yaml.safe_load((DATA / name / "input.yaml").read_text())
        obj = dict(doc["job" if prefix == "ftj" else "dataset"])
        obj["status"] = status
        assert obj["kind"] == kind
        out.append((name, obj))
    return out


def _kstatus_expected(obj: dict[str, Any]) -> str:
    """What Tailor means each state to read as, from its own vocabulary (phase, error, Dataset
    conditions), not from the summary conditions under test."""
    status, generation = obj["status"], obj["metadata"].get("generation")
    if generation is not None and (status.get("observedGeneration") or generation) < generation:
        return "InProgress"
    conds = _conds(status)
    if obj["kind"] == "Dataset":
        if conds.get("Validating", {}).get("status") == "True":
            return "InProgress"
        return {"True": "Current", "False": "Failed"}.get(conds.get("Ready", {}).get("status"), "InProgress")
    phase = status["phase"]
    blocked = phase == "Pending" and "error" in status and conds.get("Retrying", {}).get("status") != "True" \
        and status["error"]["reason"] != "EvalDatasetValidating"
    if phase == "Failed" or blocked or conds.get("Pinned", {}).get("reason") == "PinnedRunNotFound":
        return "Failed"
    return "Current" if phase == "Succeeded" else "InProgress"


def test_kstatus_reads_every_golden_as_intended() -> None:
    """sigs.k8s.io/cli-utils' kstatus (what Flux's health checks and kpt compute), built from its Go
    module by scripts/testenv, over every reconcile golden of both kinds: Succeeded/Ready is
    Current, a failed or blocked object is Failed with the operator's message, everything on its
    way (including a spec edit the current run has not taken in) is InProgress."""
    import json
    import subprocess
    objects = _objects("ftj", "FineTuneJob") + _objects("ds", "Dataset")
    r = subprocess.run([str(_tool("kstatus"))], input=json.dumps([o for _, o in objects]), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    verdicts = json.loads(r.stdout)
    seen = set()
    for (name, obj), got in zip(objects, verdicts, strict=True):
        want = _kstatus_expected(obj)
        seen.add(want)
        assert got["status"] == want, (name, got, obj["status"].get("phase"))
        if want == "Failed":
            assert got["message"] == _conds(obj["status"])["Stalled"]["message"], name
    assert seen == {"Current", "InProgress", "Failed"}, seen
