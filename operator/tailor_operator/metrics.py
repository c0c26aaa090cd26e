"""Prometheus metrics of the operator (`tailor_` prefix, base units, bounded labels).

Created at startup on a registry of their own (never at import), served on `/metrics` by
`tailor_operator.runner`. Labels are bounded: phase, backend, result, a closed set of failure
reasons (anything else is `Other`), kind, verb, trial state; the per-job series
(`tailor_eval_metric`, `tailor_search_trials`) carry namespace/name of existing FineTuneJobs and
are removed when a job is deleted.
"""

from __future__ import annotations

import threading
from typing import Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tailor_operator.api.v1alpha1 import Phase
from tailor_operator.reconcile.search import TRIAL_STATES

FAILURE_REASONS = frozenset({
    "AppFailed", "DeadlineExceeded", "Diverged", "GateFailed", "InvalidSpec", "DataInvalid", "OOMKilled",
    "ImagePullBackOff", "Unschedulable", "SubmissionFailed", "TrainerExited", "TrainerKilled", "TrainerLost",
    "UnknownTargetModules", "RayJobFailed", "ValidationFailed", "ProgressDeadlineExceeded", "RayHeadLost",
    "PolicyViolation", "CheckpointUnsafe", "DatasetChanged", "TrainerIncomplete", "CredentialsError",
})
EVAL_METRICS = ("loss", "perplexity", "accuracy", "exactMatch", "baseLoss", "basePerplexity")
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600, 24 * 3600, 48 * 3600)


def bounded_reason(reason: str) -> str:
    return reason if reason in FAILURE_REASONS else "Other"


class Metrics:
    """Every series the operator exports; one instance per operator process."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("tailor_finetunejobs", "FineTuneJobs by phase.", ["phase"], registry=r)
        self.datasets = Gauge("tailor_datasets", "Datasets by Ready condition status.", ["ready"], registry=r)
        self.runs_started = Counter("tailor_runs_started_total", "Runs (RayJobs or local processes) created.",
                                    ["backend"], registry=r)
        self.runs_succeeded = Counter("tailor_runs_succeeded_total", "Runs that succeeded.", ["backend"], registry=r)
        self.runs_failed = Counter("tailor_runs_failed_total", "Runs that failed for good (after retries).",
                                   ["backend", "reason"], registry=r)
        self.retries = Counter("tailor_run_retries_total", "Failed attempts that were retried.",
                               ["backend", "reason"], registry=r)
        self.run_duration = Histogram("tailor_run_duration_seconds", "Duration of finished runs (start to end).",
                                      ["backend", "result"], buckets=DURATION_BUCKETS, registry=r)
        self.promotions = Counter("tailor_promotions_total", "Promotion decisions after successful runs.",
                                  ["result"], registry=r)
        self.tokens = Counter("tailor_tokens_trained_total", "Tokens trained by finished runs.", ["backend"],
                              registry=r)
        self.eval_metric = Gauge("tailor_eval_metric", "Latest held-out evaluation metric of each FineTuneJob.",
                                 ["namespace", "finetunejob", "metric"], registry=r)
        self.search_trials = Gauge("tailor_search_trials",
                                   "Trials of each FineTuneJob's current hyperparameter search, by state.",
                                   ["namespace", "finetunejob", "state"], registry=r)
        self.reconcile_duration = Histogram("tailor_reconcile_duration_seconds", "Time to reconcile one object.",
                                            ["kind"], registry=r)
        self.reconcile_errors = Counter("tailor_reconcile_errors_total", "Reconciles that raised.", ["kind"],
                                        registry=r)
        self.api_writes = Counter("tailor_api_writes_total", "Writes to the API server.", ["verb", "kind"],
                                  registry=r)
        self.api_retries = Counter("tailor_api_retries_total",
                                   "API requests retried after 429, 5xx or a connection failure.", ["code"],
                                   registry=r)
        self.status_writes_deferred = Counter("tailor_status_writes_deferred_total",
                                              "Progress-only status writes postponed by the rate limit.",
                                              ["kind"], registry=r)
        self.status_conflicts = Counter("tailor_status_conflicts_total",
                                        "Status writes refused with 409 Conflict (re-read and retried).",
                                        ["kind"], registry=r)
        self.queue_depth = Gauge("tailor_workqueue_depth", "Objects waiting to be reconciled.", registry=r)
        self.events_skipped = Counter("tailor_watch_events_skipped_total",
                                      "Watch events not reconciled: the echo of the operator's own write, "
                                      "or a change that leaves what the reconcile reads as it was.",
                                      ["kind"], registry=r)
        self.leader = Gauge("tailor_leader", "1 while this replica holds the leader Lease and acts, else 0.",
                            registry=r)
        for phase in Phase:
            self.jobs.labels(phase.value).set(0)
        for ready in ("True", "False", "Unknown"):
            self.datasets.labels(ready).set(0)
        for backend in ("kuberay", "local"):
            self.runs_started.labels(backend)
            self.runs_succeeded.labels(backend)
            self.tokens.labels(backend)
        for kind in ("FineTuneJob", "Dataset"):
            self.reconcile_errors.labels(kind)
            self.status_conflicts.labels(kind)
            self.status_writes_deferred.labels(kind)
            self.reconcile_duration.labels(kind)
            self.events_skipped.labels(kind)
        for result in ("promoted", "rejected"):
            self.promotions.labels(result)
        self._lock = threading.Lock()
        self._phases: dict[str, str] = {}
        self._ready: dict[str, str] = {}

    # ------------------------------------------------------------------ per-object bookkeeping

    def job_phase(self, uid: str, phase: Optional[str]) -> None:
        """Track one job's phase; None forgets it (deleted)."""
        with self._lock:
            old = self._phases.pop(uid, None)
            if phase is not None:
                self._phases[uid] = phase
            if old != phase:
                if old is not None:
                    self.jobs.labels(old).dec()
                if phase is not None:
                    self.jobs.labels(phase).inc()

    def dataset_ready(self, uid: str, ready: Optional[str]) -> None:
        with self._lock:
            old = self._ready.pop(uid, None)
            if ready is not None:
                self._ready[uid] = ready
            if old != ready:
                if old is not None:
                    self.datasets.labels(old).dec()
                if ready is not None:
                    self.datasets.labels(ready).inc()

    def eval_metrics(self, namespace: str, name: str, metrics: dict[str, float]) -> None:
        for key in EVAL_METRICS:
            if key in metrics:
                self.eval_metric.labels(namespace, name, key).set(metrics[key])

    def search(self, namespace: str, name: str, counts: Optional[Mapping[str, int]]) -> None:
        """The current run's trials by state (status.search); None removes the series (no search)."""
        for state in TRIAL_STATES:
            if counts is not None:
                self.search_trials.labels(namespace, name, state).set(counts.get(state, 0))
            else:
                try:
                    self.search_trials.remove(namespace, name, state)
                except KeyError:
                    pass

    def forget_job(self, uid: str, namespace: str, name: str) -> None:
        self.job_phase(uid, None)
        self.search(namespace, name, None)
        for key in EVAL_METRICS:
            try:
                self.eval_metric.remove(namespace, name, key)
            except KeyError:
                pass

    def api_write(self, verb: str, kind: str) -> None:
        self.api_writes.labels(verb, kind).inc()

    def api_retry(self, code: str) -> None:
        """`code`: the HTTP status retried (429, 500, 502, 503, 504) or `connection`."""
        self.api_retries.labels(code).inc()
