"""kopf handlers: thin adapters from watch events to the operator's work queue.

`register(registry, ctx)` attaches them to a kopf registry at startup (nothing registers at
import): events and a slow resync timer enqueue the object; events of children (RayJobs,
ConfigMaps, pods, Jobs labelled `app.kubernetes.io/managed-by: tailor`) enqueue their owner; the
FineTuneJob's delete handler is the finalizer that removes its children and local processes.
"""

from __future__ import annotations

from typing import Any, Callable

import kopf

from tailor_operator.api.v1alpha1 import GROUP, VERSION
from tailor_operator.builders.labels import LABEL_DATASET, LABEL_JOB, MANAGED_BY, MANAGER
from tailor_operator.handlers.context import Context
from tailor_operator.handlers.dataset import sync_dataset
from tailor_operator.handlers.finetunejob import cleanup_job, sync_job

CHILDREN = [("ray.io", "v1", "rayjobs"), ("", "v1", "configmaps"), ("", "v1", "pods"), ("batch", "v1", "jobs")]


def _meta(body: Any) -> tuple[str, str, str, dict[str, str]]:
    meta = body.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", ""), dict(meta.get("labels") or {})


def register(registry: kopf.OperatorRegistry, ctx: Context) -> None:
    ctx.syncers.update({"FineTuneJob": sync_job, "Dataset": sync_dataset})
    managed = {MANAGED_BY: MANAGER}

    @kopf.on.event(GROUP, VERSION, "finetunejobs", registry=registry)
    async def finetunejob_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        ns, name, uid, _labels = _meta(body)
        if event.get("type") == "DELETED":
            ctx.job_gone(ns, name, uid)
        elif not body.get("metadata", {}).get("deletionTimestamp"):
            ctx.job_seen(dict(body))

    @kopf.timer(GROUP, VERSION, "finetunejobs", interval=ctx.resync_seconds, registry=registry)
    async def finetunejob_resync(body: kopf.Body, **_: Any) -> None:
        ns, name, _uid, _labels = _meta(body)
        ctx.queue.add(("FineTuneJob", ns, name))

    @kopf.on.delete(GROUP, VERSION, "finetunejobs", registry=registry)
    def finetunejob_delete(body: kopf.Body, **_: Any) -> None:
        ns, name, uid, _labels = _meta(body)
        cleanup_job(ctx, ns, name, uid, (body.get("spec") or {}).get("backend", "kuberay"))

    @kopf.on.event(GROUP, VERSION, "datasets", registry=registry)
    async def dataset_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        ns, name, uid, _labels = _meta(body)
        if event.get("type") == "DELETED":
            ctx.dataset_gone(ns, name, uid)
        else:
            ctx.dataset_seen(dict(body))

    @kopf.timer(GROUP, VERSION, "datasets", interval=ctx.resync_seconds, registry=registry)
    async def dataset_resync(body: kopf.Body, **_: Any) -> None:
        ns, name, _uid, _labels = _meta(body)
        ctx.queue.add(("Dataset", ns, name))

    for group, version, plural in CHILDREN:
        @kopf.on.event(group=group, version=version, plural=plural, labels=managed, registry=registry,
                       id=f"child-{plural}")
        async def child_event(body: kopf.Body, **_: Any) -> None:
            ns, _name, _uid, labels = _meta(body)
            if labels.get(LABEL_JOB):
                ctx.queue.add(("FineTuneJob", ns, labels[LABEL_JOB]))
            elif labels.get(LABEL_DATASET):
                ctx.queue.add(("Dataset", ns, labels[LABEL_DATASET]))


def register_lease_heartbeat(registry: kopf.OperatorRegistry, namespace: str, name: str,
                             beat: Callable[[], None]) -> None:
    """Every renewal of the operator's own Lease (each retry period) arrives as a watch event
    through kopf's machinery; `beat` records it, so the liveness endpoint can tell that the watch
    streams still deliver (tailor_operator.runner.Health)."""

    def ours(body: kopf.Body, **_: Any) -> bool:
        return body.get("metadata", {}).get("name") == name and body.get("metadata", {}).get("namespace") == namespace

    @kopf.on.event("coordination.k8s.io", "v1", "leases", labels={MANAGED_BY: MANAGER}, when=ours,
                   registry=registry, id="lease-heartbeat")
    async def lease_event(**_: Any) -> None:
        beat()


def configure(settings: kopf.OperatorSettings, workers: int, clusterwide: bool = True) -> None:
    """kopf settings: our own finalizer name, no peering, server-side label selectors for children,
    and kopf's own bookkeeping (only used by the delete handler) kept in annotations. Watching
    named namespaces, no cluster scan: the chart's namespaced mode grants no `list namespaces`,
    and kopf's scan would retry that for half a minute before watching anything."""
    settings.scanning.disabled = not clusterwide
    settings.persistence.finalizer = "tailor.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tailor.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="tailor.dev")
    settings.peering.standalone = True
    settings.posting.enabled = False  # Tailor writes its own events (tailor_operator.cluster)
    settings.execution.max_workers = max(workers, 4)
    # Client-side bounds on every watch, so a half-open connection cannot hang a stream: the
    # server ends each watch after server_timeout, the client gives up 30 s later, and kopf
    # reconnects a stream that has delivered nothing (not even a bookmark) for 70 s.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.watching.inactivity_timeout = 70
    settings.networking.connect_timeout = 30
    settings.networking.request_timeout = 60
    # kopf's own API calls (watch-streams, patches) back off on errors: short first tries so an
    # API server restart is noticed within seconds, then 30 s steps while it stays down.
    settings.networking.error_backoffs = [1, 2, 4, 8, 15, 30, 30, 30, 30, 30]
    settings.watching.reconnect_backoff = 1.0
    settings.watching.label_selectors[("coordination.k8s.io", "leases")] = f"{MANAGED_BY}={MANAGER}"
    for group, version, plural in CHILDREN:
        selector = (group, plural) if group else plural
        settings.watching.label_selectors[selector] = f"{MANAGED_BY}={MANAGER}"
