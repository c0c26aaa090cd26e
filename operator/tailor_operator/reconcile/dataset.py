"""reconcile_dataset(dataset, observed, settings, now) -> DatasetPlan: revision and validation, pure.

The revision is `spec.revision`, else the content fingerprint the operator observed, else (for
sources the operator cannot read, e.g. a PVC or S3 without credentials in the operator) the one
the validation itself reports, re-validated every `refreshInterval`. Each (spec, revision) pair is
validated once, by a child named `<dataset>-v<hash>`: a new revision or spec means a new
validation, and the previous result stays in status (Ready) until the new one is in.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import (
    Backend,
    Dataset,
    DatasetStatus,
    RowError,
    SplitCounts,
)
from tailor_operator.builders.inspect_job import build_inspect_config_map, build_inspect_job
from tailor_operator.builders.labels import ANNOTATION_BACKEND
from tailor_operator.builders.naming import validation_name
from tailor_operator.builders.trainer_access import ACCESS_FAILED
from tailor_operator.reconcile.conditions import FALSE, TRUE, UNKNOWN, get_condition, set_condition
from tailor_operator.reconcile.health import dataset_health
from tailor_operator.reconcile.observe import PodProblem, ValidationObservation
from tailor_operator.reconcile.plan import DatasetPlan, DeleteValidation, Event, StartValidation, sooner
from tailor_operator.reconcile.policy import check_dataset_policy
from tailor_operator.reconcile.settings import OperatorSettings
from tailor_trainer.config import ResolvedDataset

_DURATION = re.compile(r"([0-9]+)(s|m|h)")


def duration_seconds(text: Optional[str]) -> Optional[float]:
    """'1h30m' -> 5400.0; None for unset."""
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    return float(sum(int(n) * units[u] for n, u in _DURATION.findall(text)))


def dataset_backend(dataset: Dataset, settings: OperatorSettings) -> Backend:
    """The Dataset's `tailor.dev/backend` annotation, else the operator's setting."""
    value = (dataset.metadata.annotations or {}).get(ANNOTATION_BACKEND)
    try:
        return Backend(value) if value else settings.dataset_backend
    except ValueError:
        return settings.dataset_backend


def validation_key(dataset: Dataset, fingerprint: Optional[str], now: datetime) -> str:
    """Name of the validation for the current spec and revision (deterministic)."""
    spec = dataset.spec.model_dump(by_alias=True, mode="json", exclude={"refresh_interval"})
    basis: dict[str, Any] = {"spec": spec, "revision": dataset.spec.revision or fingerprint}
    if basis["revision"] is None:
        interval = duration_seconds(dataset.spec.refresh_interval)
        basis["epoch"] = int(now.timestamp() // interval) if interval else 0
    digest = hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()
    return validation_name(dataset.metadata.name, digest)


def resolved_dataset(dataset: Dataset, fingerprint: Optional[str], inline_data: Optional[str]) -> ResolvedDataset:
    fields = dataset.spec.model_dump(exclude={"revision", "refresh_interval"})
    return ResolvedDataset(**fields, name=dataset.metadata.name, revision=dataset.spec.revision or fingerprint,
                           inline_data=inline_data)


@dataclass(frozen=True)
class DatasetObserved:
    fingerprint: Optional[str] = None
    """Content fingerprint the operator computed; None when it cannot read the source."""
    validation: Optional[ValidationObservation] = None
    """The validation for validation_key(...)."""
    other_validations: tuple[str, ...] = ()
    """Keys of older validations that still exist."""
    inline_data: Optional[str] = None
    source_error: Optional[tuple[str, str]] = None
    """(reason, message) when the source cannot be read at all, e.g. its ConfigMap is missing."""
    trainer_access_error: Optional[str] = None
    """Why the validation pod's ServiceAccount/Role/RoleBinding cannot be created (kuberay), if so."""


def reconcile_dataset(dataset: Dataset, observed: DatasetObserved, settings: OperatorSettings,
                      now: datetime) -> DatasetPlan:
    old = dataset.status or DatasetStatus()
    st = old.model_copy(deep=True)
    plan = DatasetPlan(status=st)
    generation = dataset.metadata.generation
    interval = duration_seconds(dataset.spec.refresh_interval)
    if interval:
        epoch_end = (int(now.timestamp() // interval) + 1) * interval
        plan.requeue_after = max(epoch_end - now.timestamp(), 1.0)

    if observed.source_error is not None:
        reason, message = observed.source_error
        _not_ready(st, plan, reason, message, now, generation)
        plan.requeue_after = sooner(plan.requeue_after, settings.active_poll_seconds * 3)
        return _stamp(old, plan, now, generation)

    problem = check_dataset_policy(dataset, dataset_backend(dataset, settings), settings)
    if problem is not None:
        _policy_refused(st, plan, problem.reason, problem.message, now, generation)
        return _stamp(old, plan, now, generation)

    key = validation_key(dataset, observed.fingerprint, now)
    revision = dataset.spec.revision or observed.fingerprint
    v = observed.validation
    if v is None or not v.exists or not v.finished:
        kuberay = dataset_backend(dataset, settings) is Backend.kuberay
        if (v is None or not v.exists) and kuberay and observed.trainer_access_error:
            _access_blocked(st, plan, observed.trainer_access_error, now, generation)
            plan.requeue_after = sooner(plan.requeue_after, settings.active_poll_seconds)
            return _stamp(old, plan, now, generation)
        if v is None or not v.exists:
            children: tuple[dict[str, Any], ...] = ()
            resolved = resolved_dataset(dataset, observed.fingerprint, observed.inline_data)
            if kuberay:
                children = (build_inspect_config_map(dataset, key, resolved),
                            build_inspect_job(dataset, key, settings.inspect_options()))
            plan.actions.append(StartValidation(key=key, dataset=resolved, children=children))
            what = f"revision {revision}" if revision else "the source"
            plan.events.append(Event("Normal", "Validating", f"validating {what} ({key})"))
        message = f"validation {key} is running" + (f" for revision {revision}" if revision else "")
        problem = v.problem if v is not None else None
        if problem is None and v is not None and v.not_started and v.created_at is not None \
                and (now - v.created_at).total_seconds() >= settings.validation_start_grace_seconds:
            waited = int((now - v.created_at).total_seconds())
            problem = PodProblem("ValidationNotStarted", f"no pod has started after {waited}s: {v.not_started}. "
                                 "The kuberay dataset backend runs the validation as a pod: it needs a "
                                 "node and a scheduler (a control plane without nodes never starts it)", key)
        if problem is not None:
            # its pod waits for something only the user can fix: say what, keep waiting (the kubelet
            # retries, so creating the Secret is enough), and never leave a bare "Validating"
            source_field = "spec.source.secretRef" if dataset.spec.source.secret_ref else "the validation pod"
            message = f"validation {key} cannot start: {problem.message} (named by {source_field})" \
                if problem.reason == "CredentialsError" else f"validation {key} is waiting: {problem.message}"
            validating = get_condition(st.conditions, "Validating")
            if validating is None or validating.reason != problem.reason:
                plan.events.append(Event("Warning", problem.reason, message))
        reason = problem.reason if problem is not None else "Validating"
        st.conditions = set_condition(st.conditions, "Validating", TRUE, reason, message, now, generation)
        ready = get_condition(st.conditions, "Ready")
        if problem is not None and problem.reason == "CredentialsError" and (ready is None or ready.status is not TRUE):
            st.conditions = set_condition(st.conditions, "Ready", FALSE, reason, message, now, generation)
        elif ready is None or ready.status is UNKNOWN or ready.reason in (ACCESS_FAILED, "CredentialsError"):
            st.conditions = set_condition(st.conditions, "Ready", UNKNOWN, reason, message, now, generation)
        plan.requeue_after = sooner(plan.requeue_after, settings.active_poll_seconds)
        return _stamp(old, plan, now, generation)

    for other in observed.other_validations:
        plan.actions.append(DeleteValidation(other))
    st.observed_generation = generation
    if v.failure:
        _not_ready(st, plan, "ValidationFailed", v.failure, now, generation)
        return _stamp(old, plan, now, generation)
    _fold_result(dataset, st, plan, v.result or {}, revision, now)
    return _stamp(old, plan, now, generation)


def _access_blocked(st: DatasetStatus, plan: DatasetPlan, message: str, now: datetime,
                    generation: Optional[int]) -> None:
    """No validation Job without its pod's ServiceAccount: say which permission is missing. A
    Ready revision stays Ready (jobs keep using it); otherwise Ready is False until it is fixed."""
    validating = get_condition(st.conditions, "Validating")
    if validating is None or validating.reason != ACCESS_FAILED:
        plan.events.append(Event("Warning", ACCESS_FAILED, message))
    st.conditions = set_condition(st.conditions, "Validating", FALSE, ACCESS_FAILED, message, now, generation)
    ready = get_condition(st.conditions, "Ready")
    if ready is None or ready.status is not TRUE:
        st.conditions = set_condition(st.conditions, "Ready", FALSE, ACCESS_FAILED, message, now, generation)


def _policy_refused(st: DatasetStatus, plan: DatasetPlan, reason: str, message: str, now: datetime,
                    generation: Optional[int]) -> None:
    """The Dataset asks for what the installation does not allow: no validation, Ready is False
    (jobs cannot use it) until its spec or the policy changes."""
    _not_ready(st, plan, reason, message, now, generation)
    st.observed_generation = generation


def _not_ready(st: DatasetStatus, plan: DatasetPlan, reason: str, message: str, now: datetime,
               generation: Optional[int]) -> None:
    ready = get_condition(st.conditions, "Ready")
    if ready is None or ready.reason != reason or ready.status is not FALSE:
        plan.events.append(Event("Warning", reason, message))
    st.conditions = set_condition(st.conditions, "Ready", FALSE, reason, message, now, generation)
    st.conditions = set_condition(st.conditions, "Validating", FALSE, reason, message, now, generation)


def _fold_result(dataset: Dataset, st: DatasetStatus, plan: DatasetPlan, result: dict[str, Any],
                 revision: Optional[str], now: datetime) -> None:
    generation = dataset.metadata.generation
    new_revision = revision or result.get("revision")
    previous = st.revision
    st.revision = new_revision
    fingerprint = result.get("contentFingerprint")
    st.content_fingerprint = fingerprint if isinstance(fingerprint, str) and fingerprint else None
    st.rows = result.get("rows")
    st.rows_read = result.get("rowsRead")
    splits = result.get("splits")
    st.splits = SplitCounts.model_validate(splits) if isinstance(splits, dict) else None
    st.dropped = {str(k): int(v) for k, v in (result.get("dropped") or {}).items() if isinstance(v, int)}
    st.first_errors = [RowError.model_validate(e) for e in (result.get("firstErrors") or [])[:20]]
    st.tokens = {str(k): float(v) for k, v in (result.get("tokens") or {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
    ready = next((c for c in result.get("conditions") or [] if c.get("type") == "Ready"), None)
    ready_ok = bool(ready) and ready.get("status") == "True"
    reason = (ready or {}).get("reason") or ("Validated" if ready_ok else "ValidationFailed")
    message = (ready or {}).get("message") or ""
    if ready_ok:
        summary = f"revision {new_revision}: {st.rows or 0} rows"
        if st.splits:
            summary += f" (train {st.splits.train}, validation {st.splits.validation}, test {st.splits.test})"
        dropped = sum(st.dropped.values())
        if dropped:
            summary += f", {dropped} dropped"
        old_ready = get_condition(st.conditions, "Ready")
        if old_ready is None or old_ready.status is not TRUE or previous != new_revision:
            kind = "RevisionChanged" if previous and previous != new_revision else "Validated"
            plan.events.append(Event("Normal", kind, summary))
        st.conditions = set_condition(st.conditions, "Ready", TRUE, reason, message or summary, now, generation)
        st.conditions = set_condition(st.conditions, "Validating", FALSE, "Validated", summary, now, generation)
    else:
        _not_ready(st, plan, reason, message or "validation failed", now, generation)


def _stamp(old: DatasetStatus, plan: DatasetPlan, now: datetime, generation: Optional[int]) -> DatasetPlan:
    """Health conditions last (reconcile/health.py); lastUpdated moves only when something else
    changed (so an idle Dataset is never written)."""
    dataset_health(plan.status, generation, now)
    if plan.status.model_dump(exclude={"last_updated"}) != old.model_dump(exclude={"last_updated"}):
        plan.status.last_updated = now
    return plan
