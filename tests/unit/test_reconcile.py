"""Golden pairs for the pure reconcile functions: tests/data/{ftj,ds}-<case>/{input,expected}.yaml.

Each input holds the object (with its status), what was observed around it (raw RayJobs, progress
documents, pods, local processes, validation results) and `now`; expected holds the new status,
the actions (summarised), the events and the requeue delay. The raw observations go through the
same folding functions the backends use, so a case reads like a snapshot of the cluster.

Regenerate after an intended change with `TAILOR_UPDATE_GOLDENS=1 pytest tests/unit/test_reconcile.py`
and review the diff.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from tailor_operator.api.v1alpha1 import Backend, Dataset, FineTuneJob
from tailor_operator.builders.preflight_job import preflight_key
from tailor_operator.reconcile import (
    DatasetObserved,
    JobObserved,
    OperatorSettings,
    ValidationObservation,
    reconcile_dataset,
    reconcile_finetunejob,
)
from tailor_operator.reconcile.observe import observe_inspect, observe_local_run, observe_rayjob, pod_problem
from tailor_operator.reconcile.plan import (
    ApplyPromotion,
    DeleteRun,
    DeletePreflight,
    DeleteValidation,
    StartPreflight,
    StartRun,
    StartValidation,
    StopRun,
)

DATA = Path(__file__).resolve().parents[1] / "data"
UPDATE = os.environ.get("TAILOR_UPDATE_GOLDENS") == "1"


def _cases(prefix: str) -> list[Path]:
    return sorted(p for p in DATA.glob(f"{prefix}-*") if (p / "input.yaml").is_file())


def _time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _settings(overrides: dict[str, Any] | None) -> OperatorSettings:
    overrides = dict(overrides or {})
    if "dataset_backend" in overrides:
        overrides["dataset_backend"] = Backend(overrides["dataset_backend"])
    return OperatorSettings(**overrides)


def _summarise(action: Any) -> dict[str, Any]:
    if isinstance(action, StartRun):
        ev = action.config.eval_dataset
        return {"startRun": action.run, "attempt": action.attempt,
                "configHash": action.config.config_hash(),
                **({"evalDataset": {"name": ev.name, "revision": ev.revision, "fingerprint": ev.content_fingerprint}}
                   if ev is not None else {}),
                "children": [f"{c['kind']}/{c['metadata']['name']}" for c in action.children]}
    if isinstance(action, StopRun):
        return {"stopRun": action.run, "reason": action.reason}
    if isinstance(action, DeleteRun):
        return {"deleteRun": action.run}
    if isinstance(action, ApplyPromotion):
        return {"applyPromotion": action.run, "modelUri": action.model_uri, "target": action.target.to_wire()}
    if isinstance(action, StartValidation):
        return {"startValidation": action.key, "revision": action.dataset.revision,
                "children": [f"{c['kind']}/{c['metadata']['name']}" for c in action.children]}
    if isinstance(action, DeleteValidation):
        return {"deleteValidation": action.key}
    if isinstance(action, StartPreflight):
        return {"startPreflight": action.key,
                "children": [f"{c['kind']}/{c['metadata']['name']}" for c in action.children]}
    if isinstance(action, DeletePreflight):
        return {"deletePreflight": action.key}
    raise AssertionError(f"unknown action {action!r}")


def _plan_doc(plan: Any) -> dict[str, Any]:
    return {
        "status": plan.status.model_dump(by_alias=True, mode="json", exclude_none=True),
        "actions": [_summarise(a) for a in plan.actions],
        "events": [dataclasses.asdict(e) for e in plan.events],
        "requeueAfter": None if plan.requeue_after is None else round(plan.requeue_after, 3),
    }


def _job_observed(doc: dict[str, Any]) -> JobObserved:
    obs = doc.get("observed") or {}
    runs = {}
    for item in obs.get("runs") or []:
        if "rayjob" in item:
            o = observe_rayjob(item["rayjob"], item.get("progress"), item.get("pods"),
                               progress_read="progress" in item)
        else:
            local = item["local"]
            o = observe_local_run(local["run"], number=local["number"], attempt=local.get("attempt", 1),
                                  running=local.get("running", False), exit_code=local.get("exitCode"),
                                  progress=local.get("progress"), log_tail=local.get("logTail", ""))
        runs[o.run] = o
    dataset = Dataset.model_validate(doc["dataset"]) if doc.get("dataset") else None
    eval_dataset = Dataset.model_validate(doc["evalDataset"]) if doc.get("evalDataset") else None
    return JobObserved(dataset=dataset, runs=runs, inline_data=obs.get("inlineData"), eval_dataset=eval_dataset,
                       model_config=obs.get("modelConfig"), local_slots=obs.get("localSlots"),
                       target_model_uri=obs.get("targetModelUri"), trainer_access_error=obs.get("trainerAccessError"),
                       preflight=_preflight(doc), other_preflights=tuple(obs.get("otherPreflights") or ()))


def _preflight(doc: dict[str, Any]) -> Optional[ValidationObservation]:
    """The model check of the job's current spec: `observed.preflight` as written (`null`: none
    exists yet), or by default one that passed, so cases about other things start their runs."""
    obs = doc.get("observed") or {}
    key = preflight_key(FineTuneJob.model_validate(doc["job"]), _settings(doc.get("settings")).trainer_image)
    pf = obs.get("preflight", "passed")
    if pf is None:
        return None
    if pf == "passed":
        return ValidationObservation(key=key, exists=True, finished=True, result={
            "ok": True, "model": {"modelType": "llama", "parameters": 4_200_000, "maxPositionEmbeddings": 2048}})
    return ValidationObservation(key=pf.get("key", key), exists=pf.get("exists", True),
                                 finished=pf.get("finished", False), result=pf.get("result"),
                                 failure=pf.get("failure"),
                                 problem=pod_problem(pf["pods"]) if pf.get("pods") else None)


def _dataset_observed(doc: dict[str, Any]) -> DatasetObserved:
    obs = doc.get("observed") or {}
    v = obs.get("validation")
    validation = None
    if v is not None and "job" in v:  # the raw Job (and pods), folded like the backend does
        validation = observe_inspect(v["key"], config_map=v.get("configMap"), job=v["job"], pods=v.get("pods"))
    elif v is not None:
        validation = ValidationObservation(key=v["key"], exists=v.get("exists", True),
                                           finished=v.get("finished", False), result=v.get("result"),
                                           failure=v.get("failure"),
                                           problem=pod_problem(v["pods"]) if v.get("pods") else None)
    error = obs.get("sourceError")
    return DatasetObserved(fingerprint=obs.get("fingerprint"), validation=validation,
                           other_validations=tuple(obs.get("otherValidations") or ()),
                           inline_data=obs.get("inlineData"),
                           source_error=(error["reason"], error["message"]) if error else None,
                           trainer_access_error=obs.get("trainerAccessError"))


def _check(case: Path, got: dict[str, Any]) -> None:
    expected_path = case / "expected.yaml"
    if UPDATE or not expected_path.exists():
        expected_path.write_text(yaml.safe_dump(got, sort_keys=False, width=110, allow_unicode=True))
        if not UPDATE:
            pytest.fail(f"wrote missing {expected_path}; review it and rerun")
    expected = yaml.safe_load(expected_path.read_text())
    assert got == expected


@pytest.mark.parametrize("case", _cases("ftj"), ids=lambda p: p.name)
def test_reconcile_finetunejob_golden(case: Path) -> None:
    doc = yaml.safe_load((case / "input.yaml").read_text())
    job = FineTuneJob.model_validate(doc["job"])
    plan = reconcile_finetunejob(job, _job_observed(doc), _settings(doc.get("settings")), _time(doc["now"]))
    _check(case, _plan_doc(plan))


@pytest.mark.parametrize("case", _cases("ds"), ids=lambda p: p.name)
def test_reconcile_dataset_golden(case: Path) -> None:
    doc = yaml.safe_load((case / "input.yaml").read_text())
    dataset = Dataset.model_validate(doc["dataset"])
    plan = reconcile_dataset(dataset, _dataset_observed(doc), _settings(doc.get("settings")), _time(doc["now"]))
    _check(case, _plan_doc(plan))


@pytest.mark.parametrize("case", _cases("ftj") + _cases("ds"), ids=lambda p: p.name)
def test_reconcile_is_idempotent(case: Path) -> None:
    """Applying the plan's status and reconciling again with the same observations changes nothing
    more than the first time did: no second StartRun, no repeated events."""
    doc = yaml.safe_load((case / "input.yaml").read_text())
    now = _time(doc["now"])
    settings = _settings(doc.get("settings"))
    if "job" in doc:
        job = FineTuneJob.model_validate(doc["job"])
        observed = _job_observed(doc)
        first = reconcile_finetunejob(job, observed, settings, now)
        if any(isinstance(a, (StartRun, StartPreflight)) for a in first.actions):
            return  # the world changes once the run exists; covered by the adoption case
        second = reconcile_finetunejob(job.model_copy(update={"status": first.status}), observed, settings, now)
    else:
        dataset = Dataset.model_validate(doc["dataset"])
        observed = _dataset_observed(doc)
        first = reconcile_dataset(dataset, observed, settings, now)
        if any(isinstance(a, StartValidation) for a in first.actions):
            return
        second = reconcile_dataset(dataset.model_copy(update={"status": first.status}), observed, settings, now)
    assert second.status == first.status
    assert second.events == []
