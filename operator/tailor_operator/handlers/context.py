"""The operator's runtime state: settings, API access, backends, metrics, and a work queue.

kopf feeds events in; every object key goes through one de-duplicating queue served by a fixed
pool of worker threads, like client-go's workqueue: a key is never reconciled by two threads at
once, a burst of events for one key becomes one reconcile, and `add_after` schedules the next
look (backoff, deadlines, progress polling) without a timer per object.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from tailor_operator.api.v1alpha1 import Backend
from tailor_operator.backends import RunBackend, ValidationBackend
from tailor_operator.backends.kuberay import KubeRayBackend, KubeRayValidation
from tailor_operator.backends.local import LocalBackend, LocalValidation
from tailor_operator.builders.trainer_access import access_failure_message, build_trainer_access
from tailor_operator.cluster import ApiError, Cluster
from tailor_operator.metrics import Metrics
from tailor_operator.reconcile.plan import Event
from tailor_operator.reconcile.settings import OperatorSettings

logger = logging.getLogger("tailor.operator")

Key = tuple[str, str, str]  # (kind, namespace, name)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class WorkQueue:
    """De-duplicating keyed queue with delayed re-adds and per-key exclusivity."""

    def __init__(self, process: Callable[[Key], Optional[float]], workers: int = 8,
                 on_depth: Optional[Callable[[int], None]] = None) -> None:
        self._process = process
        self._cond = threading.Condition()
        self._queue: deque[Key] = deque()
        self._queued: set[Key] = set()
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        self._seq = 0
        self._stopped = False
        self._started = False
        # progress tracking for the liveness endpoint
        self._busy_since: dict[Key, float] = {}
        self._enqueued_at: dict[Key, float] = {}
        self.last_done = time.monotonic()
        self._on_depth = on_depth
        self._threads = [threading.Thread(target=self._work, name=f"tailor-worker-{i}", daemon=True)
                         for i in range(workers)]
        self._threads.append(threading.Thread(target=self._tick, name="tailor-timer", daemon=True))

    def start(self) -> None:
        self._started = True
        for t in self._threads:
            t.start()

    def stop(self, wait: float = 0.0) -> bool:
        """Stop taking keys; with `wait`, wait up to that long for in-flight reconciles to end.
        True when none is left running."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        deadline = time.monotonic() + wait
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            return not self._busy_since

    def stuck(self, bound: float) -> Optional[str]:
        """Why the workers are not making progress, or None: a reconcile running longer than
        `bound`, a key waiting longer than `bound` while no reconcile finished for as long, or a
        worker thread gone."""
        now = time.monotonic()
        with self._cond:
            if self._started and not self._stopped and not all(t.is_alive() for t in self._threads):
                return "a work-queue thread died"
            for key, since in self._busy_since.items():
                if now - since > bound:
                    return f"reconcile of {'/'.join(key)} running for {now - since:.0f}s"
            oldest = min((self._enqueued_at.get(k, now) for k in self._queue), default=now)
            if now - oldest > bound and now - self.last_done > bound:
                return f"{len(self._queue)} keys waiting, none reconciled for {now - self.last_done:.0f}s"
        return None

    def add(self, key: Key) -> None:
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: Key) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queue.append(key)
            self._queued.add(key)
            self._enqueued_at[key] = time.monotonic()
            self._cond.notify()
        if self._on_depth:
            self._on_depth(len(self._queue))

    def add_after(self, key: Key, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        due = time.monotonic() + delay
        with self._cond:
            if key in self._due and self._due[key] <= due:
                return  # an earlier look is already scheduled
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._timers, (due, self._seq, key))
            self._cond.notify_all()

    def run_exclusive(self, key: Key, fn: Callable[[], Any]) -> Any:
        """Run fn while no worker reconciles `key` (used by the deletion finalizer)."""
        with self._cond:
            while key in self._processing:
                self._cond.wait(0.5)
            self._processing.add(key)
        try:
            return fn()
        finally:
            with self._cond:
                self._processing.discard(key)
                self._dirty.discard(key)
                self._cond.notify_all()

    def _tick(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    due, _, key = heapq.heappop(self._timers)
                    if self._due.get(key) == due:
                        del self._due[key]
                        self._add_locked(key)
                wait = (self._timers[0][0] - now) if self._timers else 1.0
                self._cond.wait(min(max(wait, 0.01), 1.0))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                key = self._queue.popleft()
                self._queued.discard(key)
                self._enqueued_at.pop(key, None)
                self._processing.add(key)
                self._busy_since[key] = time.monotonic()
            requeue: Optional[float] = None
            try:
                requeue = self._process(key)
                self._failures.pop(key, None)
            except Exception:  # noqa: BLE001 - one object's failure must not stop the operator
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                requeue = min(0.5 * 2 ** failures, 60.0)
                logger.exception("reconcile of %s/%s/%s failed (retry in %.1fs)", *key, requeue)
            finally:
                with self._cond:
                    self._processing.discard(key)
                    self._busy_since.pop(key, None)
                    self.last_done = time.monotonic()
                    if key in self._dirty:
                        self._dirty.discard(key)
                        self._add_locked(key)
                    self._cond.notify_all()
            if requeue is not None:
                self.add_after(key, requeue)


def access_created_event(account: Optional[str], created: list[str]) -> Event:
    """The Normal event on the object whose reconcile created the trainer's objects."""
    return Event("Normal", "TrainerAccessCreated",
                 f'created {", ".join(created)} "{account}" for the trainer pods in this namespace')


@dataclass
class Context:
    """Everything a handler needs; built once by the runner (tests build their own)."""

    settings: OperatorSettings
    cluster: Cluster
    metrics: Metrics
    workdir: Path
    resync_seconds: float = 60.0
    workers: int = 8
    instance: str = "tailor-operator"
    kuberay: KubeRayBackend = field(init=False)
    local: LocalBackend = field(init=False)
    runs: dict[Backend, RunBackend] = field(init=False)
    validations: dict[Backend, ValidationBackend] = field(init=False)
    queue: WorkQueue = field(init=False)
    syncers: dict[str, Callable[["Context", str, str], Optional[float]]] = field(default_factory=dict)
    """Reconcile function per kind ("FineTuneJob", "Dataset"), installed by handlers.register."""
    bodies: dict[Key, dict[str, Any]] = field(default_factory=dict)
    """Latest body seen in a watch event, used (once) instead of a GET."""
    datasets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    """Watch cache of Dataset bodies."""
    refs: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    """(namespace, dataset) -> FineTuneJobs referencing it."""
    job_refs: dict[tuple[str, str], str] = field(default_factory=dict)
    last_write: dict[str, float] = field(default_factory=dict)
    fingerprints: dict[tuple[str, str], tuple[Any, Optional[str], float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.kuberay = KubeRayBackend(self.cluster)
        self.local = LocalBackend(self.workdir, self.settings.local_max_concurrent)
        self.runs = {Backend.kuberay: self.kuberay, Backend.local: self.local}
        self.validations = {Backend.kuberay: KubeRayValidation(self.cluster),
                            Backend.local: LocalValidation(self.workdir)}
        self.queue = WorkQueue(self._process, self.workers, on_depth=self.metrics.queue_depth.set)

    def runs_for(self, backend: Backend) -> RunBackend:
        """Where a FineTuneJob with this `spec.backend` runs."""
        return self.runs[backend]

    def validation_for(self, backend: Backend) -> ValidationBackend:
        """Where a Dataset validation on this backend runs."""
        return self.validations[backend]

    def _process(self, key: Key) -> Optional[float]:
        kind, namespace, name = key
        started = time.perf_counter()
        try:
            return self.syncers[kind](self, namespace, name)
        except Exception:
            self.metrics.reconcile_errors.labels(kind).inc()
            raise
        finally:
            self.metrics.reconcile_duration.labels(kind).observe(time.perf_counter() - started)

    # ---------------------------------------------------------------------- event bookkeeping

    def job_seen(self, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        dataset = ((body.get("spec") or {}).get("datasetRef") or {}).get("name")
        with self.lock:
            old = self.job_refs.get(key)
            if old != dataset:
                if old is not None:
                    self.refs.get((key[0], old), set()).discard(key[1])
                if dataset:
                    self.refs.setdefault((key[0], dataset), set()).add(key[1])
                    self.job_refs[key] = dataset
            self.bodies[("FineTuneJob", *key)] = body
        self.queue.add(("FineTuneJob", *key))

    def job_gone(self, namespace: str, name: str, uid: str) -> None:
        with self.lock:
            dataset = self.job_refs.pop((namespace, name), None)
            if dataset:
                self.refs.get((namespace, dataset), set()).discard(name)
            self.bodies.pop(("FineTuneJob", namespace, name), None)
            self.last_write.pop(uid, None)
        self.metrics.forget_job(uid, namespace, name)

    def dataset_seen(self, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self.lock:
            self.datasets[key] = body
            self.bodies[("Dataset", *key)] = body
            dependents = list(self.refs.get(key, ()))
        self.queue.add(("Dataset", *key))
        for job in dependents:
            self.queue.add(("FineTuneJob", key[0], job))

    def dataset_gone(self, namespace: str, name: str, uid: str) -> None:
        with self.lock:
            self.datasets.pop((namespace, name), None)
            self.bodies.pop(("Dataset", namespace, name), None)
            self.fingerprints.pop((namespace, name), None)
            dependents = list(self.refs.get((namespace, name), ()))
        for validation in self.validations.values():
            validation.cleanup(namespace, name)
        self.metrics.dataset_ready(uid, None)
        for job in dependents:
            self.queue.add(("FineTuneJob", namespace, job))

    def take_body(self, key: Key) -> Optional[dict[str, Any]]:
        with self.lock:
            return self.bodies.pop(key, None)

    # ------------------------------------------------------------------------ trainer access

    def ensure_trainer_access(self, namespace: str) -> tuple[list[str], Optional[str]]:
        """Before a validation Job or RayJob in `namespace`: its pods' ServiceAccount, Role and
        RoleBinding exist (created when missing, never changed). Returns (kinds created, None), or
        (kinds created, what is missing) when the operator cannot create one."""
        account = self.settings.trainer_service_account
        if not account:
            return [], None  # pods run as the namespace's default ServiceAccount
        created: list[str] = []
        for obj in build_trainer_access(namespace, account):
            try:
                if self.cluster.ensure(obj):
                    created.append(obj["kind"])
            except ApiError as e:
                message = access_failure_message(obj, e.status, e.message)
                logger.warning("%s", message)
                return created, message
        if created:
            logger.info("created %s %s in namespace %s for trainer pods", "/".join(created), account, namespace)
        return created, None
