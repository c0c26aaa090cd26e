"""Dataset: parse -> fingerprint -> observe its validation -> reconcile -> status -> actions -> events."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any, Optional

from pydantic import ValidationError

from tailor_operator.api.v1alpha1 import Dataset, DatasetStatus
from tailor_operator.backends.files import fingerprint_path
from tailor_operator.builders.events import build_event
from tailor_operator.cluster import ApiError, Conflict
from tailor_operator.handlers.context import Context, access_created_event, utcnow
from tailor_operator.reconcile import DatasetObserved, DatasetPlan, reconcile_dataset, validation_key
from tailor_operator.reconcile.conditions import get_condition
from tailor_operator.reconcile.dataset import dataset_backend, duration_seconds
from tailor_operator.reconcile.plan import DeleteValidation, Event, StartValidation
from tailor_operator.reconcile.policy import path_allowed
from tailor_operator.reconcile.status import status_body

logger = logging.getLogger("tailor.dataset")


def sync_dataset(ctx: Context, namespace: str, name: str) -> Optional[float]:
    key = ("Dataset", namespace, name)
    created: list[str] = []  # trainer objects this sync created: one event, even after a 409 and a retry
    for attempt in range(5):
        body = (ctx.take_body(key) if attempt == 0 else None) or ctx.cluster.get("Dataset", namespace, name)
        if body is None:
            ctx.not_found(key)
            return None
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        try:
            dataset = Dataset.model_validate(body)
        except ValidationError as e:
            logger.error("Dataset %s/%s does not parse: %s", namespace, name, e)
            ctx.dataset_reconciled(namespace, name, body)
            return None
        now = utcnow()
        observed = observe_dataset(ctx, dataset, now)
        plan = reconcile_dataset(dataset, observed, ctx.settings, now)
        if any(isinstance(a, StartValidation) and a.children for a in plan.actions):
            made, error = ctx.ensure_trainer_access(namespace)
            created += made
            if error:  # no validation Job: its pod could not be created
                observed = dataclasses.replace(observed, trainer_access_error=error)
                plan = reconcile_dataset(dataset, observed, ctx.settings, now)
        old = status_body(dataset.status or DatasetStatus())
        new = status_body(plan.status)
        if old != new:
            try:
                written = ctx.cluster.replace_status({**body, "status": new})
            except Conflict:
                ctx.metrics.status_conflicts.labels("Dataset").inc()
                continue
            body = written or body
            ctx.dataset_written(namespace, name, body)  # dependents see the new status at once
        if created:
            plan.events.append(access_created_event(ctx.settings.trainer_service_account, created))
        _apply(ctx, dataset, body, plan)
        ctx.dataset_reconciled(namespace, name, body)
        ready = get_condition(plan.status.conditions, "Ready")
        ctx.metrics.dataset_ready(dataset.metadata.uid or name, ready.status.value if ready else None, namespace, name)
        return plan.requeue_after
    logger.info("Dataset %s/%s keeps changing under the operator; trying again shortly", namespace, name)
    return 1.0


def observe_dataset(ctx: Context, dataset: Dataset, now: Any) -> DatasetObserved:
    ns = dataset.metadata.namespace or "default"
    source = dataset.spec.source
    inline = None
    fingerprint = None
    if source.config_map_ref is not None:
        cm = ctx.cluster.get("ConfigMap", ns, source.config_map_ref.name)
        if cm is None:
            return DatasetObserved(source_error=("ConfigMapNotFound", f'ConfigMap "{source.config_map_ref.name}" '
                                                                       f"not found in namespace {ns}"))
        data = cm.get("data") or {}
        ref_key = source.config_map_ref.key
        if ref_key is not None and ref_key not in data:
            return DatasetObserved(source_error=("ConfigMapKeyNotFound", f'ConfigMap "{source.config_map_ref.name}" '
                                                                          f'has no key "{ref_key}"'))
        inline = data.get(ref_key) if ref_key else next(iter(data.values()), "")
        fingerprint = "sha256:" + hashlib.sha256((inline or "").encode()).hexdigest()[:16]
    elif dataset.spec.revision is None:
        fingerprint = _cached_fingerprint(ctx, dataset)
    backend = ctx.validation_for(dataset_backend(dataset, ctx.settings))
    key = validation_key(dataset, fingerprint, now)
    validation, others = backend.observe(dataset, key)
    return DatasetObserved(fingerprint=fingerprint, validation=validation, other_validations=others,
                           inline_data=inline)


def _cached_fingerprint(ctx: Context, dataset: Dataset) -> Optional[str]:
    """Content hash of a source the operator can read, recomputed once per refreshInterval (or
    once per spec generation when no interval is set)."""
    ident = (dataset.metadata.namespace or "default", dataset.metadata.name)
    interval = duration_seconds(dataset.spec.refresh_interval)
    cached = ctx.fingerprints.get(ident)
    marker = (dataset.metadata.generation, dataset.spec.source.uri)
    if cached is not None and cached[0] == marker and (interval is None or time.monotonic() - cached[2] < interval):
        return cached[1]
    # a path the policy refuses is not read, not even to hash it (the reconcile refuses the Dataset)
    uri = dataset.spec.source.uri
    fingerprint = fingerprint_path(uri) if path_allowed(uri, ctx.settings) else None
    ctx.fingerprints[ident] = (marker, fingerprint, time.monotonic())
    return fingerprint


def _apply(ctx: Context, dataset: Dataset, body: dict[str, Any], plan: DatasetPlan) -> None:
    backend = ctx.validation_for(dataset_backend(dataset, ctx.settings))
    events = list(plan.events)
    for action in plan.actions:
        try:
            if isinstance(action, StartValidation):
                backend.start(dataset, action)
            elif isinstance(action, DeleteValidation):
                backend.delete(dataset, action.key)
        except ApiError as e:
            logger.warning("Dataset %s/%s: %s failed: %s", dataset.metadata.namespace, dataset.metadata.name,
                           type(action).__name__, e)
            events.append(Event("Warning", "ApplyFailed", f"{type(action).__name__}: {e.message}"))
    for event in events:
        ctx.cluster.create_event(build_event(body, event.type, event.reason, event.message, utcnow(), ctx.instance))
