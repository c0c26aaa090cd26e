"""The per-job series on the operator's real /metrics, the operator running against the real
control plane (backend kuberay, the test playing KubeRay and the trainer as in
test_operator_kuberay.py): the live run series appear while the run trains, follow its progress,
and are gone once it has finished; the phase and Dataset series the alerts read are there; a
deleted job leaves no series behind."""

from __future__ import annotations

import re
import time

import pytest

from operator_fixtures import Kube, OperatorProcess, dataset_manifest, job_manifest, ready_result, result_doc, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    control_plane.stop_kuberay()  # the test plays KubeRay; a real one would fight it
    op = OperatorProcess(control_plane.kubeconfig, tmp_path_factory.mktemp("operator")).start()
    yield op
    op.stop()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of `name` whose labels include `labels` (None when absent)."""
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(2))
    return None


def test_live_series_follow_a_run(k8s_client, namespace, operator) -> None:
    kube = Kube(k8s_client, namespace)
    job = {"namespace": namespace, "finetunejob": "live"}
    kube.apply(dataset_manifest("tickets"))
    kube.publish_validation("tickets", ready_result("sha256:0123456789abcdef"))
    wait_until(lambda: sample(operator.metrics(), "tailor_dataset_ready", namespace=namespace, dataset="tickets") == 1,
               30, what="tailor_dataset_ready 1")

    kube.apply(job_manifest("live"))
    wait_until(lambda: kube.get("RayJob", "live-r1"), 30, what="RayJob live-r1")
    wait_until(lambda: sample(operator.metrics(), "tailor_finetunejob_status_phase", phase="Queued", **job) == 1,
               30, what="phase Queued on /metrics")
    assert sample(operator.metrics(), "tailor_run_progress_ratio", **job) is None  # nothing in flight yet

    kube.set_rayjob_status("live-r1", "Running", "RUNNING")
    before = time.time()
    kube.write_progress("live-r1", {"run": "live-r1", "attempt": 1, "stage": "train", "state": "Running",
                                    "step": 120, "totalSteps": 300, "loss": 1.9, "tokensPerSecond": 4096,
                                    "etaSeconds": 300})
    text = wait_until(lambda: (t := operator.metrics()) and sample(t, "tailor_run_progress_ratio", **job) == 0.4
                      and t, 30, what="tailor_run_progress_ratio 0.4")
    assert sample(text, "tailor_run_train_loss", **job) == 1.9
    assert sample(text, "tailor_run_tokens_per_second", **job) == 4096
    assert sample(text, "tailor_run_eta_seconds", **job) == 300
    moved = sample(text, "tailor_run_last_progress_timestamp_seconds", **job)
    assert moved is not None and before - 5 <= moved <= time.time()
    assert sample(text, "tailor_finetunejob_status_phase", phase="Running", **job) == 1
    for name in ("tailor_run_progress_ratio", "tailor_finetunejob_status_phase"):  # bounded labels
        for m in re.finditer(rf"^{name}\{{([^}}]*)\}}", text, re.M):
            assert set(re.findall(r'(\w+)="', m.group(1))) <= {"namespace", "finetunejob", "phase"}

    kube.write_progress("live-r1", result_doc("live-r1", 1.25))
    kube.set_rayjob_status("live-r1", "Complete", "SUCCEEDED")
    text = wait_until(lambda: (t := operator.metrics())
                      and sample(t, "tailor_finetunejob_status_phase", phase="Succeeded", **job) == 1 and t,
                      30, what="phase Succeeded on /metrics")
    for name in ("tailor_run_progress_ratio", "tailor_run_train_loss", "tailor_run_tokens_per_second",
                 "tailor_run_eta_seconds", "tailor_run_last_progress_timestamp_seconds"):
        assert sample(text, name, **job) is None, name

    kube.delete("FineTuneJob", "live")
    wait_until(lambda: sample(operator.metrics(), "tailor_finetunejob_status_phase", phase="Succeeded", **job) is None,
               30, what="series of the deleted job removed")
    kube.delete("Dataset", "tickets")
    wait_until(lambda: sample(operator.metrics(), "tailor_dataset_ready", namespace=namespace, dataset="tickets")
               is None, 30, what="series of the deleted Dataset removed")
