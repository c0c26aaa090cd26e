"""With the real KubeRay operator: it accepts Tailor's RayJob, builds the RayCluster and its pods
(which never run: there is no scheduler or kubelet), and a pod the scheduler would reject shows up
in the FineTuneJob's status instead of KubeRay's bare "Initializing"."""

from __future__ import annotations

import re

import pytest

from operator_fixtures import Kube, OperatorProcess, dataset_manifest, job_manifest, ready_result, wait_until

pytestmark = pytest.mark.integration

UNSCHEDULABLE = "0/12 nodes are available: 12 Insufficient nvidia.com/gpu. preemption: 0/12 nodes are available"


@pytest.fixture
def real_kuberay(control_plane):
    control_plane.start_kuberay()
    yield control_plane
    control_plane.stop_kuberay()  # other modules play KubeRay themselves


def test_unschedulable_worker_pods_show_in_the_job_status(real_kuberay, k8s_client, namespace, tmp_path) -> None:
    kube = Kube(k8s_client, namespace)
    operator = OperatorProcess(real_kuberay.kubeconfig, tmp_path / "op", namespaces=[namespace]).start()
    try:
        kube.apply(dataset_manifest("tickets"))
        kube.publish_validation("tickets", ready_result())
        wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 30, what="Ready")
        kube.apply(job_manifest("gpu", resources={"workers": 2, "gpusPerWorker": 1, "cpusPerWorker": "4",
                                                  "memoryPerWorker": "16Gi", "nodeSelector": {"pool": "a100"}}))
        # KubeRay takes the RayJob: a RayCluster and pods carrying Tailor's labels appear
        wait_until(lambda: (kube.get("RayJob", "gpu-r1") or {}).get("status", {}).get("jobDeploymentStatus")
                   == "Initializing", 60, what="KubeRay Initializing", on_timeout=lambda: real_kuberay.log_tails(30))
        workers = wait_until(lambda: [p for p in kube.list("Pod", {"tailor.dev/run": "gpu-r1"})
                                      if "worker" in p["metadata"]["name"]], 60, what="worker pods")
        pod = workers[0]
        assert pod["spec"]["nodeSelector"] == {"pool": "a100"}
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        # play the scheduler: this pod cannot be placed
        kube.patch("Pod", pod["metadata"]["name"], {"status": {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE,
            "lastTransitionTime": "2026-03-02T10:00:00Z"}]}}, sub="status")
        status = wait_until(lambda: (s := kube.status("FineTuneJob", "gpu")).get("error", {}).get("reason")
                            == "Unschedulable" and s, 30, what="Unschedulable in status", on_timeout=operator.log_tail)
        assert status["phase"] == "Queued"
        assert "Insufficient nvidia.com/gpu" in status["error"]["message"]
        running = kube.condition("FineTuneJob", "gpu", "Running")
        assert (running["status"], running["reason"]) == ("False", "Unschedulable")
        wide = real_kuberay.kubectl("get", "ftj", "gpu", "-n", namespace, "-o", "wide", check=True).stdout
        assert re.search(r"gpu\s+Queued\s.*gpu-r1\s+Unschedulable", wide), wide
        kube.wait_event("gpu", "Unschedulable")
        # deletion still cleans up through KubeRay's own finalizers
        kube.delete("FineTuneJob", "gpu")
        wait_until(lambda: kube.get("FineTuneJob", "gpu") is None and kube.get("RayJob", "gpu-r1") is None, 30,
                   what="job and RayJob gone")
    finally:
        operator.stop()
