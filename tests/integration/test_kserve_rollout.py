"""KServe for real: the InferenceService CRD of a pinned KServe release (testenv/kserve/, see its
PROVENANCE) in the test control plane; the promotion patches must be accepted by the API server
against its schema, and the canary flow must move spec.predictor.canaryTrafficPercent as KServe
documents. There is no KServe controller here: the test writes the InferenceService's status
(observedGeneration, Ready, traffic) through the status subresource, as the KubeRay tests write
RayJob status. Operator: backend kuberay, the test playing KubeRay and the trainer."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from operator_fixtures import (
    REPO,
    Kube,
    OperatorProcess,
    dataset_manifest,
    job_manifest,
    ready_result,
    result_doc,
    wait_until,
)

pytestmark = pytest.mark.integration

KSERVE_CRD = REPO / "testenv" / "kserve" / "serving.kserve.io_inferenceservices.yaml"


@pytest.fixture(scope="module")
def kserve_crd(control_plane):
    """The real InferenceService CRD, loaded only for this module (scripts/testenv up stays fast)."""
    r = control_plane.kubectl("apply", "--server-side", "--field-manager=tailor-test", "-f", str(KSERVE_CRD),
                              timeout=180)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: control_plane.kubectl("get", "inferenceservices", "-A").returncode == 0, 120,
               what="InferenceService CRD established")
    yield
    control_plane.kubectl("delete", "-f", str(KSERVE_CRD), "--wait=false")


@pytest.fixture(scope="module")
def operator(control_plane, kserve_crd, tmp_path_factory):
    control_plane.stop_kuberay()  # this module plays KubeRay itself
    op = OperatorProcess(control_plane.kubeconfig, tmp_path_factory.mktemp("operator")).start()
    yield op
    op.stop()


@pytest.fixture
def kube(k8s_client, namespace, operator) -> Kube:
    return Kube(k8s_client, namespace)


def _isvc(name: str, uri: str) -> dict[str, Any]:
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": name},
            "spec": {"predictor": {"model": {"modelFormat": {"name": "huggingface"}, "storageUri": uri}}}}


def _kserve_status(kube: Kube, name: str, ready: str, traffic: list[tuple[str, int, bool]],
                   reason: str = "", message: str = "") -> None:
    """Play KServe: report the current generation with Ready and the predictor's traffic split."""
    isvc = kube.get("InferenceService", name)
    assert isvc is not None
    gen = isvc["metadata"]["generation"]
    latest = f"{name}-predictor-{gen:05d}"
    kube.patch("InferenceService", name, {"status": {
        "observedGeneration": gen,
        "conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": message,
                        "lastTransitionTime": "2026-03-01T12:00:00Z"}],
        "components": {"predictor": {
            "latestCreatedRevision": latest, **({"latestReadyRevision": latest} if ready == "True" else {}),
            "traffic": [{"revisionName": rev, "percent": pct, "latestRevision": last,
                         **({"tag": "prev"} if not last else {})} for rev, pct, last in traffic]}}}}, sub="status")


def test_promotion_patches_are_accepted_by_the_real_inferenceservice_crd(kube: Kube, control_plane) -> None:
    from tailor_operator.builders.promotion import build_inference_service_patch
    from tailor_operator.cluster import ApiError

    kube.apply(_isvc("support-llm", "s3://acme/models/base"))
    golden = yaml.safe_load((REPO / "tests/data/promotion-inferenceservice/expected.yaml").read_text())
    after = kube.patch("InferenceService", "support-llm", golden)
    assert after["spec"]["predictor"]["model"]["storageUri"] == golden["spec"]["predictor"]["model"]["storageUri"]
    assert after["spec"]["predictor"]["model"]["modelFormat"] == {"name": "huggingface"}  # merge: the rest stays
    canary = kube.patch("InferenceService", "support-llm", build_inference_service_patch("r2", "s3://m/r2", 10, True))
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10
    done = kube.patch("InferenceService", "support-llm", build_inference_service_patch("r2", "s3://m/r2", None, True))
    assert "canaryTrafficPercent" not in done["spec"]["predictor"]
    # the schema is really enforced (a structural CRD, not preserve-unknown-fields)
    with pytest.raises(ApiError) as e:
        kube.patch("InferenceService", "support-llm", {"spec": {"predictor": {"canaryTrafficPercent": "ten"}}})
    assert e.value.status == 422 and "canaryTrafficPercent" in str(e.value)
    table = control_plane.kubectl("get", "isvc", "support-llm", "-n", kube.ns, check=True).stdout
    assert "support-llm" in table


def _finish_run(kube: Kube, run: str, loss: float) -> None:
    wait_until(lambda: kube.get("RayJob", run), 30, what=f"RayJob {run}")
    kube.write_progress(run, result_doc(run, loss))
    kube.set_rayjob_status(run, "Complete", "SUCCEEDED")


def _model(run: str) -> str:
    return f"s3://acme/runs/support/{run}/train/model"


def _predictor(kube: Kube) -> dict[str, Any]:
    return (kube.get("InferenceService", "llm") or {}).get("spec", {}).get("predictor", {})


def test_canary_holds_then_gets_all_traffic_and_a_failed_canary_is_rolled_back(kube: Kube, operator) -> None:
    kube.apply(dataset_manifest("tickets"))
    kube.publish_validation("tickets", ready_result("rev-1"))
    wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 30, what="Dataset Ready")
    kube.apply(_isvc("llm", "s3://acme/models/base"))
    hold = 4
    kube.apply(job_manifest("cl", continuousLearning={"promotion": {"target": {"inferenceService": {
        "name": "llm", "canaryTrafficPercent": 10, "canaryHoldSeconds": hold, "progressDeadlineSeconds": 120}}}}))

    # r1: the first champion has nothing to fall back to, so it goes straight to all traffic
    _finish_run(kube, "cl-r1", 1.2)
    wait_until(lambda: _predictor(kube).get("model", {}).get("storageUri") == _model("cl-r1"), 30,
               what="r1 in the InferenceService", on_timeout=operator.log_tail)
    assert "canaryTrafficPercent" not in _predictor(kube)
    _kserve_status(kube, "llm", "True", [("llm-predictor-00002", 100, True)])

    # r2 is better: it starts as a 10% canary and holds there while KServe reports it Ready
    kube.new_revision("tickets", "rev-2")
    _finish_run(kube, "cl-r2", 1.0)
    wait_until(lambda: _predictor(kube).get("canaryTrafficPercent") == 10, 30, what="canary at 10%",
               on_timeout=operator.log_tail)
    assert _predictor(kube)["model"]["storageUri"] == _model("cl-r2")
    status = kube.status("FineTuneJob", "cl")
    assert status["champion"]["run"] == "cl-r2"
    assert status["rollout"]["phase"] == "Progressing" and status["rollout"]["canaryTrafficPercent"] == 10
    assert status["rollout"]["previous"]["run"] == "cl-r1"
    _kserve_status(kube, "llm", "True", [("llm-predictor-00002", 90, False), ("llm-predictor-00003", 10, True)])
    assert _predictor(kube).get("canaryTrafficPercent") == 10  # still holding right after Ready
    wait_until(lambda: "canaryTrafficPercent" not in _predictor(kube), hold + 30, what="canary promoted to 100%",
               on_timeout=lambda: json.dumps(kube.status("FineTuneJob", "cl").get("rollout")) + operator.log_tail(30))
    status = wait_until(lambda: (s := kube.status("FineTuneJob", "cl")).get("rollout", {}).get("phase") == "Succeeded"
                        and s, 20, what="rollout Succeeded")
    held = (json_time(status["rollout"]["finishedAt"]) - json_time(status["rollout"]["readySince"]))
    assert held >= hold, status["rollout"]  # Ready for the whole hold before all traffic
    assert _predictor(kube)["model"]["storageUri"] == _model("cl-r2")
    _kserve_status(kube, "llm", "True", [("llm-predictor-00004", 100, True)])

    # r3 is better too, but its revision fails in KServe: back to r2, which stays champion
    kube.new_revision("tickets", "rev-3")
    _finish_run(kube, "cl-r3", 0.8)
    wait_until(lambda: _predictor(kube).get("model", {}).get("storageUri") == _model("cl-r3")
               and _predictor(kube).get("canaryTrafficPercent") == 10, 30, what="r3 canary")
    _kserve_status(kube, "llm", "False", [("llm-predictor-00004", 100, False)], reason="RevisionFailed",
                   message="Revision llm-predictor-00005 failed with message: container exited with code 1")
    wait_until(lambda: _predictor(kube).get("model", {}).get("storageUri") == _model("cl-r2")
               and "canaryTrafficPercent" not in _predictor(kube), 30, what="rolled back to r2",
               on_timeout=operator.log_tail)
    status = kube.status("FineTuneJob", "cl")
    assert status["champion"]["run"] == "cl-r2"
    assert status["rollout"]["phase"] == "Failed" and "RevisionFailed" in status["rollout"]["message"]
    assert [(h["run"], h["promoted"], h.get("reason")) for h in status["history"]] == [
        ("cl-r1", True, "FirstChampion"), ("cl-r2", True, "Improved"), ("cl-r3", False, "RolledBack")]
    promoted = kube.condition("FineTuneJob", "cl", "Promoted")
    assert promoted["status"] == "False" and promoted["reason"] == "RolledBack"
    reasons = wait_until(lambda: (r := kube.event_reasons("cl")) and "RolledBack" in r and r, 10, what="events")
    assert reasons.count("RolloutStarted") == 2 and reasons.count("RolloutSucceeded") == 1
    assert kube.get("InferenceService", "llm")["metadata"]["annotations"]["tailor.dev/champion-run"] == "cl-r2"


def json_time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_kserve_crd_provenance_matches_the_vendored_file() -> None:
    import hashlib

    provenance = (REPO / "testenv" / "kserve" / "PROVENANCE").read_text()
    digest = hashlib.sha256(KSERVE_CRD.read_bytes()).hexdigest()
    assert f"sha256: {digest}" in provenance
    assert (REPO / "testenv" / "kserve" / "LICENSE").read_text().lstrip().startswith("Apache License")
