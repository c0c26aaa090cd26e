"""The model check (builders/preflight_job.py) against the real control plane: no RayJob, so no
GPU, until the CPU check of the base model passes. The test plays the check's pod (no kubelet
here); tests/e2e runs the real one in the trainer image. Its own operator, in this module only:
the other modules' operators run with the check off."""

from __future__ import annotations

import json
import time

import pytest

from operator_fixtures import Kube, OperatorProcess, dataset_manifest, job_manifest, ready_result, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_kuberay(control_plane):
    control_plane.stop_kuberay()  # the test plays KubeRay's part (nothing of it is needed here)


def _ready_dataset(kube: Kube) -> None:
    kube.apply(dataset_manifest("tickets"))
    kube.publish_validation("tickets", ready_result())
    wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 30, what="Ready")


def test_no_rayjob_before_the_model_check_passes(k8s_client, namespace, control_plane, tmp_path) -> None:
    """With the model check on (the default; off elsewhere in these tests, where no pod runs), the
    operator creates the CPU check Job and no RayJob; a failed verdict fails the job with the
    check's reason and field and still no RayJob; the fixed spec is checked again and, once the
    check passes, its RayJob is created."""
    kube = Kube(k8s_client, namespace)
    op = OperatorProcess(control_plane.kubeconfig, tmp_path / "op", namespaces=[namespace],
                         env={"TAILOR_MODEL_PREFLIGHT": "true"}).start()
    selector = {"tailor.dev/finetunejob": "checked", "app.kubernetes.io/name": "tailor-preflight"}
    try:
        _ready_dataset(kube)
        kube.apply(job_manifest("checked", adaptation={"method": "lora", "lora": {"targetModules": ["qkv"]}}))
        check = wait_until(lambda: next(iter(kube.list("Job", selector)), None), 30, what="the model check Job",
                           on_timeout=op.log_tail)
        key = check["metadata"]["name"]
        pod = check["spec"]["template"]["spec"]
        assert "tailor_trainer preflight" in pod["containers"][0]["command"][-1], pod["containers"][0]
        assert "nvidia.com/gpu" not in json.dumps(pod), pod
        config = json.loads(kube.get("ConfigMap", key)["data"]["config.json"])
        assert config["adaptation"]["lora"]["targetModules"] == ["qkv"], config["adaptation"]
        time.sleep(2)
        assert kube.list("RayJob") == [], "a RayJob before the model check passed"
        status = kube.status("FineTuneJob", "checked")
        assert status["phase"] == "Pending" and kube.condition("FineTuneJob", "checked", "ModelChecked")["reason"] \
            == "Checking", status
        # play the check pod: the verdict
        message = "spec.adaptation.lora.targetModules: qkv not found in llama model hf://acme/tiny-llama; it has: q_proj"
        kube.patch("ConfigMap", key, {"data": {"status.json": json.dumps({
            "ok": False, "reason": "UnknownTargetModules", "message": message,
            "field": "spec.adaptation.lora.targetModules"})}})
        status = wait_until(lambda: (s := kube.status("FineTuneJob", "checked")).get("phase") == "Failed" and s,
                            30, what="phase Failed", on_timeout=op.log_tail)
        assert status["error"] == {"reason": "UnknownTargetModules", "message": message,
                                   "field": "spec.adaptation.lora.targetModules"}, status["error"]
        assert kube.list("RayJob") == []
        # the user fixes the spec: a new check (the old one is deleted), then the run
        kube.patch("FineTuneJob", "checked", {"spec": {"adaptation": {"lora": {"targetModules": ["q_proj"]}}}})
        new = wait_until(lambda: next((j for j in kube.list("Job", selector) if j["metadata"]["name"] != key), None),
                         30, what="a new model check for the fixed spec", on_timeout=op.log_tail)
        wait_until(lambda: kube.get("ConfigMap", key) is None, 30, what="the old check deleted")
        kube.patch("ConfigMap", new["metadata"]["name"], {"data": {"status.json": json.dumps({
            "ok": True, "model": {"modelType": "llama", "parameters": 4200000}})}})
        wait_until(lambda: kube.get("RayJob", "checked-r1"), 30, what="RayJob checked-r1", on_timeout=op.log_tail)
        assert kube.condition("FineTuneJob", "checked", "ModelChecked")["status"] == "True"
    finally:
        op.stop()
