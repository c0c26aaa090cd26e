"""Installation policy through the API server (issue 11): the operator with the chart's default
policy (kuberay only, no image override, no local paths, no private addresses) refuses each spec a
tenant could use to borrow the operator's identity or reach the node's internals. Each refusal is
a condition naming the field and the chart value, with a Warning event, and nothing is created:
no RayJob, no ConfigMap, no validation Job, no NetworkPolicy. (The credential query string never
gets this far: the CRD's CEL rule refuses it at `kubectl apply`, tests/integration/test_control_plane.py.)
"""

from __future__ import annotations

import pytest

from operator_fixtures import Kube, OperatorProcess, dataset_manifest, job_manifest, wait_until

pytestmark = [pytest.mark.integration]

# the chart's defaults (charts/tailor/values.yaml policy.*), over the test installation's opt-ins
CHART_POLICY = {"TAILOR_ALLOWED_BACKENDS": "kuberay", "TAILOR_ALLOWED_LOCAL_ROOTS": "",
                "TAILOR_ALLOW_IMAGE_OVERRIDE": "false", "TAILOR_ALLOW_PRIVATE_ADDRESSES": "false"}


def test_each_policy_refusal_is_a_named_condition_and_creates_nothing(control_plane, k8s_client, namespace,
                                                                     tmp_path) -> None:
    kube = Kube(k8s_client, namespace)
    control_plane.stop_kuberay()  # nothing may be created; no KubeRay needed to show it
    operator = OperatorProcess(control_plane.kubeconfig, tmp_path / "op", namespaces=[namespace],
                               env=CHART_POLICY).start()
    try:
        kube.apply(dataset_manifest("tickets"))  # s3://: allowed
        kube.apply(dataset_manifest("local-file", source={"uri": "/etc/passwd"}))
        kube.apply(dataset_manifest("metadata", source={"uri": "http://169.254.169.254/latest/meta-data/x.jsonl"}))
        kube.apply(job_manifest("local-backend", backend="local"))
        kube.apply(job_manifest("own-image", resources={"workers": 1, "gpusPerWorker": 1, "cpusPerWorker": "4",
                                                        "memoryPerWorker": "16Gi", "image": "evil.io/miner:1"}))
        kube.apply(job_manifest("local-model", baseModel={"uri": "file:///var/run/secrets/kubernetes.io"}))

        for name, field, value in (("local-file", "spec.source.uri", "policy.allowedLocalRoots"),
                                   ("metadata", "spec.source.uri", "policy.allowPrivateAddresses")):
            cond = wait_until(lambda: (c := kube.condition("Dataset", name, "Ready")).get("reason") == "PolicyViolation"
                              and c, 30, interval=0.5, what=f"Dataset {name} refused", on_timeout=operator.log_tail)
            assert cond["status"] == "False" and field in cond["message"] and value in cond["message"], cond
            kube.wait_event(name, "PolicyViolation")
        for name, field, value in (("local-backend", "spec.backend", "policy.allowedBackends"),
                                   ("own-image", "spec.resources.image", "policy.allowImageOverride"),
                                   ("local-model", "spec.baseModel.uri", "policy.allowedLocalRoots")):
            st = wait_until(lambda: (s := kube.status("FineTuneJob", name)).get("phase") == "Failed" and s, 30,
                            interval=0.5, what=f"FineTuneJob {name} refused", on_timeout=operator.log_tail)
            assert st["error"]["reason"] == "PolicyViolation" and st["error"]["field"] == field, st
            assert value in st["error"]["message"], st
            kube.wait_event(name, "PolicyViolation")
        # the allowed Dataset went on to validation (a Job): the operator was not simply idle
        wait_until(lambda: kube.list("Job", {"tailor.dev/dataset": "tickets"}), 30, what="the allowed Dataset's Job")
        for name in ("local-file", "metadata"):
            assert not kube.list("Job", {"tailor.dev/dataset": name}), name
        for name in ("local-backend", "own-image", "local-model"):
            labels = {"tailor.dev/finetunejob": name}
            assert not kube.list("RayJob", labels) and not kube.list("ConfigMap", labels), name
            assert not kube.list("NetworkPolicy", labels), name
        assert not list((tmp_path / "op").rglob("run.json")), "a local run was started"
    finally:
        operator.stop()
