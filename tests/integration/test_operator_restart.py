"""Never a duplicate: an operator SIGKILLed right after creating a RayJob, and one that finds a
RayJob its predecessor created but never recorded, both end with exactly one RayJob per run."""

from __future__ import annotations

import time

import pytest

from operator_fixtures import Kube, OperatorProcess, dataset_manifest, job_manifest, ready_result, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def kube(k8s_client, namespace, control_plane) -> Kube:
    control_plane.stop_kuberay()
    return Kube(k8s_client, namespace)


def _ready_dataset(kube: Kube) -> None:
    kube.apply(dataset_manifest("tickets"))
    kube.publish_validation("tickets", ready_result())
    wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 30, what="Ready")


def test_sigkill_right_after_rayjob_creation_leaves_exactly_one(kube: Kube, control_plane, tmp_path) -> None:
    first = OperatorProcess(control_plane.kubeconfig, tmp_path / "a", namespaces=[kube.ns]).start()
    try:
        _ready_dataset(kube)
        kube.apply(job_manifest("crashy"))
        created = wait_until(lambda: kube.get("RayJob", "crashy-r1"), 30, interval=0.01, what="RayJob")
        first.kill()  # SIGKILL within ~10 ms of the RayJob appearing
    finally:
        first.kill()
    second = OperatorProcess(control_plane.kubeconfig, tmp_path / "b", namespaces=[kube.ns]).start()
    try:
        status = wait_until(lambda: (s := kube.status("FineTuneJob", "crashy")).get("currentRun") == "crashy-r1"
                            and s.get("phase") == "Queued" and s, 30, what="status after restart",
                            on_timeout=second.log_tail)
        time.sleep(3)  # several reconciles later, still one
        rayjobs = kube.list("RayJob")
        assert [r["metadata"]["name"] for r in rayjobs] == ["crashy-r1"]
        assert rayjobs[0]["metadata"]["uid"] == created["metadata"]["uid"]  # adopted, not recreated
        assert kube.status("FineTuneJob", "crashy")["runCount"] == status["runCount"] == 1
    finally:
        second.stop()


def test_rayjob_created_but_never_recorded_is_adopted(kube: Kube, control_plane, tmp_path) -> None:
    """The state a crash between `create RayJob` and `write status` leaves: the run exists, the
    status knows nothing. The new operator adopts it (event Adopted) and creates nothing."""
    from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob
    from tailor_operator.builders.rayjob import RayJobOptions, build_rayjob

    kube.apply(dataset_manifest("tickets"))
    job_body = kube.apply(job_manifest("orphaned"))
    dataset = Dataset.model_validate(kube.get("Dataset", "tickets"))
    rayjob = build_rayjob(FineTuneJob.model_validate(job_body), dataset, "orphaned-r1", number=1, attempt=1,
                          dataset_revision=None, config_hash="0" * 16, options=RayJobOptions())
    kube.cluster.create(rayjob)
    operator = OperatorProcess(control_plane.kubeconfig, tmp_path / "op", namespaces=[kube.ns]).start()
    try:
        status = wait_until(lambda: (s := kube.status("FineTuneJob", "orphaned")).get("currentRun") and s, 30,
                            what="adoption", on_timeout=operator.log_tail)
        assert status["currentRun"] == "orphaned-r1" and status["runCount"] == 1
        kube.wait_event("orphaned", "Adopted")
        kube.publish_validation("tickets", ready_result())
        kube.set_rayjob_status("orphaned-r1", "Running", "RUNNING")
        wait_until(lambda: kube.status("FineTuneJob", "orphaned").get("phase") == "Running", 30, what="Running")
        assert [r["metadata"]["name"] for r in kube.list("RayJob")] == ["orphaned-r1"]
    finally:
        operator.stop()
