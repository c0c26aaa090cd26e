"""FineTuneJob: parse -> observe -> reconcile -> write status -> apply actions -> events.

Status goes first, guarded by the object's resourceVersion: a 409 means the object changed under
us, so the whole step is redone from a fresh read (no action has run yet). Actions after the
status write are idempotent and level-based, so an operator killed between the two finds the
status ahead of the world and the next reconcile creates or adopts what is missing.

The reconcile that starts a job's first run makes three writes and no read: its status (Queued,
run `<job>-r1`), the run's NetworkPolicy and the RayJob (config inside); a model check, when one
is needed, comes before it. The RayJob is not looked up before it is
created: a create answering AlreadyExists (a run a predecessor made whose status write was lost)
adopts it and the job is reconciled again at once. Only when the first reconcile starts no run is
the name looked up, so such a run is still found and adopted (or stopped) as before.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime
from typing import Any, Optional

from pydantic import ValidationError

from tailor_operator.api.v1alpha1 import Backend, Dataset, FineTuneJob, FineTuneJobStatus
from tailor_operator.backends.kuberay import KubeRayPreflight
from tailor_operator.backends.files import read_model_config
from tailor_operator.backends.local import NoCapacity
from tailor_operator.builders.events import build_event
from tailor_operator.builders.naming import run_name
from tailor_operator.builders.preflight_job import preflight_key
from tailor_operator.builders.promotion import build_inference_service_patch, build_target_config_map
from tailor_operator.cluster import ApiError, Conflict
from tailor_operator.handlers.context import Context, access_created_event, job_inputs, utcnow
from tailor_operator.metrics import bounded_reason
from tailor_operator.reconcile import JobObserved, JobPlan, reconcile_finetunejob
from tailor_operator.reconcile.plan import (
    ApplyPromotion,
    DeletePreflight,
    DeleteRun,
    Event,
    StartPreflight,
    StartRun,
    StopRun,
)
from tailor_operator.reconcile.policy import path_allowed
from tailor_operator.reconcile.rollout import InferenceServiceObserved, observe_inference_service
from tailor_operator.reconcile.search import TRIAL_STATES
from tailor_operator.reconcile.status import status_body, write_decision

logger = logging.getLogger("tailor.finetunejob")
CONFLICT_RETRIES = 5


def sync_job(ctx: Context, namespace: str, name: str) -> Optional[float]:
    """Reconcile one FineTuneJob; returns seconds until it should be looked at again (or None)."""
    key = ("FineTuneJob", namespace, name)
    body = ctx.take_body(key) or ctx.cluster.get("FineTuneJob", namespace, name)
    created: list[str] = []  # trainer objects this sync created: one event, even after a 409 and a retry
    for _ in range(CONFLICT_RETRIES):
        if body is None:
            ctx.not_found(key)
            return None
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        try:
            job = FineTuneJob.model_validate(body)
        except ValidationError as e:
            logger.error("FineTuneJob %s/%s does not parse: %s", namespace, name, e)
            ctx.job_reconciled(namespace, name, body)
            return None
        now = utcnow()
        first = job.status is None or job.status.run_count == 0
        observed = observe_job(ctx, job, probe_next=not first)
        plan = _reconcile(ctx, job, observed, now, created)
        if first and not _starts_run(plan):
            # no create will tell whether r1 exists: look it up (a run made before a lost status)
            observed = _with_next_run(ctx, job, observed)
            if observed.runs:
                plan = _reconcile(ctx, job, observed, now, created)
        written, delay, body = _write_status(ctx, job, body, plan)
        if not written:
            continue  # the object changed in a way that matters: reconcile the fresh one
        if created:
            plan.events.append(access_created_event(ctx.settings.trainer_service_account, created))
        if _apply(ctx, job, body, plan, observed):
            ctx.queue.add(key)  # adopted an existing run: reconcile again, observing it
        registry_delay, registry_news = ctx.registry.sync(job, plan.status)
        if registry_news:
            ctx.queue.add(key)  # the Registered condition changes: reconcile again to write it
        ctx.job_reconciled(namespace, name, body)
        ctx.metrics.job_phase(job.metadata.uid or name, plan.status.phase.value)
        search = plan.status.search
        ctx.metrics.search(namespace, name, search.model_dump(include=set(TRIAL_STATES)) if search else None)
        ctx.metrics.job_status(namespace, name, plan.status, job.spec.continuous_learning is not None)
        if delay is not None:
            ctx.metrics.status_writes_deferred.labels("FineTuneJob").inc()
        delays = [x for x in (plan.requeue_after, delay, registry_delay) if x is not None]
        return min(delays) if delays else None
    logger.info("FineTuneJob %s/%s keeps changing under the operator; trying again shortly", namespace, name)
    return 1.0


def _reconcile(ctx: Context, job: FineTuneJob, observed: JobObserved, now: datetime, created: list[str]) -> JobPlan:
    """reconcile_finetunejob; when the plan creates a RayJob, its pods' ServiceAccount is made
    sure of first (what was created goes to `created`), and a failure to create it is
    reconciled again as an observation."""
    plan = reconcile_finetunejob(job, observed, ctx.settings, now)
    if not any(isinstance(a, (StartRun, StartPreflight)) and a.children for a in plan.actions):
        return plan
    made, error = ctx.ensure_trainer_access(job.metadata.namespace or "default")
    created += made
    if error:
        plan = reconcile_finetunejob(job, dataclasses.replace(observed, trainer_access_error=error),
                                     ctx.settings, now)
    return plan


def _starts_run(plan: JobPlan) -> bool:
    return any(isinstance(a, StartRun) for a in plan.actions)


def _with_next_run(ctx: Context, job: FineTuneJob, observed: JobObserved) -> JobObserved:
    status = job.status or FineTuneJobStatus()
    runs = ctx.runs_for(job.spec.backend).observe(job, None, run_name(job.metadata.name, status.run_count + 1))
    return dataclasses.replace(observed, runs=runs) if runs else observed


def observe_job(ctx: Context, job: FineTuneJob, probe_next: bool = True) -> JobObserved:
    """What the reconcile needs to know. `probe_next`: also look up the run after the current one
    (False for a job whose status records no run yet: creating r1 finds out, see sync_job)."""
    ns = job.metadata.namespace or "default"
    status = job.status or FineTuneJobStatus()
    ds_body = ctx.datasets.get((ns, job.spec.dataset_ref.name)) or ctx.cluster.get(
        "Dataset", ns, job.spec.dataset_ref.name)
    dataset = None
    if ds_body is not None:
        try:
            dataset = Dataset.model_validate(ds_body)
        except ValidationError:
            logger.warning("Dataset %s/%s does not parse", ns, job.spec.dataset_ref.name)
    backend = ctx.runs_for(job.spec.backend)
    idle = status.current_run is None or status.completion_time is not None
    following = run_name(job.metadata.name, status.run_count + 1) if probe_next else None
    runs = backend.observe(job, status.current_run, following,
                           everything=idle and job.spec.ttl_seconds_after_finished is not None)
    inline = None
    if dataset is not None and dataset.spec.source.config_map_ref is not None:
        ref = dataset.spec.source.config_map_ref
        cm = ctx.cluster.get("ConfigMap", ns, ref.name) or {}
        data = cm.get("data") or {}
        inline = data.get(ref.key) if ref.key else next(iter(data.values()), None)
    eval_dataset, eval_inline = _eval_dataset(ctx, job)
    allowed = path_allowed(job.spec.base_model.uri, ctx.settings)  # else refused: not read at all
    model_config = read_model_config(job.spec.base_model.uri) if idle and allowed else None
    slots = ctx.local.free_slots() if job.spec.backend is Backend.local else None
    preflight, other_preflights = None, ()
    # read only when a run may start (first run, spec edit, continuous learning): GETs stay O(1)
    may_start = status.run_count == 0 or job.spec.continuous_learning is not None \
        or job.metadata.generation != status.run_generation
    if job.spec.backend is Backend.kuberay and ctx.settings.model_preflight and idle and may_start \
            and model_config is None:
        preflight, other_preflights = KubeRayPreflight(ctx.cluster).observe(
            job, preflight_key(job, ctx.settings.trainer_image))
    target_uri, isvc = _observe_target(ctx, job)
    return JobObserved(dataset=dataset, runs=runs, inline_data=inline, model_config=model_config,
                       eval_dataset=eval_dataset, eval_inline_data=eval_inline,
                       local_slots=slots, target_model_uri=target_uri, inference_service=isvc, preflight=preflight,
                       other_preflights=other_preflights, registry=ctx.registry.observed(job))


def _eval_dataset(ctx: Context, job: FineTuneJob) -> tuple[Optional[Dataset], Optional[str]]:
    """The fixed evaluation set (spec.evaluation.datasetRef) and its configMapRef data, if any
    (from the watch cache, as the training Dataset)."""
    ref = job.spec.evaluation.dataset_ref
    if ref is None:
        return None, None
    ns = job.metadata.namespace or "default"
    body = ctx.datasets.get((ns, ref.name)) or ctx.cluster.get("Dataset", ns, ref.name)
    try:
        dataset = Dataset.model_validate(body) if body is not None else None
    except ValidationError:
        logger.warning("Dataset %s/%s does not parse", ns, ref.name)
        return None, None
    if dataset is None or dataset.spec.source.config_map_ref is None:
        return dataset, None
    cm_ref = dataset.spec.source.config_map_ref
    data = (ctx.cluster.get("ConfigMap", ns, cm_ref.name) or {}).get("data") or {}
    return dataset, (data.get(cm_ref.key) if cm_ref.key else next(iter(data.values()), None))


def _observe_target(ctx: Context, job: FineTuneJob) -> tuple[Optional[str], Optional[InferenceServiceObserved]]:
    """What the promotion target points at, and the InferenceService (spec and status) if it is one."""
    cl = job.spec.continuous_learning
    target = cl.promotion.target if cl is not None else None
    if target is None or job.status is None or job.status.champion is None:
        return None, None
    ns = job.metadata.namespace
    if target.config_map is not None:
        cm = ctx.cluster.get("ConfigMap", ns, target.config_map.name) or {}
        return (cm.get("data") or {}).get(target.config_map.key), None
    assert target.inference_service is not None
    isvc = observe_inference_service(ctx.cluster.get("InferenceService", ns, target.inference_service.name))
    return (isvc.storage_uri if isvc is not None else None), isvc


def _same_inputs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two versions of the object that reconcile to the same plan (e.g. only labels changed)."""
    return job_inputs(a) == job_inputs(b)


def _write_status(ctx: Context, job: FineTuneJob, body: dict[str, Any],
                  plan: JobPlan) -> tuple[bool, Optional[float], Optional[dict[str, Any]]]:
    """Write the planned status unless only progress changed within the rate limit (then: a delay).
    Returns (done, delay, latest body). On 409 the object is re-read: if only what the reconcile
    ignores changed (labels, annotations), the same status is written again on the new version;
    otherwise done is False and the caller reconciles the fresh object."""
    old = status_body(job.status or FineTuneJobStatus())
    new = status_body(plan.status)
    uid = job.metadata.uid or job.metadata.name
    write, delay = write_decision(old, new, ctx.last_write.get(uid), time.monotonic(),
                                  ctx.settings.status_min_interval_seconds)
    if not write:
        return True, delay, body
    for _ in range(CONFLICT_RETRIES):
        try:
            written = ctx.cluster.replace_status({**body, "status": new})
            ctx.last_write[uid] = time.monotonic()
            return True, delay, written or body
        except Conflict:
            ctx.metrics.status_conflicts.labels("FineTuneJob").inc()
            fresh = ctx.cluster.get("FineTuneJob", job.metadata.namespace, job.metadata.name)
            logger.info("conflict writing status of %s/%s", job.metadata.namespace, job.metadata.name)
            if fresh is None or not _same_inputs(body, fresh):
                return False, None, fresh
            body = fresh
    return False, None, ctx.cluster.get("FineTuneJob", job.metadata.namespace, job.metadata.name)


def _apply(ctx: Context, job: FineTuneJob, body: dict[str, Any], plan: JobPlan, observed: JobObserved) -> bool:
    """Carry out the plan's actions, then write its events. True when a StartRun found its run
    already there (adopted): the caller reconciles again, now observing it."""
    backend_name = job.spec.backend.value
    backend = ctx.runs_for(job.spec.backend)
    events = list(plan.events)
    adopted = False
    for action in plan.actions:
        try:
            if isinstance(action, StartRun):
                if backend.start(job, action):
                    ctx.metrics.runs_started.labels(backend_name).inc()
                elif action.run not in observed.runs:
                    adopted = True
                    logger.info("%s/%s: run %s already existed; adopting it", job.metadata.namespace,
                                job.metadata.name, action.run)
            elif isinstance(action, StopRun):
                backend.stop(job, action.run)
            elif isinstance(action, DeleteRun):
                backend.delete(job, action.run)
            elif isinstance(action, ApplyPromotion):
                _promote(ctx, job, action)
            elif isinstance(action, StartPreflight):
                KubeRayPreflight(ctx.cluster).start(action)
            elif isinstance(action, DeletePreflight):
                KubeRayPreflight(ctx.cluster).delete(job.metadata.namespace or "default", action.key)
        except NoCapacity as e:
            logger.info("%s/%s: %s", job.metadata.namespace, job.metadata.name, e)
        except ApiError as e:
            logger.warning("%s/%s: %s failed: %s", job.metadata.namespace, job.metadata.name,
                           type(action).__name__, e)
            events.append(_failure_event(action, e))
    for event in events:
        ctx.cluster.create_event(build_event(body, event.type, event.reason, event.message, utcnow(),
                                             ctx.instance))
        _count(ctx, job, plan, observed, event.reason, backend_name)
    return adopted


def _failure_event(action: Any, error: ApiError) -> Event:
    reason = "PromotionFailed" if isinstance(action, ApplyPromotion) else "ApplyFailed"
    return Event("Warning", reason, f"{type(action).__name__} {getattr(action, 'run', '')}: {error.message}")


def _promote(ctx: Context, job: FineTuneJob, action: ApplyPromotion) -> None:
    ns = job.metadata.namespace
    target = action.target
    if target.config_map is not None:
        body = build_target_config_map(job, target, action.run, action.model_uri)
        patch = {"metadata": {"annotations": body["metadata"]["annotations"]}, "data": body["data"]}
        if ctx.cluster.get("ConfigMap", ns, target.config_map.name) is None:
            try:
                ctx.cluster.create(body)
                return
            except Conflict:  # created since the read (another writer, or our own retried create)
                pass
        ctx.cluster.merge_patch("ConfigMap", ns, target.config_map.name, patch)
    elif target.inference_service is not None:
        ctx.cluster.merge_patch("InferenceService", ns, target.inference_service.name,
                                build_inference_service_patch(action.run, action.model_uri,
                                                              action.canary_traffic_percent, action.manage_canary))


def _count(ctx: Context, job: FineTuneJob, plan: JobPlan, observed: JobObserved, reason: str,
           backend: str) -> None:
    """Metrics follow the transitions the events announce (each happens once per run)."""
    st = plan.status
    m = ctx.metrics
    duration = None
    if st.start_time and st.completion_time:
        duration = (st.completion_time - st.start_time).total_seconds()
    if reason == "RunSucceeded":
        m.runs_succeeded.labels(backend).inc()
        if duration is not None:
            m.run_duration.labels(backend, "succeeded").observe(duration)
        run = observed.runs.get(st.current_run or "")
        tokens = run.result.tokens_trained if run is not None and run.result is not None else None
        if tokens is not None:
            m.tokens.labels(backend).inc(tokens)
        if st.metrics is not None:
            m.eval_metrics(job.metadata.namespace or "", job.metadata.name,
                           st.metrics.model_dump(by_alias=True, exclude_none=True))
    elif reason == "RunFailed":
        m.runs_failed.labels(backend, bounded_reason(st.error.reason if st.error else "")).inc()
        if duration is not None:
            m.run_duration.labels(backend, "failed").observe(duration)
    elif reason == "AttemptFailed":
        m.retries.labels(backend, bounded_reason(st.error.reason if st.error else "")).inc()
    elif reason == "Promoted":
        m.promotions.labels("promoted").inc()
    elif reason == "NotPromoted":
        m.promotions.labels("rejected").inc()


def cleanup_job(ctx: Context, namespace: str, name: str, uid: Optional[str]) -> None:
    """The local backend's finalizer: stop the job's trainer processes and remove their work
    directories (nothing in the cluster to delete: owner references cover that), then forget it."""
    key = ("FineTuneJob", namespace, name)
    ctx.queue.run_exclusive(key, lambda: ctx.local.cleanup(namespace, name))
    ctx.job_gone(namespace, name, uid or name)
    logger.info("cleaned up local runs of FineTuneJob %s/%s", namespace, name)
