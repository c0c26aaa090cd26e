"""The operator's runtime state: settings, API access, backends, metrics, and the work queue.

kopf feeds events in; every object key goes through one `WorkQueue` (handlers/workqueue.py) served
by a fixed pool of worker threads. Each reconciled object is looked at again every
`resync_seconds` (level-based: a missed event heals itself), scheduled on that queue rather than
by a kopf timer, which would put kopf's finalizer on every object.

The operator's own writes come back as watch events. `Context` recognises them — the
resourceVersion its write returned, or, for FineTuneJobs and Datasets, the same inputs (spec,
status, generation, deletion) as the last reconcile saw or wrote — and does not reconcile again
for them: one reconcile per real change.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from tailor_operator.api.v1alpha1 import Backend
from tailor_operator.backends import RunBackend, ValidationBackend
from tailor_operator.backends.kuberay import KubeRayBackend, KubeRayValidation
from tailor_operator.backends.local import LocalBackend, LocalValidation
from tailor_operator.builders.trainer_access import access_failure_message, build_trainer_access
from tailor_operator.builders.labels import ANNOTATION_BACKEND, MANAGED_BY, MANAGER
from tailor_operator.cluster import ApiError, Cluster
from tailor_operator.handlers.workqueue import Key, WorkQueue
from tailor_operator.metrics import Metrics
from tailor_operator.reconcile.plan import Event
from tailor_operator.reconcile.settings import OperatorSettings
from tailor_operator.registry import RegistrySync

logger = logging.getLogger("tailor.operator")

__all__ = ["Context", "Key", "WorkQueue", "access_created_event", "job_inputs", "dataset_inputs", "utcnow"]

# Child kinds whose watch events enqueue their owner (handlers.CHILDREN): the operator's own
# writes of these are recognised by resourceVersion when their event comes back.
CHILD_KINDS = frozenset({"RayJob", "ConfigMap", "Pod", "Job"})


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def job_inputs(body: dict[str, Any]) -> tuple[Any, ...]:
    """What a FineTuneJob's reconcile reads from the object itself: two versions with equal inputs
    (e.g. only labels, annotations or finalizers changed) reconcile to the same plan."""
    meta = body.get("metadata") or {}
    return meta.get("generation"), meta.get("deletionTimestamp"), body.get("spec"), body.get("status")


def dataset_inputs(body: dict[str, Any]) -> tuple[Any, ...]:
    """The same for a Dataset, whose `tailor.dev/backend` annotation also counts."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return job_inputs(body) + (annotations.get(ANNOTATION_BACKEND),)


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
    registry: RegistrySync = field(init=False)
    """The model registry sync (MLflow; inert when settings.registry_uri is empty)."""
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
    live: set[Key] = field(default_factory=set)
    """FineTuneJobs and Datasets that exist (seen in a watch event, not deleted since): resynced."""
    reconciled: dict[Key, tuple[Any, ...]] = field(default_factory=dict)
    """The inputs (job_inputs / dataset_inputs) of the version the last reconcile saw or wrote."""
    own_versions: dict[Key, str] = field(default_factory=dict)
    """resourceVersion of the operator's last write of an object whose watch event has not come
    back yet (FineTuneJob/Dataset status, and children)."""
    trainer_access_checked: dict[str, float] = field(default_factory=dict)
    """namespace -> when its trainer ServiceAccount/Role/RoleBinding were last found or made."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.kuberay = KubeRayBackend(self.cluster)
        self.local = LocalBackend(self.workdir, self.settings.local_max_concurrent)
        self.runs = {Backend.kuberay: self.kuberay, Backend.local: self.local}
        self.validations = {Backend.kuberay: KubeRayValidation(self.cluster),
                            Backend.local: LocalValidation(self.workdir)}
        self.queue = WorkQueue(self._process, self.workers, on_depth=self.metrics.queue_depth.set)
        self.cluster.on_written = self.wrote
        self.registry = RegistrySync.from_settings(self.settings.registry_uri, self.settings.registry_timeout_seconds)

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
            delay = self.syncers[kind](self, namespace, name)
        except Exception:
            self.metrics.reconcile_errors.labels(kind).inc()
            raise
        finally:
            self.metrics.reconcile_duration.labels(kind).observe(time.perf_counter() - started)
        with self.lock:
            live = key in self.live
        if live:  # the periodic resync, spread by up to 10% so a burst does not come back as one
            resync = self.resync_seconds * (1 + 0.1 * random.random())
            delay = resync if delay is None else min(delay, resync)
        return delay

    # ---------------------------------------------------------------------- event bookkeeping

    def wrote(self, kind: str, obj: dict[str, Any]) -> None:
        """Cluster.on_written: remember the resourceVersion of an object the operator just wrote
        (`obj`: the object, or only its metadata), when its watch event will come back here (so
        that event is known to be our own)."""
        meta = obj.get("metadata") or {}
        version = meta.get("resourceVersion")
        if not version:
            return
        if kind in CHILD_KINDS and (meta.get("labels") or {}).get(MANAGED_BY) != MANAGER:
            return  # not watched (e.g. a promotion target ConfigMap): no event comes back
        if kind not in CHILD_KINDS and kind not in ("FineTuneJob", "Dataset"):
            return
        key = (kind, meta.get("namespace", ""), meta.get("name", ""))
        with self.lock:
            self.own_versions[key] = version
            if kind == "FineTuneJob" and "spec" in obj:
                self.reconciled[key] = job_inputs(obj)
            elif kind == "Dataset" and "spec" in obj:
                self.reconciled[key] = dataset_inputs(obj)

    def _own_echo(self, key: Key, body: dict[str, Any]) -> bool:
        """Whether this watch event is the echo of the operator's own last write (lock held).
        Any event for the key ends the wait for that echo."""
        version = (body.get("metadata") or {}).get("resourceVersion")
        return version is not None and self.own_versions.pop(key, None) == version

    def child_seen(self, kind: str, body: dict[str, Any]) -> bool:
        """A child's watch event: True when its owner should be reconciled (it is not the echo of
        the operator's own create or update)."""
        meta = body.get("metadata") or {}
        with self.lock:
            return not self._own_echo((kind, meta.get("namespace", ""), meta.get("name", "")), body)

    def job_seen(self, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        qkey = ("FineTuneJob", *key)
        dataset = ((body.get("spec") or {}).get("datasetRef") or {}).get("name")
        with self.lock:
            old = self.job_refs.get(key)
            if old != dataset:
                if old is not None:
                    self.refs.get((key[0], old), set()).discard(key[1])
                if dataset:
                    self.refs.setdefault((key[0], dataset), set()).add(key[1])
                    self.job_refs[key] = dataset
            self.bodies[qkey] = body
            self.live.add(qkey)
            own = self._own_echo(qkey, body)
            same = self.reconciled.get(qkey) == job_inputs(body)
        if own or same:
            self.metrics.events_skipped.labels("FineTuneJob").inc()
            return
        self.queue.add(qkey)

    def job_reconciled(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        """sync_job saw (and, if it wrote status, wrote) this version: an event with the same
        inputs needs no reconcile."""
        with self.lock:
            self.reconciled[("FineTuneJob", namespace, name)] = job_inputs(body)

    def job_gone(self, namespace: str, name: str, uid: str) -> None:
        qkey = ("FineTuneJob", namespace, name)
        with self.lock:
            dataset = self.job_refs.pop((namespace, name), None)
            if dataset:
                self.refs.get((namespace, dataset), set()).discard(name)
            self.bodies.pop(qkey, None)
            self.last_write.pop(uid, None)
            self.live.discard(qkey)
            self.reconciled.pop(qkey, None)
            self.own_versions.pop(qkey, None)
        self.queue.forget(qkey)
        self.registry.forget(uid)
        self.metrics.forget_job(uid, namespace, name)

    def dataset_seen(self, body: dict[str, Any]) -> None:
        """A Dataset's watch event: the Dataset is reconciled unless the event is its own write's
        echo, and the jobs referencing it when what they read of it (spec, status) changed."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        qkey = ("Dataset", *key)
        with self.lock:
            previous = self.datasets.get(key)
            self.datasets[key] = body
            self.bodies[qkey] = body
            self.live.add(qkey)
            own = self._own_echo(qkey, body)
            same = self.reconciled.get(qkey) == dataset_inputs(body)
            changed = previous is None or dataset_inputs(previous) != dataset_inputs(body)
            dependents = list(self.refs.get(key, ())) if changed else []
        if own or same:
            self.metrics.events_skipped.labels("Dataset").inc()
        else:
            self.queue.add(qkey)
        for job in dependents:
            self.queue.add(("FineTuneJob", key[0], job))

    def dataset_written(self, namespace: str, name: str, written: dict[str, Any]) -> None:
        """sync_dataset wrote this status: the cache holds it at once and the jobs referencing the
        Dataset are reconciled (its watch event, our own echo, will not enqueue them again)."""
        with self.lock:
            self.datasets[(namespace, name)] = written
            dependents = list(self.refs.get((namespace, name), ()))
        for job in dependents:
            self.queue.add(("FineTuneJob", namespace, job))

    def dataset_reconciled(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        with self.lock:
            self.reconciled[("Dataset", namespace, name)] = dataset_inputs(body)

    def dataset_gone(self, namespace: str, name: str, uid: str) -> None:
        qkey = ("Dataset", namespace, name)
        with self.lock:
            self.datasets.pop((namespace, name), None)
            self.bodies.pop(qkey, None)
            self.fingerprints.pop((namespace, name), None)
            self.live.discard(qkey)
            self.reconciled.pop(qkey, None)
            self.own_versions.pop(qkey, None)
            dependents = list(self.refs.get((namespace, name), ()))
        self.queue.forget(qkey)
        for validation in self.validations.values():
            validation.cleanup(namespace, name)
        self.metrics.dataset_ready(uid, None, namespace, name)
        for job in dependents:
            self.queue.add(("FineTuneJob", namespace, job))

    def not_found(self, key: Key) -> None:
        """A reconcile found the object gone (its DELETED event may never come, e.g. across a
        watch restart): no more resyncs for it."""
        with self.lock:
            self.live.discard(key)

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
        checked = self.trainer_access_checked.get(namespace)
        if checked is not None and time.monotonic() - checked < self.resync_seconds:
            return [], None  # found or made within a resync period: no three GETs per RayJob
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
        self.trainer_access_checked[namespace] = time.monotonic()
        return created, None
