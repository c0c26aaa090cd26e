"""The handler layer's bookkeeping (issue 14): what one reconcile of a new job sends to the API
server, which watch events lead to a reconcile, and the order the work queue serves keys in.

The API server is a small in-memory stand-in for `tailor_operator.cluster.Cluster` (our own seam)
that records every call; the work queue runs its real threads. Nothing depends on timing: the
queue test holds its single worker on a gate and checks the order keys come out in."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any, Optional

import pytest

from tailor_operator.cluster import Conflict
from tailor_operator.handlers.context import Context, WorkQueue
from tailor_operator.handlers.finetunejob import sync_job
from tailor_operator.metrics import Metrics
from tailor_operator.reconcile.settings import OperatorSettings

NS = "team"


class FakeCluster:
    """Objects by (kind, name) in one namespace; every call recorded as (method, kind, name)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.version = 100
        self.on_written = None

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[(obj["kind"], obj["metadata"]["name"])] = obj
        if self.on_written is not None:
            self.on_written(obj["kind"], obj)
        return obj

    def get(self, kind: str, namespace: Optional[str], name: str) -> Optional[dict[str, Any]]:
        self.calls.append(("get", kind, name))
        return copy.deepcopy(self.objects.get((kind, name)))

    def list(self, kind: str, namespace: Optional[str], labels: Optional[dict[str, str]] = None) -> list[dict]:
        self.calls.append(("list", kind, ""))
        return [copy.deepcopy(o) for (k, _), o in self.objects.items() if k == kind]

    def create(self, obj: dict[str, Any], *, metadata_only: bool = False) -> dict[str, Any]:
        self.calls.append(("create", obj["kind"], obj["metadata"].get("name", "")))
        if (obj["kind"], obj["metadata"].get("name")) in self.objects:
            raise Conflict(409, "AlreadyExists")
        return self._stamp(obj)

    def create_or_adopt(self, obj: dict[str, Any], *, metadata_only: bool = False) -> tuple[dict[str, Any], bool]:
        try:
            return self.create(obj), True
        except Conflict:
            return copy.deepcopy(self.objects[(obj["kind"], obj["metadata"]["name"])]), False

    def apply(self, obj: dict[str, Any], *, metadata_only: bool = False) -> dict[str, Any]:
        return self.create_or_adopt(obj)[0]

    def replace_status(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("replace_status", obj["kind"], obj["metadata"]["name"]))
        return self._stamp(obj)

    def merge_patch(self, kind: str, namespace: Optional[str], name: str, patch: dict[str, Any],
                    sub: Optional[str] = None) -> dict[str, Any]:
        self.calls.append(("merge_patch", kind, name))
        return self.objects[(kind, name)]

    def delete(self, kind: str, namespace: Optional[str], name: str, **_: Any) -> bool:
        self.calls.append(("delete", kind, name))
        return self.objects.pop((kind, name), None) is not None

    def create_event(self, event: dict[str, Any]) -> None:
        self.calls.append(("create", "Event", event["reason"]))

    def writes(self) -> list[tuple[str, str, str]]:
        return [c for c in self.calls if c[0] not in ("get", "list")]


class Recorder:
    """Stands in for the work queue where a test only asks what was enqueued."""

    def __init__(self) -> None:
        self.added: list[tuple[str, str, str]] = []

    def add(self, key: tuple[str, str, str]) -> None:
        self.added.append(key)

    def forget(self, key: tuple[str, str, str]) -> None:
        pass


def _dataset(ready: bool = True) -> dict[str, Any]:
    status = {"revision": "rev-1", "rows": 100, "conditions": [
        {"type": "Ready", "status": "True" if ready else "Unknown", "reason": "Validated" if ready else "Validating",
         "message": "ok", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    return {"apiVersion": "tailor.dev/v1alpha1", "kind": "Dataset",
            "metadata": {"name": "tickets", "namespace": NS, "uid": "ds-uid", "generation": 1,
                         "resourceVersion": "5"},
            "spec": {"source": {"uri": "s3://acme/tickets.jsonl"}, "format": "jsonl", "schema": "instruction"},
            "status": status}


def _job(name: str = "support", **status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "tailor.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS, "uid": f"{name}-uid", "generation": 1, "resourceVersion": "7"},
        "spec": {"backend": "kuberay", "baseModel": {"uri": "hf://acme/tiny-llama"}, "datasetRef": {"name": "tickets"},
                 "hyperparameters": {"maxSteps": 10}, "output": {"uri": "s3://acme/runs"}}}
    if status:
        body["status"] = status
    return body


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    cluster = FakeCluster()
    ctx = Context(settings=OperatorSettings(model_preflight=False), cluster=cluster,  # type: ignore[arg-type]
                  metrics=Metrics(), workdir=tmp_path, resync_seconds=60.0)
    ctx.syncers["FineTuneJob"] = sync_job
    ctx.queue = Recorder()  # type: ignore[assignment]
    return ctx


def _seen(ctx: Context, body: dict[str, Any]) -> None:
    """A watch event, as the kopf handler hands it over; the cluster holds that version too."""
    ctx.cluster.objects[(body["kind"], body["metadata"]["name"])] = copy.deepcopy(body)  # type: ignore[attr-defined]
    (ctx.job_seen if body["kind"] == "FineTuneJob" else ctx.dataset_seen)(copy.deepcopy(body))


# --------------------------------------------------------------------- one reconcile, few calls


def test_first_reconcile_writes_status_then_creates_the_rayjob_without_a_read(ctx: Context) -> None:
    """A new job: status, NetworkPolicy, RayJob (config inside), and no GET before the create, no
    config or progress ConfigMap, no event."""
    _seen(ctx, _dataset())
    _seen(ctx, _job())
    cluster: FakeCluster = ctx.cluster  # type: ignore[assignment]
    cluster.calls.clear()
    ctx.queue.added.clear()  # type: ignore[attr-defined]
    sync_job(ctx, NS, "support")
    assert cluster.calls == [("replace_status", "FineTuneJob", "support"),
                             ("create", "NetworkPolicy", "support-r1"),
                             ("create", "RayJob", "support-r1")]
    assert cluster.objects[("FineTuneJob", "support")]["status"]["currentRun"] == "support-r1"
    assert ctx.queue.added == []  # type: ignore[attr-defined]


def test_a_run_that_already_exists_is_adopted_through_the_create(ctx: Context) -> None:
    """The status lost its run (a predecessor created r1): the create answers AlreadyExists, the
    existing RayJob stays (nothing is created twice) and the job is reconciled again at once."""
    _seen(ctx, _dataset())
    _seen(ctx, _job())
    cluster: FakeCluster = ctx.cluster  # type: ignore[assignment]
    cluster.objects[("RayJob", "support-r1")] = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {
        "name": "support-r1", "namespace": NS, "uid": "old", "resourceVersion": "3",
        "annotations": {"tailor.dev/attempt": "1", "tailor.dev/run-number": "1"},
        "ownerReferences": [{"uid": "support-uid"}]}, "spec": {}}
    ctx.queue.added.clear()  # type: ignore[attr-defined]
    sync_job(ctx, NS, "support")
    assert cluster.objects[("RayJob", "support-r1")]["metadata"]["uid"] == "old"
    assert ctx.queue.added == [("FineTuneJob", NS, "support")]  # type: ignore[attr-defined]


def test_a_first_reconcile_that_starts_nothing_still_finds_an_earlier_run(ctx: Context) -> None:
    """Dataset not Ready: no create would reveal r1, so it is looked up, found and adopted."""
    _seen(ctx, _dataset(ready=False))
    _seen(ctx, _job())
    cluster: FakeCluster = ctx.cluster  # type: ignore[assignment]
    cluster.objects[("RayJob", "support-r1")] = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {
        "name": "support-r1", "namespace": NS, "uid": "old", "resourceVersion": "3",
        "annotations": {"tailor.dev/attempt": "1", "tailor.dev/run-number": "1"},
        "ownerReferences": [{"uid": "support-uid"}]}, "spec": {}}
    sync_job(ctx, NS, "support")
    assert ("get", "RayJob", "support-r1") in cluster.calls
    assert cluster.objects[("FineTuneJob", "support")]["status"]["currentRun"] == "support-r1"
    assert not [c for c in cluster.calls if c[:2] == ("create", "RayJob")]


# ------------------------------------------------------------------ which events reconcile


def test_the_echo_of_the_operators_own_writes_reconciles_nothing(ctx: Context) -> None:
    _seen(ctx, _dataset())
    _seen(ctx, _job())
    sync_job(ctx, NS, "support")
    cluster: FakeCluster = ctx.cluster  # type: ignore[assignment]
    ctx.queue.added.clear()  # type: ignore[attr-defined]
    # the status write and the RayJob create come back as watch events
    ctx.job_seen(copy.deepcopy(cluster.objects[("FineTuneJob", "support")]))
    assert ctx.child_seen("RayJob", copy.deepcopy(cluster.objects[("RayJob", "support-r1")])) is False
    assert ctx.queue.added == []  # type: ignore[attr-defined]
    # once only: a later event of the RayJob (KubeRay writing its status) does reconcile
    later = copy.deepcopy(cluster.objects[("RayJob", "support-r1")])
    later["metadata"]["resourceVersion"] = "999"
    assert ctx.child_seen("RayJob", later) is True


def test_metadata_only_changes_reconcile_nothing_but_spec_changes_do(ctx: Context) -> None:
    _seen(ctx, _dataset())
    _seen(ctx, _job())
    sync_job(ctx, NS, "support")
    cluster: FakeCluster = ctx.cluster  # type: ignore[assignment]
    ctx.queue.added.clear()  # type: ignore[attr-defined]
    labelled = copy.deepcopy(cluster.objects[("FineTuneJob", "support")])
    labelled["metadata"]["resourceVersion"] = "500"
    labelled["metadata"]["labels"] = {"team": "ml"}
    ctx.job_seen(labelled)
    assert ctx.queue.added == []  # type: ignore[attr-defined]
    edited = copy.deepcopy(labelled)
    edited["metadata"]["resourceVersion"], edited["metadata"]["generation"] = "501", 2
    edited["spec"]["suspend"] = True
    ctx.job_seen(edited)
    assert ctx.queue.added == [("FineTuneJob", NS, "support")]  # type: ignore[attr-defined]


def test_a_dataset_status_write_reconciles_its_jobs_once(ctx: Context) -> None:
    """The Dataset's own status write enqueues the jobs that reference it (they read it); its echo
    enqueues neither the Dataset nor them again, and a label change on the Dataset none of them."""
    _seen(ctx, _job())
    _seen(ctx, _dataset(ready=False))
    ctx.queue.added.clear()  # type: ignore[attr-defined]
    written = ctx.cluster.replace_status(_dataset(ready=True))
    ctx.dataset_written(NS, "tickets", written)
    assert ctx.queue.added == [("FineTuneJob", NS, "support")]  # type: ignore[attr-defined]
    ctx.dataset_seen(copy.deepcopy(written))
    labelled = copy.deepcopy(written)
    labelled["metadata"].update(resourceVersion="900", labels={"x": "y"})
    ctx.dataset_seen(labelled)
    assert ctx.queue.added == [("FineTuneJob", NS, "support")]  # type: ignore[attr-defined]


def test_an_unwatched_write_is_not_waited_for(ctx: Context) -> None:
    """A ConfigMap without the managed-by label (a promotion target) never comes back through the
    child watch: its write leaves nothing behind to match."""
    ctx.wrote("ConfigMap", {"kind": "ConfigMap", "metadata": {"name": "target", "namespace": NS,
                                                              "resourceVersion": "3"}})
    ctx.wrote("NetworkPolicy", {"kind": "PartialObjectMetadata", "metadata": {"name": "support-r1", "namespace": NS,
                                                                              "resourceVersion": "4"}})
    assert ctx.own_versions == {}


def test_live_objects_are_resynced_and_deleted_ones_are_not(ctx: Context) -> None:
    ctx.syncers["Dataset"] = lambda c, ns, name: None
    _seen(ctx, _dataset())
    assert 60.0 <= ctx._process(("Dataset", NS, "tickets")) <= 66.0  # type: ignore[operator]
    ctx.dataset_gone(NS, "tickets", "ds-uid")
    assert ctx._process(("Dataset", NS, "tickets")) is None
    # deleted while no DELETED event came (a watch restart): the reconcile finds it gone, once
    _seen(ctx, _job())
    del ctx.cluster.objects[("FineTuneJob", "support")]  # type: ignore[attr-defined]
    ctx.take_body(("FineTuneJob", NS, "support"))
    assert ctx._process(("FineTuneJob", NS, "support")) is None


# ------------------------------------------------------------------------------ queue order


def test_new_keys_are_served_before_rechecks_of_known_ones() -> None:
    order: list[tuple[str, str, str]] = []
    gate, in_gate, done = threading.Event(), threading.Event(), threading.Event()
    expected = 7

    def process(key: tuple[str, str, str]) -> None:
        if key[2] == "gate":
            in_gate.set()
            gate.wait(30)
        order.append(key)
        if len(order) == expected:
            done.set()

    q = WorkQueue(process, workers=1)
    known = [("FineTuneJob", NS, f"known-{i}") for i in range(2)]
    new = [("FineTuneJob", NS, f"new-{i}") for i in range(2)]
    q.start()
    try:
        for key in known:
            q.add(key)
        q.add(("FineTuneJob", NS, "gate"))  # the single worker stops here
        assert in_gate.wait(30)
        for key in known + new:  # re-checks first, then two never-seen keys
            q.add(key)
        gate.set()
        assert done.wait(30)
    finally:
        q.stop()
    assert order[3:] == new + known
    q.forget(known[0])  # a deleted object's name counts as new again
    assert known[0] not in q._known
