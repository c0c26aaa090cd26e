"""reconcile_finetunejob(job, observed, settings, now) -> JobPlan: every FineTuneJob decision, pure.

Level-based: the same inputs always give the same plan, and applying a plan twice is harmless
(children are created-or-adopted by deterministic name). The status is the operator's memory:
`runCount`/`currentRun`/`attempts` say which run and attempt should exist; `completionTime` set
means the current run is over; the `Retrying` condition's transition time dates a backoff.

Spec changes while a run is active: lifecycle fields (suspend, backoffLimit, activeDeadlineSeconds,
progressDeadlineSeconds, ttlSecondsAfterFinished, continuousLearning) apply at once; the run itself continues with the
config it started with. `runGeneration` is the generation the current run started from (or
the latest one the operator had nothing to do for); a Failed job whose spec changed since
(`generation != runGeneration`) starts a new run, and continuous learning applies the new spec
to its next run. See docs/operator.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Optional

from pydantic import ValidationError

from tailor_operator.api.v1alpha1 import (
    Artifacts,
    Backend,
    ChampionStatus,
    Dataset,
    EvalMetrics,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    HistoryEntry,
    JobError,
    Phase,
    Progress,
    Promotion,
)
from tailor_operator.builders.configmaps import build_config_map, render_config
from tailor_operator.builders.naming import run_name
from tailor_operator.builders.networkpolicy import build_run_network_policy
from tailor_operator.builders.preflight_job import build_preflight_config_map, build_preflight_job, preflight_key
from tailor_operator.builders.rayjob import build_rayjob, config_inline, secret_refs
from tailor_operator.builders.trainer_access import ACCESS_FAILED
from tailor_operator.builders.trainer_config import build_trainer_config, run_output_uri
from tailor_operator.reconcile.conditions import FALSE, TRUE, UNKNOWN, get_condition, is_true, set_condition
from tailor_operator.reconcile.cron import next_fire
from tailor_operator.reconcile.evalset import eval_set_blocks
from tailor_operator.reconcile.health import job_health
from tailor_operator.reconcile.observe import (
    RunObservation,
    RunState,
    ValidationObservation,
    missing_secret_name,
    parse_time,
)
from tailor_operator.reconcile.plan import (
    DeletePreflight,
    DeleteRun,
    Event,
    JobPlan,
    StartPreflight,
    StartRun,
    StopRun,
    sooner,
)
from tailor_operator.reconcile.pinning import apply_pin
from tailor_operator.reconcile.policy import check_job_policy
from tailor_operator.reconcile.promotion import decide_run, record_evaluation
from tailor_operator.reconcile.registration import RegistryObserved, registry_condition
from tailor_operator.reconcile.rollout import InferenceServiceObserved, reconcile_target, set_champion
from tailor_operator.reconcile.search import finished_message, search_status, started_message
from tailor_operator.reconcile.semantic import check_target_modules
from tailor_operator.reconcile.settings import OperatorSettings
from tailor_trainer.config import ChampionRef, FieldError
from tailor_trainer.contract import RESULT_FILE, STAGE_ORDER, ProgressDoc

# A retry cannot fix these: the same config fails the same way.
NON_RETRYABLE = frozenset({"InvalidSpec", "DataInvalid", "GateFailed", "Diverged", "DeadlineExceeded",
                           "UnknownTargetModules", "PolicyViolation", "DatasetChanged",
                           # a checkpoint that verifies but would run code: someone rewrote it
                           "CheckpointUnsafe"})
# Pod problems that hold a run back (shown in error while queued).
WAITING_PROBLEMS = frozenset({"Unschedulable", "ImagePullBackOff", "CreateContainerConfigError", "CredentialsError",
                              "CrashLoopBackOff", "OOMKilled", "ReplicaFailure"})
DEFAULT_HISTORY = 10


@dataclass(frozen=True)
class JobObserved:
    """Everything the reconcile needs to know about the world around one FineTuneJob."""

    dataset: Optional[Dataset] = None
    """The referenced Dataset; None when it does not exist."""
    runs: dict[str, RunObservation] = field(default_factory=dict)
    """Runs that have child objects (RayJob or local process), by run name."""
    inline_data: Optional[str] = None
    """Contents of the Dataset's configMapRef source, when it has one."""
    model_config: Optional[dict[str, Any]] = None
    """The base model's config.json when the operator can read it (local paths)."""
    local_slots: Optional[int] = None
    """Free local-run slots (local backend); None when not limited."""
    target_model_uri: Optional[str] = None
    """What the promotion target points at now (None when missing or unset)."""
    eval_dataset: Optional[Dataset] = None
    """The fixed evaluation set (spec.evaluation.datasetRef); None when unset or not found."""
    eval_inline_data: Optional[str] = None
    """Contents of the evaluation Dataset's configMapRef source, when it has one."""
    inference_service: Optional[InferenceServiceObserved] = None
    """The InferenceService target as observed (spec and KServe's status), when there is one."""
    registry: Optional[RegistryObserved] = None
    """The outcome of the last model registry sync (spec.registry), when there was one."""
    trainer_access_error: Optional[str] = None
    """Why the trainer pods' ServiceAccount/Role/RoleBinding cannot be created (kuberay), if so:
    the handler finds out when a plan would create a RayJob, and reconciles again with it."""
    preflight: Optional[ValidationObservation] = None
    """The model check (kuberay) for the current spec, when one exists (builders/preflight_job.py)."""
    other_preflights: tuple[str, ...] = ()
    """Model checks of earlier specs, to delete."""


def reconcile_finetunejob(job: FineTuneJob, observed: JobObserved, settings: OperatorSettings,
                          now: datetime) -> JobPlan:
    st = (job.status or FineTuneJobStatus()).model_copy(deep=True)
    if st.run_generation is None and st.run_count > 0:  # a status written before runGeneration existed,
        st.run_generation = st.observed_generation       # when observedGeneration meant it
    plan = JobPlan(status=st)
    _adopt(job, st, observed, plan)
    _dataset_condition(job, st, observed.dataset, plan, now)
    run_active = st.current_run is not None and st.completion_time is None
    obs = observed.runs.get(st.current_run) if st.current_run else None

    if job.spec.suspend:
        _suspend(job, st, obs, run_active, plan, now)
    else:
        if is_true(st.conditions, "Suspended"):
            st.conditions = set_condition(st.conditions, "Suspended", FALSE, "Resumed",
                                          "spec.suspend is false", now)
            plan.events.append(Event("Normal", "Resumed", "resumed" + (
                f"; run {st.current_run} continues from its last checkpoint" if run_active else "")))
            if run_active:
                st.start_time = now  # like a Job, the deadline restarts on resume
        if run_active:
            _drive_run(job, st, obs, observed, settings, now, plan)
        else:
            _maybe_start_run(job, st, observed, settings, now, plan)
    _expire_finished(job, st, observed, now, plan)
    apply_pin(job, st, plan, now)
    reconcile_target(job, st, observed.target_model_uri, observed.inference_service, settings.active_poll_seconds,
                     now, plan)
    registry_condition(job, st, observed.registry, bool(settings.registry_uri), now)
    st.observed_generation = job.metadata.generation  # every decision above was made on this spec
    job_health(st, job.metadata.generation, now)
    plan.status = st
    return plan


# ----------------------------------------------------------------------------------- pieces


def _adopt(job: FineTuneJob, st: FineTuneJobStatus, observed: JobObserved, plan: JobPlan) -> None:
    """A run newer than the status knows: the operator died between creating it and writing status."""
    newer = [o for o in observed.runs.values() if o.exists and o.number > st.run_count]
    if not newer:
        return
    o = max(newer, key=lambda r: r.number)
    st.run_count = o.number
    st.current_run = o.run
    st.attempts = o.attempt
    st.dataset_revision = o.dataset_revision
    ds = observed.dataset.status if observed.dataset is not None else None
    # the run's config was built with the Dataset's fingerprint if its status still names that revision
    st.dataset_fingerprint = ds.content_fingerprint if ds is not None and ds.revision == o.dataset_revision else None
    st.start_time = o.created_at or st.start_time
    st.completion_time = None
    st.stage, st.progress, st.metrics, st.artifacts, st.error = None, None, None, None, None
    st.search = None
    st.run_generation = job.metadata.generation
    st.phase = Phase.queued
    plan.events.append(Event("Normal", "Adopted", f"found run {o.run} (attempt {o.attempt}) created before "
                                                   "a restart; adopting it instead of creating another"))


def _dataset_condition(job: FineTuneJob, st: FineTuneJobStatus, dataset: Optional[Dataset], plan: JobPlan,
                       now: datetime) -> None:
    name = job.spec.dataset_ref.name
    if dataset is None:
        status, reason = FALSE, "DatasetNotFound"
        message = f'Dataset "{name}" not found in namespace {job.metadata.namespace or "default"}'
    else:
        ready = get_condition((dataset.status.conditions if dataset.status else []), "Ready")
        if ready is not None and ready.status is TRUE and dataset.status and dataset.status.revision:
            status, reason = TRUE, "Validated"
            splits = dataset.status.splits
            counts = f" (train {splits.train}, validation {splits.validation}, test {splits.test})" if splits else ""
            message = f"revision {dataset.status.revision}: {dataset.status.rows or 0} rows{counts}"
        elif ready is None or ready.status is UNKNOWN:
            status, reason = FALSE, "Validating"
            message = f'waiting for Dataset "{name}" to be validated'
        else:
            status, reason = FALSE, ready.reason or "DatasetNotReady"
            message = f'Dataset "{name}" is not Ready: {ready.message}'
    old = get_condition(st.conditions, "DataValidated")
    if old is None or old.reason != reason:
        if status is FALSE and reason != "Validating":
            plan.events.append(Event("Warning", reason, message))
        elif status is TRUE and old is not None:
            plan.events.append(Event("Normal", "DataValidated", message))
    st.conditions = set_condition(st.conditions, "DataValidated", status, reason, message, now,
                                  job.metadata.generation)


def _dataset_ready(st: FineTuneJobStatus) -> bool:
    return is_true(st.conditions, "DataValidated")


def _suspend(job: FineTuneJob, st: FineTuneJobStatus, obs: Optional[RunObservation], run_active: bool,
             plan: JobPlan, now: datetime) -> None:
    if run_active and obs is not None and obs.exists and not obs.terminating:
        plan.actions.append(StopRun(st.current_run or "", "Suspended"))
    message = "spec.suspend is true; nothing runs until it is unset"
    if run_active:
        message = f"spec.suspend is true; run {st.current_run} stopped, its checkpoints are kept"
        st.conditions = set_condition(st.conditions, "Running", FALSE, "Suspended", message, now)
    if not is_true(st.conditions, "Suspended"):
        plan.events.append(Event("Normal", "Suspended", message))
    st.conditions = set_condition(st.conditions, "Suspended", TRUE, "Suspended", message, now)
    if run_active or st.current_run is None or job.spec.continuous_learning is not None:
        st.phase = Phase.suspended


def _drive_run(job: FineTuneJob, st: FineTuneJobStatus, obs: Optional[RunObservation], observed: JobObserved,
               settings: OperatorSettings, now: datetime, plan: JobPlan) -> None:
    spec = job.spec
    run = st.current_run or ""
    attempt = max(st.attempts, 1)
    retrying = get_condition(st.conditions, "Retrying")
    backing_off = retrying is not None and retrying.status is TRUE

    deadline = spec.active_deadline_seconds
    if deadline and st.start_time and not (obs is not None and obs.state.is_finished):
        left = (st.start_time + timedelta(seconds=deadline) - now).total_seconds()
        if left <= 0:
            if obs is not None and obs.exists and not obs.terminating:
                plan.actions.append(StopRun(run, "DeadlineExceeded"))
            _finish(job, st, None, settings, now, plan, succeeded=False, reason="DeadlineExceeded",
                    message=f"run {run} was active longer than activeDeadlineSeconds={deadline}")
            return
        plan.requeue_after = sooner(plan.requeue_after, left)

    if obs is None or not obs.exists:
        if backing_off and retrying is not None and retrying.last_transition_time is not None:
            retry_at = retrying.last_transition_time + timedelta(seconds=settings.backoff_seconds(attempt - 1))
            if now < retry_at:
                st.phase = Phase.pending
                plan.requeue_after = sooner(plan.requeue_after, (retry_at - now).total_seconds())
                return
        if not _start(job, st, run, attempt, observed, settings, now, plan):
            return
        if backing_off:
            st.conditions = set_condition(st.conditions, "Retrying", FALSE, "Retried",
                                          f"attempt {attempt} started", now)
            plan.events.append(Event("Normal", "Retrying", f"starting attempt {attempt} of run {run} "
                                                           "(resumes from its last checkpoint)"))
        return

    if obs.terminating or obs.attempt != attempt:
        # An earlier attempt (or a stopped run) is still going away; recreate once it is gone.
        if not obs.terminating:
            plan.actions.append(StopRun(run, "StaleAttempt"))
        if backing_off:
            st.phase = Phase.pending
        plan.requeue_after = sooner(plan.requeue_after, 2.0)
        return

    if obs.state is RunState.pending:
        st.phase = Phase.queued
        old = get_condition(st.conditions, "Running")
        if obs.reason == "CredentialsError":
            message = _credentials_message(job, observed.dataset, obs.message)
            waited = max((now - obs.problem_since).total_seconds(), 0.0) if obs.problem_since else 0.0
            if waited >= settings.credentials_grace_seconds:
                _attempt_failed(job, st, obs, settings, now, plan, attempt, reason=obs.reason,
                                message=f"{message}; waited {int(waited)}s")
                return
            obs = replace(obs, message=message)
            plan.requeue_after = sooner(plan.requeue_after, settings.credentials_grace_seconds - waited)
        if obs.reason in WAITING_PROBLEMS:
            st.error = JobError(reason=obs.reason, message=obs.message[:4096])
            if old is None or old.reason != obs.reason:
                plan.events.append(Event("Warning", obs.reason, obs.message))
        else:
            st.error = None
        if not (obs.reason == "Starting" and old is not None and old.reason == "Starting"):
            st.conditions = set_condition(st.conditions, "Running", FALSE, obs.reason, obs.message, now)
        plan.requeue_after = sooner(plan.requeue_after, settings.active_poll_seconds)
    elif obs.state is RunState.running:
        _fold_progress(st, obs.progress)
        _fold_search(job, st, obs.progress, plan)
        stalled = _stalled(spec, st, obs, now)
        if stalled is not None:
            _attempt_failed(job, st, obs, settings, now, plan, attempt, reason="ProgressDeadlineExceeded",
                            message=stalled)
            return
        st.phase = Phase.evaluating if st.stage == "evaluate" else Phase.running
        st.error = None
        # Stable per stage (progress lives in status.progress), so progress alone stays rate-limited.
        where = f"stage {st.stage}" if st.stage else "started"
        if not is_true(st.conditions, "Running"):
            plan.events.append(Event("Normal", "Running", f"run {run} attempt {attempt} is running"))
        st.conditions = set_condition(st.conditions, "Running", TRUE, "Running",
                                      f"run {run} attempt {attempt}: {where}", now)
        plan.requeue_after = sooner(plan.requeue_after, settings.active_poll_seconds)
    elif obs.state is RunState.succeeded:
        _finish(job, st, obs, settings, now, plan, succeeded=True, reason="Succeeded", message=obs.message)
    elif obs.state is RunState.failed:
        _attempt_failed(job, st, obs, settings, now, plan, attempt, reason=obs.reason, message=obs.message)


def _attempt_failed(job: FineTuneJob, st: FineTuneJobStatus, obs: RunObservation, settings: OperatorSettings,
                    now: datetime, plan: JobPlan, attempt: int, *, reason: str, message: str) -> None:
    """Retry from the last checkpoint within backoffLimit, else fail the job."""
    spec, run = job.spec, st.current_run or ""
    if reason not in NON_RETRYABLE and attempt <= spec.backoff_limit:
        delay = settings.backoff_seconds(attempt)
        st.attempts = attempt + 1
        st.phase = Phase.pending
        st.error = JobError(reason=reason[:253], message=f"attempt {attempt}: {message}"[:4096])
        text = (f"attempt {attempt} of {spec.backoff_limit + 1} failed ({reason}: {message}); "
                f"attempt {attempt + 1} starts in {delay:g}s from the last checkpoint")
        st.conditions = set_condition(st.conditions, "Running", FALSE, reason, message, now)
        st.conditions = set_condition(st.conditions, "Retrying", TRUE, "BackingOff", text, now)
        plan.actions.append(StopRun(run, "Retry"))
        plan.events.append(Event("Warning", "AttemptFailed", text))
        plan.requeue_after = sooner(plan.requeue_after, delay)
    else:
        if obs.state is not RunState.failed:  # still running (stalled): stop what is left of it
            plan.actions.append(StopRun(run, reason))
        _finish(job, st, obs, settings, now, plan, succeeded=False, reason=reason, message=message)


def _credentials_message(job: FineTuneJob, dataset: Optional[Dataset], message: str) -> str:
    """The pod's missing-Secret message, with the field(s) that name that Secret."""
    name = missing_secret_name(message)
    fields = [f for role, ref in secret_refs(job, dataset) if ref == name
              for f in (_SECRET_FIELDS[role].format(dataset=dataset.metadata.name if dataset else "?"),)]
    where = f" (named by {', '.join(fields)})" if fields else ""
    return f"{message}{where}; create the Secret in namespace {job.metadata.namespace} or fix the reference"


_SECRET_FIELDS = {"model": "spec.baseModel.secretRef", "dataset": "Dataset {dataset} spec.source.secretRef",
                  "output": "spec.output.secretRef"}


def _stalled(spec: FineTuneJobSpec, st: FineTuneJobStatus, obs: RunObservation, now: datetime) -> Optional[str]:
    """Why a running attempt counts as hung: its progress document (or, before the trainer wrote
    one, the Running condition) has not changed for progressDeadlineSeconds; else None."""
    limit = spec.progress_deadline_seconds
    running = get_condition(st.conditions, "Running")
    since = [t for t in (parse_time(obs.progress.updated_at if obs.progress else None),
                         running.last_transition_time if running is not None and running.status is TRUE else None)
             if t is not None]
    if not since:
        return None  # running from this reconcile on
    quiet = (now - max(since)).total_seconds()
    if quiet < limit:
        return None
    doc = obs.progress or ProgressDoc()
    last = f"stage {doc.stage or 'none yet'}"
    if doc.step is not None:
        last += f", step {doc.step}" + (f"/{doc.total_steps}" if doc.total_steps is not None else "")
    return (f"run {st.current_run} attempt {max(st.attempts, 1)} reported no progress for {int(quiet)}s "
            f"(progressDeadlineSeconds={limit}); last: {last}")


def _start(job: FineTuneJob, st: FineTuneJobStatus, run: str, attempt: int, observed: JobObserved,
           settings: OperatorSettings, now: datetime, plan: JobPlan) -> bool:
    """Plan the creation of the run's children for `attempt`; False when it cannot start yet."""
    dataset = observed.dataset
    if dataset is None:
        st.phase = Phase.pending
        return False
    if _access_blocked(job, st, observed, settings, now, plan):
        return False
    if st.error is not None and st.error.reason == ACCESS_FAILED:
        st.error = None
    if job.spec.backend is Backend.local and observed.local_slots is not None and observed.local_slots <= 0:
        st.phase = Phase.queued
        st.conditions = set_condition(st.conditions, "Running", FALSE, "WaitingForLocalSlot",
                                      f"all {settings.local_max_concurrent} local run slot(s) are busy", now)
        plan.requeue_after = sooner(plan.requeue_after, settings.active_poll_seconds)
        return False
    if eval_set_blocks(job, st, observed.eval_dataset, dataset, settings.active_poll_seconds, plan):
        return False
    champion = None
    if st.champion is not None and st.champion.model:
        champion = ChampionRef(run=st.champion.run, model_uri=st.champion.model, metrics=st.champion.metrics)
    config = build_trainer_config(job, dataset, run, attempt=attempt, dataset_revision=st.dataset_revision,
                                  dataset_fingerprint=st.dataset_fingerprint, inline_data=observed.inline_data,
                                  champion=champion, eval_dataset=observed.eval_dataset,
                                  eval_inline_data=observed.eval_inline_data)
    children: tuple[dict[str, Any], ...] = ()
    if job.spec.backend is Backend.kuberay:
        # One create starts the run: the config rides on the RayJob (a ConfigMap only when too
        # large); the trainer creates its progress ConfigMap itself, which the operator then owns.
        rendered = render_config(config)
        inline = config_inline(rendered)
        rayjob = build_rayjob(job, dataset, run, number=st.run_count, attempt=attempt,
                              dataset_revision=st.dataset_revision, config_hash=config.config_hash(),
                              options=settings.rayjob_options(), config_json=rendered if inline else None)
        children = (rayjob,) if inline else (build_config_map(job, run, config), rayjob)
        if settings.ray_network_policy:
            children = (build_run_network_policy(job, run, settings.network_policy_ingress()),) + children
    plan.actions.append(StartRun(run=run, attempt=attempt, config=config, number=st.run_count, children=children))
    st.phase = Phase.queued
    st.conditions = set_condition(st.conditions, "Running", FALSE, "Starting",
                                  f"run {run} attempt {attempt} created; waiting for it to start", now)
    plan.requeue_after = sooner(plan.requeue_after, settings.active_poll_seconds)
    return True


def _access_blocked(job: FineTuneJob, st: FineTuneJobStatus, observed: JobObserved, settings: OperatorSettings,
                    now: datetime, plan: JobPlan) -> bool:
    """The trainer pods' ServiceAccount cannot be created: no RayJob (its pods would never be
    created); say which permission is missing and try again shortly."""
    message = observed.trainer_access_error
    if job.spec.backend is not Backend.kuberay or not message:
        return False
    old = get_condition(st.conditions, "Running")
    if old is None or old.reason != ACCESS_FAILED:
        plan.events.append(Event("Warning", ACCESS_FAILED, message))
    st.phase = Phase.pending
    st.error = JobError(reason=ACCESS_FAILED, message=message[:4096])
    st.conditions = set_condition(st.conditions, "Running", FALSE, ACCESS_FAILED, message, now)
    plan.requeue_after = sooner(plan.requeue_after, settings.active_poll_seconds)
    return True


def _start_reason(job: FineTuneJob, st: FineTuneJobStatus, dataset: Optional[Dataset],
                  now: datetime) -> tuple[Optional[str], Optional[float]]:
    """Why a new run should start now (None: it should not), and when to look again."""
    if st.run_count == 0:
        return "FirstRun", None
    if st.phase is Phase.failed and job.metadata.generation != st.run_generation:
        return "SpecChanged", None
    cl = job.spec.continuous_learning
    if cl is None:
        return None, None
    revision = dataset.status.revision if dataset is not None and dataset.status else None
    if cl.trigger.on_dataset_revision and revision and revision != st.dataset_revision and _dataset_ready(st):
        return "DatasetRevision", None
    if cl.trigger.schedule:
        fire = next_fire(cl.trigger.schedule, st.start_time or now)
        if now >= fire:
            return "Schedule", None
        return None, (fire - now).total_seconds()
    return None, None


def _maybe_start_run(job: FineTuneJob, st: FineTuneJobStatus, observed: JobObserved,
                     settings: OperatorSettings, now: datetime, plan: JobPlan) -> None:
    why, later = _start_reason(job, st, observed.dataset, now)
    plan.requeue_after = sooner(plan.requeue_after, later)
    generation = job.metadata.generation
    if why is None:
        st.run_generation = generation  # nothing to do for this spec until the next trigger
        return
    first = st.run_count == 0
    if _policy_refused(job, st, settings, now, plan):
        return
    if not _dataset_ready(st):
        dv = get_condition(st.conditions, "DataValidated")
        if first:
            st.phase = Phase.pending if dv is None or dv.reason == "DatasetNotFound" else Phase.validating
            waiting = dv is not None and dv.reason in ("Validating",)
            st.error = None if waiting or dv is None else JobError(
                reason=dv.reason, message=dv.message, field="spec.datasetRef.name")
        return
    problem = check_target_modules(job, observed.model_config)
    if problem is not None:
        _spec_problem(st, plan, problem.reason, problem.message, problem.field, generation, now)
        return
    invalid = _config_problem(job, observed)
    if invalid is not None:
        _spec_problem(st, plan, "InvalidSpec", invalid[0], invalid[1], generation, now)
        return
    if _preflight_blocks(job, st, observed, settings, now, plan):
        return
    if job.spec.backend is Backend.local and observed.local_slots is not None and observed.local_slots <= 0:
        st.phase = Phase.queued
        st.conditions = set_condition(st.conditions, "Running", FALSE, "WaitingForLocalSlot",
                                      f"all {settings.local_max_concurrent} local run slot(s) are busy", now)
        plan.requeue_after = sooner(plan.requeue_after, settings.active_poll_seconds)
        return
    if _access_blocked(job, st, observed, settings, now, plan):
        return
    if eval_set_blocks(job, st, observed.eval_dataset, observed.dataset, settings.active_poll_seconds, plan):
        return
    number = st.run_count + 1
    run = run_name(job.metadata.name, number)
    dataset = observed.dataset
    st.run_count = number
    st.current_run = run
    st.attempts = 1
    st.dataset_revision = dataset.status.revision if dataset is not None and dataset.status else None
    st.dataset_fingerprint = dataset.status.content_fingerprint if dataset is not None and dataset.status else None
    st.start_time = now
    st.completion_time = None
    st.stage, st.progress, st.metrics, st.artifacts, st.error = None, None, None, None, None
    st.search = None
    st.run_generation = generation
    st.conditions = [c for c in st.conditions if c.type not in ("Failed", "Retrying", "Evaluated")]
    _start(job, st, run, 1, observed, settings, now, plan)
    if why != "FirstRun":  # a job's first run is what creating it asks for: status says it, no event
        revision = f" on dataset revision {st.dataset_revision}" if st.dataset_revision else ""
        plan.events.append(Event("Normal", "RunStarted", f"starting run {run}{revision} ({why})"))


# TrainerConfig sections that are the FineTuneJob's spec.<same path>; `dataset.*` is the Dataset's spec
_SPEC_SECTIONS = ("adaptation", "evaluation", "hyperparameters", "resources", "search")


def _config_problem(job: FineTuneJob, observed: JobObserved) -> Optional[tuple[str, Optional[str]]]:
    """(message, field) when the job's spec and its Dataset together make no valid trainer config —
    a cross-object check no CRD rule can do (e.g. a setting an image-caption Dataset cannot honour):
    the job fails before any run (or GPU) exists, instead of every reconcile raising."""
    dataset = observed.dataset
    if dataset is None:
        return None
    try:
        build_trainer_config(job, dataset, run_name(job.metadata.name, 1),
                             dataset_revision=dataset.status.revision if dataset.status else None,
                             inline_data=observed.inline_data, eval_dataset=observed.eval_dataset,
                             eval_inline_data=observed.eval_inline_data)
    except ValidationError as err:
        first = err.errors()[0]
        inner = (first.get("ctx") or {}).get("error")
        path = [str(p) for p in first.get("loc", ())] + ([inner.field] if isinstance(inner, FieldError) else [])
        where = ".".join(path)
        message = str(inner) if isinstance(inner, FieldError) else str(first.get("msg", err))
        if where.split(".")[0] in _SPEC_SECTIONS:
            field: Optional[str] = f"spec.{where}"
        elif where.startswith("dataset."):
            field = f"Dataset {dataset.metadata.name} spec.{where.removeprefix('dataset.')}"
        else:
            field = where or None
        return f"this spec cannot train on Dataset {dataset.metadata.name}: {message}", field
    return None


def _spec_problem(st: FineTuneJobStatus, plan: JobPlan, reason: str, message: str, field: Optional[str],
                  generation: Optional[int], now: datetime) -> None:
    """The spec cannot work with this model: Failed (no run) until the spec changes."""
    if st.error is None or st.error.reason != reason or st.phase is not Phase.failed:
        plan.events.append(Event("Warning", reason, message))
    st.phase = Phase.failed
    st.error = JobError(reason=reason, message=message[:4096], field=field)
    st.conditions = set_condition(st.conditions, "Failed", TRUE, reason, message, now)
    st.run_generation = generation


# Model-check verdicts a later look may change without a spec edit: checked again after a delay.
PREFLIGHT_TRANSIENT = frozenset({"SourceUnreachable", "CredentialsError", "PreflightFailed"})


def _preflight_blocks(job: FineTuneJob, st: FineTuneJobStatus, observed: JobObserved, settings: OperatorSettings,
                      now: datetime, plan: JobPlan) -> bool:
    """kuberay: no RayJob (so no GPU) for a spec whose base model has not passed the CPU model check
    (builders/preflight_job.py). True while it runs or when it failed."""
    if job.spec.backend is not Backend.kuberay or not settings.model_preflight or observed.model_config is not None:
        return False
    key = preflight_key(job, settings.trainer_image)
    uri = job.spec.base_model.uri
    gen = job.metadata.generation
    for other in observed.other_preflights:
        plan.actions.append(DeletePreflight(other))
    v = observed.preflight if observed.preflight is not None and observed.preflight.key == key else None
    old = get_condition(st.conditions, "ModelChecked")
    if v is not None and v.finished and v.result and v.result.get("ok"):
        model = v.result.get("model") or {}
        detail = ", ".join(f"{k} {model[k]}" for k in ("modelType", "parameters", "maxPositionEmbeddings")
                           if model.get(k) is not None)
        st.conditions = set_condition(st.conditions, "ModelChecked", TRUE, "Checked",
                                      f"{uri} fits the spec ({key}" + (f"; {detail})" if detail else ")"), now, gen)
        return False
    later = plan.requeue_after
    if v is None or not v.finished or v.failure or (v.result or {}).get("reason") in PREFLIGHT_TRANSIENT \
            or not (v.result or {}).get("reason"):
        st.phase = Phase.pending  # waiting for the check (a verdict on the spec fails the job below)
        plan.requeue_after = sooner(later, settings.active_poll_seconds)
    if v is None or not v.exists:
        dataset = observed.dataset
        assert dataset is not None  # _dataset_ready passed
        config = build_trainer_config(job, dataset, run_name(job.metadata.name, st.run_count + 1),
                                      dataset_revision=dataset.status.revision if dataset.status else None,
                                      inline_data=observed.inline_data)
        children = (build_preflight_config_map(job, key, config),
                    build_preflight_job(job, key, settings.preflight_options()))
        plan.actions.append(StartPreflight(key, children))
        message = f"checking {uri} against the spec on a CPU before any GPU is requested ({key})"
        plan.events.append(Event("Normal", "CheckingModel", message))
        st.conditions = set_condition(st.conditions, "ModelChecked", UNKNOWN, "Checking", message, now, gen)
        return True
    if not v.finished:
        problem = v.problem
        if problem is None:
            message = f"checking {uri} against the spec on a CPU ({key})"
            st.conditions = set_condition(st.conditions, "ModelChecked", UNKNOWN, "Checking", message, now, gen)
            return True
        message = f"model check {key} cannot start: {problem.message}"
        if problem.reason == "CredentialsError":
            message = _credentials_message(job, observed.dataset, message)
        if old is None or old.reason != problem.reason:
            plan.events.append(Event("Warning", problem.reason, message))
        st.error = JobError(reason=problem.reason, message=message[:4096])
        st.conditions = set_condition(st.conditions, "ModelChecked", UNKNOWN, problem.reason, message, now, gen)
        return True
    result = v.result or {}
    reason = str(result.get("reason") or "PreflightFailed")
    message = str(result.get("message") or v.failure or "the model check left no verdict")
    field = result.get("field") if isinstance(result.get("field"), str) else None
    if v.failure or reason in PREFLIGHT_TRANSIENT or not result.get("reason"):
        delay = settings.backoff_max_seconds
        text = f"model check {key}: {message}; checking again in {delay:g}s"
        if old is None or old.reason != reason:
            plan.events.append(Event("Warning", reason, text))
        st.error = JobError(reason=reason, message=text[:4096], field=field)
        st.conditions = set_condition(st.conditions, "ModelChecked", FALSE, reason, text, now, gen)
        checked = old.last_transition_time if old is not None and old.status is FALSE else now
        wait = delay - (now - (checked or now)).total_seconds()
        if wait <= 0:
            plan.actions.append(DeletePreflight(key))  # the next look starts a new check
            wait = settings.active_poll_seconds
        plan.requeue_after = sooner(later, wait)
        return True
    st.conditions = set_condition(st.conditions, "ModelChecked", FALSE, reason, message, now, gen)
    _spec_problem(st, plan, reason, message, field, job.metadata.generation, now)
    plan.requeue_after = later
    return True


def _policy_refused(job: FineTuneJob, st: FineTuneJobStatus, settings: OperatorSettings, now: datetime,
                    plan: JobPlan) -> bool:
    """The spec asks for what the installation does not allow (reconcile/policy.py): no run; the
    job is Failed until its spec changes (or the operator's policy does: the check runs again)."""
    problem = check_job_policy(job, settings)
    if problem is None:
        return False
    if st.error is None or st.error.message != problem.message or st.phase is not Phase.failed:
        plan.events.append(Event("Warning", problem.reason, problem.message))
    st.phase = Phase.failed
    st.error = JobError(reason=problem.reason, message=problem.message[:4096], field=problem.field)
    st.conditions = set_condition(st.conditions, "Failed", TRUE, problem.reason, problem.message, now)
    st.run_generation = job.metadata.generation
    return True


def _fold_progress(st: FineTuneJobStatus, doc: Optional[ProgressDoc]) -> None:
    if doc is None:
        return
    if doc.known_stage:
        st.stage = doc.known_stage
    step, total = doc.step, doc.total_steps
    previous = st.progress or Progress()
    if total is None and previous.total_steps:
        # the evaluate stage reports no training steps: keep the last known ones
        step, total = previous.step, previous.total_steps
    percent = None
    if step is not None and total is not None and total > 0:
        percent = max(0, min(100, int(step * 100 / total)))
    if percent is not None and st.stage in ("train", "evaluate"):
        summary = f"{percent}% {step}/{total}"
        if st.stage == "evaluate":
            summary = f"evaluate {summary}"
    else:
        summary = st.stage
    st.progress = Progress(
        summary=summary,
        percent=percent,
        step=step,
        total_steps=total,
        epoch=doc.epoch,
        loss=doc.loss,
        tokens_per_second=doc.tokens_per_second,
        eta_seconds=int(doc.eta_seconds) if doc.eta_seconds is not None else None,
    )


def _fold_search(job: FineTuneJob, st: FineTuneJobStatus, doc: Optional[ProgressDoc], plan: JobPlan) -> None:
    """status.search from the progress document; SearchStarted the first time a run shows one."""
    if doc is None or doc.search is None:
        return
    first = st.search is None
    st.search = search_status(doc.search, job.spec.search)
    if first:
        plan.events.append(Event("Normal", "SearchStarted", started_message(st.search, job.spec.search)))


_METRIC_KEYS = {f.alias or name for name, f in EvalMetrics.model_fields.items()}
_ARTIFACT_KEYS = {f.alias or name for name, f in Artifacts.model_fields.items()}


def _finish(job: FineTuneJob, st: FineTuneJobStatus, obs: Optional[RunObservation], settings: OperatorSettings,
            now: datetime, plan: JobPlan, *, succeeded: bool, reason: str, message: str) -> None:
    run = st.current_run or ""
    result = obs.result if obs is not None else None
    metrics = dict(result.metrics) if result is not None else {}
    st.completion_time = now
    if result is not None:
        shown = {k: v for k, v in metrics.items() if k in _METRIC_KEYS}
        st.metrics = EvalMetrics.model_validate(shown) if shown else st.metrics
        artifacts = {k: v for k, v in result.artifacts.items() if k in _ARTIFACT_KEYS and v}
        artifacts.setdefault("result", f"{run_output_uri(job, run)}/evaluate/{RESULT_FILE}")
        st.artifacts = Artifacts.model_validate(artifacts)
    summary = (result.search if result is not None else None) or (
        obs.progress.search if obs is not None and obs.progress is not None else None)
    if summary is not None:
        st.search = search_status(summary, job.spec.search)
        if result is not None and result.search is not None:  # the search ran to its end
            plan.events.append(Event("Normal", "SearchFinished", finished_message(st.search)))
    cl = job.spec.continuous_learning
    entry = HistoryEntry(run=run, phase=Phase.succeeded if succeeded else Phase.failed,
                         dataset_revision=st.dataset_revision, metrics=metrics, completion_time=now,
                         config_hash=result.config_hash if result is not None else None)
    if succeeded:
        st.phase = Phase.succeeded
        st.error = None
        if st.progress and st.progress.total_steps:
            st.progress = st.progress.model_copy(update={
                "percent": 100, "step": st.progress.total_steps, "eta_seconds": 0,
                "summary": f"100% {st.progress.total_steps}/{st.progress.total_steps}"})
        st.stage = STAGE_ORDER[-1] if result is not None else st.stage
        st.conditions = set_condition(st.conditions, "Running", FALSE, "Succeeded", f"run {run} succeeded", now)
        st.conditions = set_condition(st.conditions, "Failed", FALSE, "Succeeded", "", now)
        st.conditions = set_condition(st.conditions, "Evaluated", TRUE if metrics else FALSE,
                                      "Evaluated" if metrics else "NoMetrics", _metrics_line(metrics), now)
        plan.events.append(Event("Normal", "RunSucceeded", f"run {run} succeeded: {_metrics_line(metrics)}"))
        entry.model = (st.artifacts.model if st.artifacts else None) or f"{run_output_uri(job, run)}/train/model"
        policy = cl.promotion if cl is not None else Promotion()
        decision = decide_run(policy, metrics, st.champion, result)
        record_evaluation(entry, result, entry.model)
        entry.promoted = decision.promote
        entry.reason = decision.reason
        if decision.promote:
            set_champion(job, st, ChampionStatus(run=run, dataset_revision=st.dataset_revision, model=entry.model,
                                                 metrics=metrics, promoted_at=now), now, plan)
            st.conditions = set_condition(st.conditions, "Promoted", TRUE, decision.reason,
                                          f"run {run} is the champion: {decision.message}", now)
            plan.events.append(Event("Normal", "Promoted", f"run {run} promoted: {decision.message}"))
        else:
            keep = f"champion {st.champion.run} stays" if st.champion else "no champion"
            st.conditions = set_condition(st.conditions, "Promoted", FALSE, decision.reason,
                                          f"run {run} not promoted ({decision.message}); {keep}", now)
            plan.events.append(Event("Normal", "NotPromoted", f"run {run} not promoted: {decision.message}"))
    else:
        field_name = obs.error.field if obs is not None and obs.error is not None else None
        attempts = max(st.attempts, 1)
        st.phase = Phase.failed
        st.error = JobError(reason=reason[:253], message=f"after {attempts} attempt(s): {message}"[:4096],
                            field=str(field_name)[:253] if field_name else None)
        text = f"run {run} failed after {attempts} attempt(s): {reason}: {message}"
        st.conditions = set_condition(st.conditions, "Running", FALSE, reason, message, now)
        if get_condition(st.conditions, "Retrying") is not None:
            st.conditions = set_condition(st.conditions, "Retrying", FALSE, "BackoffLimitReached", text, now)
        st.conditions = set_condition(st.conditions, "Failed", TRUE, reason, text, now)
        if reason == "GateFailed":
            st.conditions = set_condition(st.conditions, "Evaluated", FALSE, "GateFailed", message, now)
        entry.reason = reason
        if st.champion is not None:
            text += f"; champion {st.champion.run} stays"
        plan.events.append(Event("Warning", "RunFailed", text))
    limit = cl.history_limit if cl is not None else DEFAULT_HISTORY
    st.history = ([h for h in st.history if h.run != run] + [entry])[-limit:]


def _metrics_line(metrics: dict[str, float]) -> str:
    parts = []
    for key in ("loss", "perplexity", "accuracy", "exactMatch"):
        if key in metrics:
            base = metrics.get("base" + key[0].upper() + key[1:])
            parts.append(f"{key} {metrics[key]:.4g}" + (f" (base {base:.4g})" if base is not None else ""))
    return ", ".join(parts) or "no metrics reported"


def _expire_finished(job: FineTuneJob, st: FineTuneJobStatus, observed: JobObserved, now: datetime,
                     plan: JobPlan) -> None:
    """ttlSecondsAfterFinished: remove the children of finished runs (status and artifacts stay)."""
    ttl = job.spec.ttl_seconds_after_finished
    if ttl is None:
        return
    finished = {h.run: h.completion_time for h in st.history}
    if st.current_run and st.completion_time:
        finished[st.current_run] = st.completion_time
    stopping = {a.run for a in plan.actions if isinstance(a, (StopRun, StartRun))}
    for name, o in sorted(observed.runs.items()):
        at = finished.get(name)
        if not o.exists or o.terminating or at is None or name in stopping:
            continue
        if name == st.current_run and st.completion_time is None:
            continue
        left = (at + timedelta(seconds=ttl) - now).total_seconds()
        if left <= 0:
            plan.actions.append(DeleteRun(name))
        else:
            plan.requeue_after = sooner(plan.requeue_after, left)
