"""Pure folding of what the cluster (or the local process table) shows into one run state.

KubeRay reports a RayJob through two fields that move independently (`jobDeploymentStatus`,
`jobStatus`) and can sit in `Initializing` while its pods cannot be scheduled; the trainer
reports stage/step/result through its progress document. These functions turn both, plus the
RayCluster's pods, into a :class:`RunObservation` the reconcile reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import Phase
from tailor_operator.builders.labels import ANNOTATION_ATTEMPT, ANNOTATION_REVISION, ANNOTATION_RUN_NUMBER
from tailor_trainer.contract import ProgressDoc, RunError, RunResult
from tailor_trainer.redact import redact


class RunState(str, Enum):
    """Where one run is; each state knows its FineTuneJob phase and whether it is over."""

    missing = "Missing"
    """No child object: never created, or deleted."""
    pending = "Pending"
    """Created; waiting for resources (RayCluster starting, Kueue, scheduling)."""
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"

    @property
    def is_finished(self) -> bool:
        return self in (RunState.succeeded, RunState.failed)

    @property
    def phase(self) -> Phase:
        return {
            RunState.missing: Phase.pending,
            RunState.pending: Phase.queued,
            RunState.running: Phase.running,
            RunState.succeeded: Phase.succeeded,
            RunState.failed: Phase.failed,
        }[self]


@dataclass(frozen=True)
class PodProblem:
    """A pod-level reason a run cannot make progress (or failed)."""

    reason: str  # Unschedulable | ImagePullBackOff | OOMKilled | CrashLoopBackOff | CreateContainerConfigError |
    # CredentialsError (a Secret the pod takes its environment from does not exist)
    message: str
    pod: str
    since: Optional[datetime] = None
    """When the pod was created: a missing Secret has held it back since then."""


@dataclass(frozen=True)
class RunObservation:
    """One run as observed, whichever backend runs it."""

    run: str
    number: int = 0
    attempt: int = 1
    state: RunState = RunState.missing
    terminating: bool = False
    reason: str = ""
    message: str = ""
    progress: Optional[ProgressDoc] = None
    """The trainer's progress document for this attempt (stale attempts are dropped)."""
    result: Optional[RunResult] = None
    error: Optional[RunError] = None
    dataset_revision: Optional[str] = None
    created_at: Optional[datetime] = None
    problem_since: Optional[datetime] = None
    """Pending on a pod problem: since when (the pod's creation)."""

    @property
    def exists(self) -> bool:
        return self.state is not RunState.missing


@dataclass(frozen=True)
class ValidationObservation:
    """One Dataset validation (inspect Job + result ConfigMap, or a subprocess)."""

    key: str
    exists: bool = False
    finished: bool = False
    result: Optional[dict[str, Any]] = None
    """The Dataset status JSON that `python -m tailor_trainer inspect` wrote."""
    failure: Optional[str] = None
    """Why the validation itself broke (no result): job failed, process crashed."""
    problem: Optional[PodProblem] = None
    """Why a running validation cannot make progress (its pod waits for a missing Secret)."""
    created_at: Optional[datetime] = None
    """When its Job was created (kuberay dataset backend)."""
    not_started: Optional[str] = None
    """While no pod of its Job runs yet: what there is instead (no pod, a pod not scheduled)."""


# Pod problems, worst first: the first found decides the reason shown.
_WAITING_REASONS = {
    "ErrImagePull": "ImagePullBackOff",
    "ImagePullBackOff": "ImagePullBackOff",
    "InvalidImageName": "ImagePullBackOff",
    "CreateContainerConfigError": "CreateContainerConfigError",
    "CrashLoopBackOff": "CrashLoopBackOff",
}
_PRIORITY = ["OOMKilled", "CredentialsError", "ImagePullBackOff", "CreateContainerConfigError", "Unschedulable",
             "CrashLoopBackOff"]
# the kubelet's text when an envFrom/env Secret is missing: `secret "s3-creds" not found`
_MISSING_SECRET = re.compile(r'secret "([^"]+)" not found')


def missing_secret_name(message: str) -> Optional[str]:
    """The Secret a CredentialsError message names, else None."""
    m = _MISSING_SECRET.search(message)
    return m.group(1) if m else None


def _pod_problems(pod: dict[str, Any]) -> list[PodProblem]:
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    found: list[PodProblem] = []
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                and cond.get("reason") == "Unschedulable":
            found.append(PodProblem("Unschedulable", cond.get("message") or "pod cannot be scheduled", name))
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        container = cs.get("name", "?")
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            terminated = state.get("terminated") or {}
            if terminated.get("reason") == "OOMKilled":
                # the head runs the trainer's driver (prep, evaluation): its memory is the
                # installation's, not the job's
                fix = ("raise the operator's head memory (chart trainer.headMemory)" if container == "ray-head"
                       else "raise resources.memoryPerWorker")
                found.append(PodProblem(
                    "OOMKilled", f"container {container} of pod {name} was OOMKilled (exit code "
                    f"{terminated.get('exitCode', 137)}); {fix}", name))
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = _WAITING_REASONS.get(waiting.get("reason", ""))
        missing = _MISSING_SECRET.search(waiting.get("message") or "") if reason == "CreateContainerConfigError" else None
        if missing:
            found.append(PodProblem("CredentialsError", f'secret "{missing.group(1)}" not found: container '
                                    f"{container} of pod {name} cannot start without it", name,
                                    parse_time((pod.get("metadata") or {}).get("creationTimestamp"))))
        elif reason:
            found.append(PodProblem(reason, f"container {container} of pod {name}: {waiting.get('reason')}: "
                                    f"{waiting.get('message') or ''}".rstrip(": "), name))
    return found


def pod_problem(pods: list[dict[str, Any]]) -> Optional[PodProblem]:
    """The most telling problem among a run's pods, or None."""
    problems = [p for pod in pods for p in _pod_problems(pod)]
    if not problems:
        return None
    problems.sort(key=lambda p: (_PRIORITY.index(p.reason), p.pod))
    return problems[0]


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def parse_time(value: Any) -> Optional[datetime]:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def progress_for_attempt(doc: Any, attempt: int) -> Optional[ProgressDoc]:
    """The progress document as read (a dict or JSON text), unless it is left over from an
    earlier attempt of the same run."""
    if isinstance(doc, (str, bytes)):
        doc = ProgressDoc.read(doc)
    if isinstance(doc, ProgressDoc):
        doc = doc.to_json_dict()
    if not isinstance(doc, dict):
        return None
    doc_attempt = doc.get("attempt")
    if doc_attempt is not None and _int(doc_attempt, attempt) != attempt:
        return None
    return ProgressDoc.read(doc)


def observe_rayjob(rayjob: dict[str, Any], progress: Optional[dict[str, Any]] = None,
                   pods: Optional[list[dict[str, Any]]] = None, *, progress_read: bool = True) -> RunObservation:
    """Fold a RayJob (ray.io/v1), the run's progress document and its pods into one observation.

    `progress_read`: whether `progress` is what the run's progress ConfigMap holds (None: it holds
    nothing for this attempt). False for runs whose document was not fetched (finished runs listed
    only for ttlSecondsAfterFinished): their SUCCEEDED is not checked against the trainer's word."""
    meta = rayjob.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    attempt = _int(annotations.get(ANNOTATION_ATTEMPT), 1)
    doc = progress_for_attempt(progress, attempt)
    status = rayjob.get("status") or {}
    spec = rayjob.get("spec") or {}
    deployment = status.get("jobDeploymentStatus") or ""
    job_status = status.get("jobStatus") or ""
    problem = pod_problem(pods or [])
    base = dict(
        run=meta.get("name", ""),
        number=_int(annotations.get(ANNOTATION_RUN_NUMBER), 0),
        attempt=attempt,
        terminating=bool(meta.get("deletionTimestamp")),
        progress=doc,
        dataset_revision=annotations.get(ANNOTATION_REVISION),
        created_at=parse_time(meta.get("creationTimestamp")),
    )
    trainer_error = doc.error if doc is not None else None
    result = doc.result if doc is not None else None

    if deployment == "Complete" and job_status == "SUCCEEDED":
        # KubeRay's SUCCEEDED means the entrypoint exited 0 (or a submitter's log tail did): only
        # the trainer's own document says the pipeline finished.
        untrue = _succeeded_untrue(doc, attempt) if progress_read else None
        if untrue is not None:
            reason, message = untrue
            return RunObservation(**base, state=RunState.failed, reason=reason, message=message,
                                  error=trainer_error, result=result)
        return RunObservation(**base, state=RunState.succeeded, reason="Succeeded",
                              message=status.get("message") or "Ray job succeeded", result=result)
    if deployment in ("Failed", "ValidationFailed") or (
            deployment == "Complete" and job_status in ("FAILED", "STOPPED")):
        reason, message = _failure(status, trainer_error, problem)
        return RunObservation(**base, state=RunState.failed, reason=reason, message=message,
                              error=trainer_error, result=result)
    if deployment == "Running" and pods is not None and job_status in ("", "PENDING", "RUNNING"):
        lost = head_lost(status, pods)
        if lost is not None:
            return RunObservation(**base, state=RunState.failed, reason="RayHeadLost", message=lost,
                                  error=trainer_error, result=result)
    if deployment == "Running" and (job_status == "RUNNING" or doc is not None):
        return RunObservation(**base, state=RunState.running, reason="Running",
                              message=status.get("message") or "")
    # Still coming up: say why, rather than KubeRay's bare "Initializing".
    if problem is not None:
        return RunObservation(**base, state=RunState.pending, reason=problem.reason, message=problem.message,
                              problem_since=problem.since)
    cluster_failure = _cluster_failure(status)
    if cluster_failure is not None:
        return RunObservation(**base, state=RunState.pending, reason="ReplicaFailure", message=cluster_failure)
    if deployment in ("Suspended", "Suspending") or spec.get("suspend"):
        return RunObservation(**base, state=RunState.pending, reason="QueuedByKueue",
                              message="RayJob is suspended until its queue admits it")
    if deployment == "Running":
        return RunObservation(**base, state=RunState.pending, reason="Submitted",
                              message="RayCluster is up; the Ray job is pending")
    if not deployment:
        return RunObservation(**base, state=RunState.pending, reason="Starting",
                              message="waiting for KubeRay to take the RayJob")
    return RunObservation(**base, state=RunState.pending, reason="Initializing",
                          message=status.get("message") or "waiting for the RayCluster to start")


def _succeeded_untrue(doc: Optional[ProgressDoc], attempt: int,
                      said: str = "KubeRay reports the Ray job SUCCEEDED, but") -> Optional[tuple[str, str]]:
    """(reason, message) when the runner says success but the trainer's document does not; else None."""
    if doc is None:
        return ("TrainerIncomplete", f"{said} the trainer left no progress document for attempt {attempt}: the "
                "entrypoint exited 0 without running the pipeline to its end; the attempt counts as failed")
    error = doc.error or RunError()
    if doc.failed:
        reason = str(error.reason or "TrainerFailed")
        return reason, str(error.message or f"{said} the trainer reported {reason}")
    if not doc.finished_ok:
        where = f"stage {doc.stage or '-'}"
        if doc.step is not None:
            where += f" step {doc.step}/{doc.total_steps or '?'}"
        return ("TrainerIncomplete", f"{said} the trainer's last progress (attempt {attempt}) is state "
                f"{doc.state or '-'} at {where} with no result: the pipeline did not finish "
                "evaluate; the attempt counts as failed and is retried from its checkpoint")
    return None


def head_lost(status: dict[str, Any], pods: list[dict[str, Any]]) -> Optional[str]:
    """Why the Ray job of a Running RayJob is gone with its head, or None.

    The Ray job, its driver (the trainer's entrypoint) and the cluster state live in the head pod
    (no GCS fault tolerance). Once the Ray job has started, a head pod that is being deleted, is
    missing, was created after the job started (KubeRay replaced it) or whose container restarted
    means the job is lost, while KubeRay may go on reporting RUNNING: the attempt failed, and the
    next one resumes from the last checkpoint."""
    started = parse_time((status.get("rayJobInfo") or {}).get("startTime"))
    if started is None:
        return None  # the cluster is still coming up: a new head is not a lost job
    heads = [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get("ray.io/node-type") == "head"]
    live = [p for p in heads if not p["metadata"].get("deletionTimestamp")]
    if not live:
        which = f"Ray head pod {heads[0]['metadata']['name']} is being deleted" if heads else "Ray head pod is gone"
        return (f"the {which} while the Ray job ran (started {started.isoformat()}); the job and its driver "
                "lived there, so this attempt is lost")
    for pod in live:
        name = pod["metadata"].get("name", "")
        created = parse_time(pod["metadata"].get("creationTimestamp"))
        if created is not None and created > started:
            return (f"the Ray head pod was replaced while the Ray job ran: {name} was created at "
                    f"{created.isoformat()}, after the job started ({started.isoformat()}); the job and its "
                    "driver lived on the old head, so this attempt is lost")
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("restartCount"):
                return (f"container {cs.get('name')} of the Ray head pod {name} restarted "
                        f"({cs['restartCount']}x) while the Ray job ran; the job and its driver lived there, "
                        "so this attempt is lost")
    return None


def _cluster_failure(status: dict[str, Any]) -> Optional[str]:
    """KubeRay's RayCluster condition ReplicaFailure (e.g. pods rejected by quota or admission)."""
    for cond in ((status.get("rayClusterStatus") or {}).get("conditions")) or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return f"RayCluster cannot create its pods: {cond.get('reason', '')}: {cond.get('message', '')}".strip()
    return None


def _failure(status: dict[str, Any], trainer_error: Optional[RunError],
             problem: Optional[PodProblem]) -> tuple[str, str]:
    """Best reason for a failed RayJob: the trainer's own, then KubeRay's deadline, then the pods."""
    if trainer_error is not None and trainer_error.reason:
        return trainer_error.reason, trainer_error.message or ""
    if status.get("reason") == "DeadlineExceeded":
        return "DeadlineExceeded", status.get("message") or "activeDeadlineSeconds exceeded"
    if problem is not None and problem.reason in ("OOMKilled", "ImagePullBackOff", "CreateContainerConfigError"):
        return problem.reason, problem.message
    reason = status.get("reason") or "RayJobFailed"
    message = status.get("message") or f"RayJob {status.get('jobDeploymentStatus')}/{status.get('jobStatus')}"
    return str(reason), str(message)


def observe_local_run(run: str, *, number: int, attempt: int, running: bool, exit_code: Optional[int],
                      progress: Any, log_tail: str = "",
                      dataset_revision: Optional[str] = None) -> RunObservation:
    """Fold a local trainer subprocess (running flag, exit code if known) and its progress file."""
    doc = progress_for_attempt(progress, attempt)
    base = dict(run=run, number=number, attempt=attempt, progress=doc, dataset_revision=dataset_revision)
    state = doc.state if doc is not None else None
    if running:
        return RunObservation(**base, state=RunState.running, reason="Running", message="trainer process running")
    trainer_error = doc.error if doc is not None else None
    result = doc.result if doc is not None else None
    if exit_code == 0 or (exit_code is None and state == "Succeeded"):
        untrue = _succeeded_untrue(doc, attempt, "the trainer process exited 0, but")
        if untrue is None:
            return RunObservation(**base, state=RunState.succeeded, reason="Succeeded",
                                  message="trainer exited 0", result=result)
        reason, message = untrue
        return RunObservation(**base, state=RunState.failed, reason=reason, message=message,
                              error=trainer_error, result=result)
    if trainer_error is not None and trainer_error.reason:
        return RunObservation(**base, state=RunState.failed, reason=trainer_error.reason,
                              message=trainer_error.message or "", error=trainer_error)
    if exit_code is None:
        reason, message = "TrainerLost", "the trainer process is gone and left no result"
    elif exit_code < 0:
        reason, message = "TrainerKilled", f"trainer killed by signal {-exit_code}"
    else:
        reason, message = "TrainerExited", f"trainer exited with code {exit_code}"
    if log_tail:
        # a crash's last line may be an exception's text: masked like the trainer's own messages
        message = f"{message}: {redact(log_tail.strip().splitlines()[-1][:300])}"
    return RunObservation(**base, state=RunState.failed, reason=reason, message=message)


def observe_inspect(key: str, *, config_map: Optional[dict[str, Any]], job: Optional[dict[str, Any]],
                    result_key: str = "status.json",
                    pods: Optional[list[dict[str, Any]]] = None) -> ValidationObservation:
    """Fold a validation Job and its result ConfigMap (the pod writes the status JSON there)."""
    import json

    if config_map is None and job is None:
        return ValidationObservation(key=key)
    raw = ((config_map or {}).get("data") or {}).get(result_key)
    if raw:
        try:
            return ValidationObservation(key=key, exists=True, finished=True, result=json.loads(raw))
        except json.JSONDecodeError as e:
            return ValidationObservation(key=key, exists=True, finished=True,
                                         failure=f"validation result is not JSON: {e}")
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return ValidationObservation(key=key, exists=True, finished=True,
                                         failure=f"validation Job failed: {cond.get('reason', '')} "
                                         f"{cond.get('message', '')}".strip())
    if job is None:
        return ValidationObservation(key=key)  # the Job is gone and left no result: start again
    return ValidationObservation(key=key, exists=True, problem=pod_problem(pods or []),
                                 created_at=parse_time((job.get("metadata") or {}).get("creationTimestamp")),
                                 not_started=_not_started(pods or []))


def _not_started(pods: list[dict[str, Any]]) -> Optional[str]:
    """None once a pod of the Job runs (or ran); else what is there instead."""
    if not pods:
        return "its Job has created no pod"
    waiting = []
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") in ("Running", "Succeeded", "Failed"):
            return None
        name = (pod.get("metadata") or {}).get("name", "?")
        scheduled = any(c.get("type") == "PodScheduled" and c.get("status") == "True"
                        for c in status.get("conditions") or [])
        node = (pod.get("spec") or {}).get("nodeName")
        waiting.append(f"pod {name} is Pending on node {node}" if scheduled or node
                       else f"pod {name} is Pending and not scheduled to any node")
    return "; ".join(waiting)
