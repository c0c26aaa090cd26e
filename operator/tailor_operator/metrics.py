"""Prometheus metrics of the operator (`tailor_` prefix, base units, bounded labels).

Created at startup on a registry of their own (never at import), served on `/metrics` by
`tailor_operator.runner`. Labels are bounded: phase, backend, result, a closed set of failure
reasons (anything else is `Other`), kind, verb, trial state; the per-object series carry only the
namespace and name of existing objects (labels `finetunejob` / `dataset`) and are removed when the
object is deleted:
- `tailor_eval_metric`, `tailor_search_trials`;
- `tailor_finetunejob_status_phase` (1 for the current phase, 0 for the others),
  `tailor_promotions_rejected_streak`, `tailor_champion_promoted_timestamp_seconds`,
  `tailor_dataset_ready` — what the chart's PrometheusRule alerts on;
- the live series of a run in flight (phase Running or Evaluating): `tailor_run_progress_ratio`,
  `tailor_run_train_loss`, `tailor_run_tokens_per_second`, `tailor_run_eta_seconds`, and
  `tailor_run_last_progress_timestamp_seconds` (when the run's stage or step last moved, for the
  "stuck" alert). They exist only while a run is in flight and are removed otherwise.
"""

from __future__ import annotations

import threading
import time
from typing import Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tailor_operator.api.v1alpha1 import FineTuneJobStatus, Phase
from tailor_operator.reconcile.search import TRIAL_STATES

FAILURE_REASONS = frozenset({
    "AppFailed", "DeadlineExceeded", "Diverged", "GateFailed", "InvalidSpec", "DataInvalid", "OOMKilled",
    "ImagePullBackOff", "Unschedulable", "SubmissionFailed", "TrainerExited", "TrainerKilled", "TrainerLost",
    "UnknownTargetModules", "RayJobFailed", "ValidationFailed", "ProgressDeadlineExceeded", "RayHeadLost",
    "PolicyViolation", "CheckpointUnsafe", "DatasetChanged", "TrainerIncomplete", "CredentialsError",
})
EVAL_METRICS = ("loss", "perplexity", "accuracy", "exactMatch", "baseLoss", "basePerplexity")
IN_FLIGHT = frozenset({Phase.running, Phase.evaluating})  # phases with live run series
NOT_COUNTED = frozenset({"Pinned"})  # decisions that are no rejection of the candidate (a pin holds the champion)
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
        job_labels = ["namespace", "finetunejob"]
        self.job_status_phase = Gauge("tailor_finetunejob_status_phase",
                                      "1 for each FineTuneJob's current phase, 0 for the other phases.",
                                      job_labels + ["phase"], registry=r)
        self.rejected_streak = Gauge("tailor_promotions_rejected_streak",
                                     "Successful runs in a row whose candidate was not promoted (continuous "
                                     "learning; from status.history, pinned decisions skipped).",
                                     job_labels, registry=r)
        self.champion_promoted = Gauge("tailor_champion_promoted_timestamp_seconds",
                                       "When the current champion was promoted (Unix time).", job_labels, registry=r)
        self.dataset_ready_series = Gauge("tailor_dataset_ready",
                                          "1 when the Dataset's Ready condition is True, else 0 (False or Unknown).",
                                          ["namespace", "dataset"], registry=r)
        self.run_progress = Gauge("tailor_run_progress_ratio", "Progress of the run in flight (0-1).",
                                  job_labels, registry=r)
        self.run_loss = Gauge("tailor_run_train_loss", "Latest training loss of the run in flight.",
                              job_labels, registry=r)
        self.run_tokens_per_second = Gauge("tailor_run_tokens_per_second",
                                           "Training throughput of the run in flight.", job_labels, registry=r)
        self.run_eta = Gauge("tailor_run_eta_seconds", "Estimated time left of the run in flight.",
                             job_labels, registry=r)
        self.run_last_progress = Gauge("tailor_run_last_progress_timestamp_seconds",
                                       "When the run in flight last moved (stage or step changed; Unix time).",
                                       job_labels, registry=r)
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
        self._moved: dict[tuple[str, str], tuple[tuple, float]] = {}  # (ns, job) -> (position, when it moved)

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

    def dataset_ready(self, uid: str, ready: Optional[str], namespace: Optional[str] = None,
                      name: Optional[str] = None) -> None:
        """Count a Dataset's Ready status; None forgets it (deleted). With namespace and name, also
        its own `tailor_dataset_ready` series (removed with None)."""
        if namespace is not None and name is not None:
            if ready is None:
                _remove(self.dataset_ready_series, namespace, name)
            else:
                self.dataset_ready_series.labels(namespace, name).set(1 if ready == "True" else 0)
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

    def job_status(self, namespace: str, name: str, status: FineTuneJobStatus,
                   continuous_learning: bool, now: Optional[float] = None) -> None:
        """The per-job series the alerts read, from the status the reconcile planned (written or
        deferred): the phase, the rejection streak, the champion's age and the live run series."""
        for phase in Phase:
            self.job_status_phase.labels(namespace, name, phase.value).set(1 if status.phase is phase else 0)
        if continuous_learning:
            self.rejected_streak.labels(namespace, name).set(rejected_streak(status))
        else:
            _remove(self.rejected_streak, namespace, name)
        champion = status.champion
        if champion is not None and champion.promoted_at is not None:
            self.champion_promoted.labels(namespace, name).set(champion.promoted_at.timestamp())
        else:
            _remove(self.champion_promoted, namespace, name)
        self.live_run(namespace, name, status, time.time() if now is None else now)

    def live_run(self, namespace: str, name: str, status: FineTuneJobStatus, now: float) -> None:
        """Set the live series of a run in flight; remove them when no run is (so a finished job
        shows no stale loss or ETA). The last-progress time moves when the run, stage or step does."""
        key = (namespace, name)
        if status.phase not in IN_FLIGHT:
            with self._lock:
                self._moved.pop(key, None)
            self._remove_live(namespace, name)
            return
        p = status.progress
        position = (status.current_run, status.stage, p.step if p else None, p.percent if p else None)
        with self._lock:
            old = self._moved.get(key)
            if old is None or old[0] != position:
                old = self._moved[key] = (position, now)
        self.run_last_progress.labels(namespace, name).set(old[1])
        ratio = None
        if p is not None and p.percent is not None:
            ratio = p.percent / 100
        if p is not None and p.step is not None and p.total_steps:
            ratio = min(p.step / p.total_steps, 1.0)
        for gauge, value in ((self.run_progress, ratio), (self.run_loss, p.loss if p else None),
                             (self.run_tokens_per_second, p.tokens_per_second if p else None),
                             (self.run_eta, p.eta_seconds if p else None)):
            if value is None:
                _remove(gauge, namespace, name)
            else:
                gauge.labels(namespace, name).set(value)

    def _remove_live(self, namespace: str, name: str) -> None:
        for gauge in (self.run_progress, self.run_loss, self.run_tokens_per_second, self.run_eta,
                      self.run_last_progress):
            _remove(gauge, namespace, name)

    def forget_job(self, uid: str, namespace: str, name: str) -> None:
        self.job_phase(uid, None)
        self.search(namespace, name, None)
        for key in EVAL_METRICS:
            try:
                self.eval_metric.remove(namespace, name, key)
            except KeyError:
                pass
        for phase in Phase:
            _remove(self.job_status_phase, namespace, name, phase.value)
        _remove(self.rejected_streak, namespace, name)
        _remove(self.champion_promoted, namespace, name)
        with self._lock:
            self._moved.pop((namespace, name), None)
        self._remove_live(namespace, name)

    def api_write(self, verb: str, kind: str) -> None:
        self.api_writes.labels(verb, kind).inc()

    def api_retry(self, code: str) -> None:
        """`code`: the HTTP status retried (429, 500, 502, 503, 504) or `connection`."""
        self.api_retries.labels(code).inc()


def rejected_streak(status: FineTuneJobStatus) -> int:
    """Successful runs since the last promotion whose candidate was not promoted, newest first;
    failed runs neither count nor break the streak, and pinned decisions are skipped."""
    streak = 0
    for entry in reversed(status.history):
        if entry.phase is not Phase.succeeded or (entry.reason or "") in NOT_COUNTED:
            continue
        if entry.promoted:
            break
        streak += 1
    return streak


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
