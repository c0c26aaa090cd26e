"""kopf handlers: thin adapters from watch events to the operator's work queue.

`register(registry, ctx)` attaches them to a kopf registry at startup (nothing registers at
import): events enqueue the object; events of children (RayJobs, ConfigMaps, pods, Jobs labelled
`app.kubernetes.io/managed-by: tailor`) enqueue their owner. The echoes of the operator's own
writes enqueue nothing (handlers.context.Context), and the periodic resync is scheduled on the
work queue, not by kopf timers.

kopf writes nothing to an object it has no changing handler (on.create/update/delete) or timer
for: no finalizer, no `tailor.dev` bookkeeping annotations. The only such handler is the local
backend's deletion handler (`field="spec.backend", value="local"`): a local-backend job holds the
finalizer `tailor.dev/finalizer` so its trainer processes are stopped and their work directories
removed before it goes. A kuberay-backend job needs none: every child it has carries an owner
reference, so the garbage collector deletes its RayJobs (and KubeRay their RayClusters) and
ConfigMaps; kopf releases the finalizer an older operator version put on one.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import kopf

from tailor_operator.api.v1alpha1 import GROUP, VERSION
from tailor_operator.builders.labels import LABEL_DATASET, LABEL_JOB, MANAGED_BY, MANAGER
from tailor_operator.handlers.context import Context
from tailor_operator.handlers.dataset import sync_dataset
from tailor_operator.handlers.finetunejob import cleanup_job, sync_job

CHILDREN = [("ray.io", "v1", "rayjobs"), ("", "v1", "configmaps"), ("", "v1", "pods"), ("batch", "v1", "jobs")]
CHILD_KIND = {"rayjobs": "RayJob", "configmaps": "ConfigMap", "pods": "Pod", "jobs": "Job"}


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

    @kopf.on.delete(GROUP, VERSION, "finetunejobs", field="spec.backend", value="local", registry=registry)
    def finetunejob_delete(body: kopf.Body, **_: Any) -> None:
        ns, name, uid, _labels = _meta(body)
        cleanup_job(ctx, ns, name, uid)

    @kopf.on.event(GROUP, VERSION, "datasets", registry=registry)
    async def dataset_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        ns, name, uid, _labels = _meta(body)
        if event.get("type") == "DELETED":
            ctx.dataset_gone(ns, name, uid)
        else:
            ctx.dataset_seen(dict(body))

    for group, version, plural in CHILDREN:
        kopf.on.event(group=group, version=version, plural=plural, labels=managed, registry=registry,
                      id=f"child-{plural}")(_child_handler(ctx, CHILD_KIND[plural]))


def _child_handler(ctx: Context, kind: str) -> Callable[..., Any]:
    async def child_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        ns, _name, _uid, labels = _meta(body)
        if event.get("type") != "DELETED" and not ctx.child_seen(kind, dict(body)):
            ctx.metrics.events_skipped.labels(kind).inc()
            return  # the operator's own create or update coming back
        if labels.get(LABEL_JOB):
            ctx.queue.add(("FineTuneJob", ns, labels[LABEL_JOB]))
        elif labels.get(LABEL_DATASET):
            ctx.queue.add(("Dataset", ns, labels[LABEL_DATASET]))

    return child_event


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


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps each object's last handled state (its "diff base", by default an annotation) to
    tell on.create from on.update handlers what changed, and builds it — a deep copy of the object
    — for every watch event of every resource. Tailor has no such handler (the local backend's
    on.delete needs no diff), so nothing is kept (no annotation to write) and what is built holds
    only `spec.backend`, which kopf matches that handler's field filter against: no deep copy per
    event (a fifth of the operator's CPU while 1,000 new jobs arrive, measured with py-spy)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        spec = body.get("spec") or {}
        return kopf.BodyEssence({"spec": {"backend": spec["backend"]}} if "backend" in spec else {})

    def fetch(self, *, body: kopf.Body) -> Optional[kopf.BodyEssence]:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def configure(settings: kopf.OperatorSettings, workers: int, clusterwide: bool = True) -> None:
    """kopf settings: our own finalizer name, no peering, server-side label selectors for children,
    no diff base (`NoDiffBase`), and the progress of the local backend's delete handler kept in
    `tailor.dev` annotations while it runs. Watching
    named namespaces, no cluster scan: the chart's namespaced mode grants no `list namespaces`,
    and kopf's scan would retry that for half a minute before watching anything."""
    settings.scanning.disabled = not clusterwide
    settings.persistence.finalizer = "tailor.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tailor.dev")
    settings.persistence.diffbase_storage = NoDiffBase()
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
