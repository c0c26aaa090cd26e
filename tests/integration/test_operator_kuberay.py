"""The operator against the real control plane, backend kuberay, with the tests playing KubeRay and
the trainer: they write RayJob status through the status subresource and the progress document
into the run's ConfigMap, and the FineTuneJob must follow. One operator process for the module."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
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


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    control_plane.stop_kuberay()  # this module plays KubeRay itself; a real one would fight it
    # no scheduler here: a validation pod never starts, which the Dataset names after this grace
    op = OperatorProcess(control_plane.kubeconfig, tmp_path_factory.mktemp("operator"),
                         env={"TAILOR_VALIDATION_START_GRACE_SECONDS": "8"}).start()
    yield op
    op.stop()


@pytest.fixture
def kube(k8s_client, namespace, operator) -> Kube:
    return Kube(k8s_client, namespace)


def _ready_dataset(kube: Kube, name: str = "tickets", revision: str = "sha256:0123456789abcdef") -> None:
    kube.apply(dataset_manifest(name))
    kube.publish_validation(name, ready_result(revision))
    wait_until(lambda: kube.condition("Dataset", name, "Ready").get("status") == "True", 30, what="Dataset Ready")


def _rayjob(kube: Kube, name: str, timeout: float = 30) -> dict[str, Any]:
    return wait_until(lambda: kube.get("RayJob", name), timeout, what=f"RayJob {name}")


def _phase(kube: Kube, name: str, phase: str, timeout: float = 30, op: OperatorProcess | None = None) -> dict:
    return wait_until(lambda: (s := kube.status("FineTuneJob", name)).get("phase") == phase and s, timeout,
                      what=f"phase {phase}", on_timeout=lambda: json.dumps(kube.status("FineTuneJob", name))
                      + (op.log_tail(40) if op else ""))


def _subset(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where `actual` differs from `expected` (ignoring fields the API server added)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: {actual!r} is not a map"]
        return [d for k, v in expected.items() for d in _subset(v, actual.get(k), f"{path}.{k}")]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: {actual!r} != {expected!r}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in _subset(e, a, f"{path}[{i}]")]
    return [] if expected == actual else [f"{path}: {actual!r} != {expected!r}"]


# ----------------------------------------------------------------------------------- RayJob


def test_golden_rayjob_is_accepted_by_the_real_kuberay_crd(k8s_client, namespace) -> None:
    """The builder's golden manifest (tests/data/rayjob-gpu-workers) passes the real RayJob CRD
    schema and CEL rules (server-side dry run: its owner does not exist here)."""
    kube = Kube(k8s_client, namespace)
    docs = list(yaml.safe_load_all((REPO / "tests/data/rayjob-gpu-workers/expected.yaml").read_text()))
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        result = kube.cluster.request("POST", f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
                                      if doc["kind"] == "RayJob" else f"/api/v1/namespaces/{namespace}/configmaps",
                                      body=doc, query={"dryRun": "All", "fieldValidation": "Strict"})
        assert result["metadata"]["name"] == doc["metadata"]["name"]
        part = "spec" if doc["kind"] == "RayJob" else "data"
        assert not _subset(doc.get(part) or {}, result.get(part) or {})


def test_dataset_is_validated_by_a_job_before_it_is_ready(kube: Kube) -> None:
    kube.apply(dataset_manifest("tickets", refreshInterval="1h"))
    job = wait_until(lambda: next(iter(kube.list("Job", {"tailor.dev/dataset": "tickets"})), None), 30,
                     what="validation Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/tailor-dev/tailor-trainer:0.1.0"
    assert "python -m tailor_trainer inspect" in container["command"][-1]
    assert kube.condition("Dataset", "tickets", "Ready").get("status") == "Unknown"
    kube.publish_validation("tickets", ready_result("sha256:feedfacecafebeef", rows=500))
    wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 30, what="Ready")
    status = kube.status("Dataset", "tickets")
    assert status["revision"] == "sha256:feedfacecafebeef"
    assert status["rows"] == 500 and status["splits"] == {"train": 400, "validation": 50, "test": 50}
    assert status["dropped"] == {"duplicate": 10, "tooShort": 2}
    assert {"Validating", "Validated"} <= set(kube.event_reasons("tickets"))


def test_a_validation_pod_that_never_starts_is_named_then_the_result_still_counts(kube: Kube) -> None:
    kube.apply(dataset_manifest("stuck"))
    ready = wait_until(lambda: (c := kube.condition("Dataset", "stuck", "Ready")).get("reason")
                       == "ValidationNotStarted" and c, 60, what="Ready reason ValidationNotStarted")
    assert ready["status"] == "Unknown"
    assert "is Pending and not scheduled to any node" in ready["message"], ready["message"]
    assert "needs a node and a scheduler" in ready["message"]
    assert kube.condition("Dataset", "stuck", "Validating")["reason"] == "ValidationNotStarted"
    kube.wait_event("stuck", "ValidationNotStarted")
    kube.publish_validation("stuck", ready_result("sha256:0123456789abcdef"))
    wait_until(lambda: kube.condition("Dataset", "stuck", "Ready").get("status") == "True", 30, what="Ready")


def test_missing_dataset_gets_a_clear_condition_and_no_rayjob(kube: Kube) -> None:
    kube.apply(job_manifest("orphan", dataset="nope"))
    cond = wait_until(lambda: (c := kube.condition("FineTuneJob", "orphan", "DataValidated")).get("reason") and c,
                      30, what="DataValidated")
    assert (cond["status"], cond["reason"]) == ("False", "DatasetNotFound")
    status = kube.status("FineTuneJob", "orphan")
    assert status["phase"] == "Pending"
    assert status["error"] == {"reason": "DatasetNotFound", "message": cond["message"], "field": "spec.datasetRef.name"}
    time.sleep(2)
    assert kube.list("RayJob") == []
    # creating the Dataset later is enough: the job follows
    _ready_dataset(kube, "nope")
    _rayjob(kube, "orphan-r1")


def test_unknown_target_modules_fail_before_any_rayjob(kube: Kube, tmp_path: Path) -> None:
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    _ready_dataset(kube)
    kube.apply(job_manifest("typo", baseModel={"uri": str(model)},
                            adaptation={"method": "lora", "lora": {"targetModules": ["q_proj", "qkv_proj"]}}))
    status = _phase(kube, "typo", "Failed")
    assert status["error"]["reason"] == "UnknownTargetModules"
    assert status["error"]["field"] == "spec.adaptation.lora.targetModules"
    assert "qkv_proj" in status["error"]["message"] and "v_proj" in status["error"]["message"]
    assert kube.list("RayJob") == []


def test_run_follows_rayjob_and_progress_to_succeeded(kube: Kube, control_plane, operator) -> None:
    from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob
    from tailor_operator.builders.rayjob import RayJobOptions, build_rayjob

    _ready_dataset(kube)
    kube.apply(job_manifest("support", queueName="team-ml",
                            resources={"workers": 2, "gpusPerWorker": 1, "cpusPerWorker": "4",
                                       "memoryPerWorker": "16Gi", "nodeSelector": {"pool": "gpu"},
                                       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}))
    rayjob = _rayjob(kube, "support-r1")
    # the RayJob in the cluster is exactly what the pure builder renders for this job
    job = FineTuneJob.model_validate(kube.get("FineTuneJob", "support"))
    dataset = Dataset.model_validate(kube.get("Dataset", "tickets"))
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    expected = build_rayjob(job, dataset, "support-r1", number=1, attempt=1,
                            dataset_revision="sha256:0123456789abcdef",
                            config_hash=rayjob["metadata"]["annotations"]["tailor.dev/config-hash"],
                            options=RayJobOptions(), config_json=head["metadata"]["annotations"]["tailor.dev/config"])
    assert not _subset(expected["spec"], rayjob["spec"])
    assert not _subset(expected["metadata"]["labels"], rayjob["metadata"]["labels"])
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-ml"
    assert rayjob["metadata"]["ownerReferences"][0]["uid"] == job.metadata.uid
    config = kube.run_config("support-r1")
    assert config["run"] == {"job": "support", "namespace": kube.ns, "name": "support-r1", "attempt": 1}
    # one create started the run: no config ConfigMap, and no progress ConfigMap until the trainer writes one
    assert kube.list("ConfigMap", {"tailor.dev/finetunejob": "support"}) == []
    assert config["progress"] == {"configMap": "support-r1-progress"}
    assert _phase(kube, "support", "Queued")["currentRun"] == "support-r1"

    kube.set_rayjob_status("support-r1", "Initializing")
    kube.set_rayjob_status("support-r1", "Running", "RUNNING")
    kube.write_progress("support-r1", {"run": "support-r1", "attempt": 1, "stage": "train", "state": "Running",
                                       "step": 120, "totalSteps": 300, "loss": 1.9, "tokensPerSecond": 4096,
                                       "etaSeconds": 300})
    status = wait_until(lambda: (s := kube.status("FineTuneJob", "support")).get("progress", {}).get("step") == 120
                        and s, 30, what="progress 120/300")
    # the trainer created its progress ConfigMap; reading it, the operator made the job its owner
    sink = wait_until(lambda: (c := kube.get("ConfigMap", "support-r1-progress"))
                      and c["metadata"].get("ownerReferences") and c, 30, what="progress ConfigMap owned")
    assert sink["metadata"]["ownerReferences"][0]["uid"] == job.metadata.uid
    assert status["phase"] == "Running" and status["stage"] == "train"
    assert status["progress"]["summary"] == "40% 120/300" and status["progress"]["percent"] == 40
    table = control_plane.kubectl("get", "ftj", "support", "-n", kube.ns, check=True).stdout
    assert re.search(r"support\s+Running\s+train\s+40% 120/300", table), table

    kube.write_progress("support-r1", result_doc("support-r1", 1.25, perplexity=3.49))
    kube.set_rayjob_status("support-r1", "Complete", "SUCCEEDED")
    status = _phase(kube, "support", "Succeeded", op=operator)
    assert status["metrics"]["loss"] == 1.25 and status["metrics"]["baseLoss"] == 2.5
    assert status["artifacts"]["model"] == "s3://acme/runs/support/support-r1/train/model"
    assert status["champion"]["run"] == "support-r1"
    assert status["progress"]["summary"] == "100% 300/300"
    assert status["observedGeneration"] == 1 and status["completionTime"]
    reasons = wait_until(lambda: (r := kube.event_reasons("support")) and "Promoted" in r and r, 10, what="events")
    for expected_reason in ("Running", "RunSucceeded", "Promoted"):
        assert expected_reason in reasons
    assert reasons.index("Running") < reasons.index("RunSucceeded")
    assert "RunStarted" not in reasons  # a first run has no event: it is what creating the job asks for


def test_failed_attempts_are_retried_then_the_job_fails_with_reason_and_count(kube: Kube, operator) -> None:
    _ready_dataset(kube)
    kube.apply(job_manifest("flaky", backoffLimit=1))
    first = _rayjob(kube, "flaky-r1")
    assert first["metadata"]["annotations"]["tailor.dev/attempt"] == "1"
    kube.set_rayjob_status("flaky-r1", "Failed", "FAILED", reason="AppFailed",
                           message="Job entrypoint command failed with exit code 1")
    uid = first["metadata"]["uid"]
    second = wait_until(lambda: (r := kube.get("RayJob", "flaky-r1")) and r["metadata"]["uid"] != uid and r, 30,
                        what="attempt 2 RayJob", on_timeout=operator.log_tail)
    assert second["metadata"]["annotations"]["tailor.dev/attempt"] == "2"
    assert kube.status("FineTuneJob", "flaky")["attempts"] == 2
    assert kube.run_config("flaky-r1")["run"]["attempt"] == 2
    kube.set_rayjob_status("flaky-r1", "Failed", "FAILED", reason="AppFailed", message="exit code 1 again")
    status = _phase(kube, "flaky", "Failed")
    assert status["attempts"] == 2 and status["error"]["reason"] == "AppFailed"
    assert "after 2 attempt(s)" in status["error"]["message"]
    failed = kube.condition("FineTuneJob", "flaky", "Failed")
    assert failed["status"] == "True" and "2 attempt(s)" in failed["message"]
    reasons = wait_until(lambda: (r := kube.event_reasons("flaky")) and "RunFailed" in r and r, 10, what="events")
    assert reasons.count("AttemptFailed") == 1 and "Retrying" in reasons


def test_active_deadline_fails_the_run_with_deadline_exceeded(kube: Kube) -> None:
    _ready_dataset(kube)
    kube.apply(job_manifest("slow", activeDeadlineSeconds=4, backoffLimit=3))
    rayjob = _rayjob(kube, "slow-r1")
    assert rayjob["spec"]["activeDeadlineSeconds"] == 4
    kube.set_rayjob_status("slow-r1", "Running", "RUNNING")
    status = _phase(kube, "slow", "Failed", timeout=30)
    assert status["error"]["reason"] == "DeadlineExceeded" and status["attempts"] == 1  # never retried
    wait_until(lambda: kube.get("RayJob", "slow-r1") is None, 30, what="RayJob deleted")


def test_suspend_stops_the_run_and_resume_recreates_it(kube: Kube) -> None:
    _ready_dataset(kube)
    kube.apply(job_manifest("pausable"))
    first = _rayjob(kube, "pausable-r1")
    kube.set_rayjob_status("pausable-r1", "Running", "RUNNING")
    _phase(kube, "pausable", "Running")
    kube.patch("FineTuneJob", "pausable", {"spec": {"suspend": True}})
    _phase(kube, "pausable", "Suspended")
    wait_until(lambda: kube.get("RayJob", "pausable-r1") is None, 30, what="RayJob deleted on suspend")
    assert kube.condition("FineTuneJob", "pausable", "Suspended")["status"] == "True"
    kube.patch("FineTuneJob", "pausable", {"spec": {"suspend": False}})
    again = _rayjob(kube, "pausable-r1")
    assert again["metadata"]["uid"] != first["metadata"]["uid"]
    assert again["metadata"]["annotations"]["tailor.dev/attempt"] == "1"  # a resume is not a retry
    status = _phase(kube, "pausable", "Queued")
    assert status["currentRun"] == "pausable-r1" and status["runCount"] == 1
    assert {"Suspended", "Resumed"} <= set(kube.event_reasons("pausable"))


def test_a_kuberay_job_has_no_finalizer_and_its_children_go_with_it(kube: Kube) -> None:
    """No finalizer, no kopf annotations: deleting the job deletes it at once, and the garbage
    collector removes its RayJob, NetworkPolicy and the progress ConfigMap the trainer created
    (the operator made the job its owner when it read it)."""
    _ready_dataset(kube)
    kube.apply(job_manifest("doomed"))
    _rayjob(kube, "doomed-r1")
    kube.set_rayjob_status("doomed-r1", "Running", "RUNNING")
    kube.write_progress("doomed-r1", {"attempt": 1, "stage": "train", "state": "Running", "step": 1, "totalSteps": 9})
    _phase(kube, "doomed", "Running")
    wait_until(lambda: (kube.get("ConfigMap", "doomed-r1-progress") or {}).get("metadata", {}).get("ownerReferences"),
               30, what="progress ConfigMap owned by the job")
    meta = kube.get("FineTuneJob", "doomed")["metadata"]
    assert not meta.get("finalizers"), meta
    assert not [a for a in meta.get("annotations") or {} if a.startswith("tailor.dev/")], meta
    kube.delete("FineTuneJob", "doomed")
    assert kube.get("FineTuneJob", "doomed") is None  # nothing holds it back
    wait_until(lambda: kube.get("RayJob", "doomed-r1") is None and kube.get("NetworkPolicy", "doomed-r1") is None
               and kube.list("ConfigMap", {"tailor.dev/finetunejob": "doomed"}) == [], 60,
               what="children garbage-collected")


def test_status_conflicts_are_retried_without_duplicates(kube: Kube, operator) -> None:
    """Another writer keeps changing the object (labels) while the operator reconciles it: its
    status writes hit 409, are re-read and retried, and exactly one RayJob results."""
    _ready_dataset(kube)
    before = _conflicts(operator)
    kube.apply(job_manifest("contended"))
    stop = threading.Event()

    def hammer(who: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                kube.patch("FineTuneJob", "contended", {"metadata": {"labels": {f"poke-{who}": str(i)}}})
            except Exception:  # noqa: BLE001 - best effort
                pass
            time.sleep(0.02)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        _rayjob(kube, "contended-r1")
        kube.set_rayjob_status("contended-r1", "Running", "RUNNING")
        for step in range(10, 110, 10):
            kube.write_progress("contended-r1", {"attempt": 1, "stage": "train", "state": "Running", "step": step,
                                                 "totalSteps": 100})
            time.sleep(0.3)
        kube.write_progress("contended-r1", result_doc("contended-r1", 1.0))
        kube.set_rayjob_status("contended-r1", "Complete", "SUCCEEDED")
        status = _phase(kube, "contended", "Succeeded", op=operator)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [r["metadata"]["name"] for r in kube.list("RayJob")] == ["contended-r1"]
    assert status["runCount"] == 1 and status["attempts"] == 1
    assert "Adopted" not in kube.event_reasons("contended")
    assert _conflicts(operator) > before


def _conflicts(operator: OperatorProcess) -> float:
    m = re.search(r'^tailor_status_conflicts_total\{kind="FineTuneJob"\} (\S+)$', operator.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def test_continuous_learning_promotes_only_a_better_model(kube: Kube, operator) -> None:
    _ready_dataset(kube)
    kube.apply(job_manifest("cl", continuousLearning={
        "trigger": {"onDatasetRevision": True},
        "promotion": {"metric": "loss", "minImprovement": 0.01, "target": {"configMap": {"name": "cl-model"}}}}))
    _rayjob(kube, "cl-r1")
    kube.write_progress("cl-r1", result_doc("cl-r1", 1.2))
    kube.set_rayjob_status("cl-r1", "Complete", "SUCCEEDED")
    _phase(kube, "cl", "Succeeded")
    target = wait_until(lambda: kube.get("ConfigMap", "cl-model"), 20, what="target ConfigMap")
    assert target["data"]["model-uri"] == "s3://acme/runs/support/cl-r1/train/model"

    # a new data revision starts the next run; it is worse and must not replace the champion
    kube.patch("Dataset", "tickets", {"spec": {"revision": "2026-03-02"}})
    wait_until(lambda: len(kube.list("ConfigMap", {"tailor.dev/dataset": "tickets",
                                                   "app.kubernetes.io/name": "tailor-inspect"})) >= 1
               and kube.condition("Dataset", "tickets", "Validating").get("status") == "True", 30,
               what="revalidation")
    cms = kube.list("ConfigMap", {"tailor.dev/dataset": "tickets", "app.kubernetes.io/name": "tailor-inspect"})
    fresh = next(c for c in cms if "status.json" not in (c.get("data") or {}))
    kube.patch("ConfigMap", fresh["metadata"]["name"], {"data": {"status.json": json.dumps(ready_result("x"))}})
    wait_until(lambda: kube.status("Dataset", "tickets").get("revision") == "2026-03-02", 30, what="new revision")
    rayjob = _rayjob(kube, "cl-r2")
    assert rayjob["metadata"]["annotations"]["tailor.dev/dataset-revision"] == "2026-03-02"
    config = kube.run_config("cl-r2")
    assert config["champion"]["run"] == "cl-r1"  # the trainer re-scores the champion on the same data
    kube.write_progress("cl-r2", result_doc("cl-r2", 1.5))
    kube.set_rayjob_status("cl-r2", "Complete", "SUCCEEDED")
    status = wait_until(lambda: (s := kube.status("FineTuneJob", "cl")).get("currentRun") == "cl-r2"
                        and s.get("phase") == "Succeeded" and s, 30, what="r2 finished")
    assert status["champion"]["run"] == "cl-r1"
    assert [(h["run"], h["promoted"]) for h in status["history"]] == [("cl-r1", True), ("cl-r2", False)]
    assert kube.condition("FineTuneJob", "cl", "Promoted")["reason"] == "NotBetter"
    assert kube.get("ConfigMap", "cl-model")["data"]["model-uri"].endswith("cl-r1/train/model")


def test_metrics_endpoint_serves_the_documented_series(operator) -> None:
    text = operator.metrics()
    documented = re.findall(r"^\| `(tailor_[a-z_]+)` \| (\w+)", (REPO / "docs/operator.md").read_text(), re.M)
    assert len(documented) >= 12
    for name, kind in documented:
        # every documented series is registered with its type (labelled counters show samples
        # once something happened, e.g. a failure reason)
        assert re.search(rf"^# TYPE {name} {kind}$", text, re.M), f"{name} ({kind}) missing from /metrics"
    for sample in ("tailor_finetunejobs", "tailor_reconcile_duration_seconds_bucket", "tailor_runs_failed_total",
                   "tailor_run_retries_total", "tailor_run_duration_seconds_bucket", "tailor_promotions_total",
                   "tailor_eval_metric", "tailor_status_conflicts_total", "tailor_datasets"):
        assert re.search(rf"^{sample}{{", text, re.M), f"no {sample} samples"
    assert re.search(r'^tailor_runs_started_total\{backend="kuberay"\} [1-9]', text, re.M)
    assert re.search(r'^tailor_api_writes_total\{kind="RayJob",verb="create"\} [1-9]', text, re.M)


def test_backend_cannot_change_after_creation(k8s_client, namespace) -> None:
    """CEL transition rule: runs of the old backend would be orphaned by a switch."""
    from tailor_operator.cluster import ApiError

    kube = Kube(k8s_client, namespace)
    kube.apply(job_manifest("fixed", suspend=True))
    for backend in ("local", "kuberay"):
        patch = {"spec": {"backend": backend}}
        if backend == "local":
            with pytest.raises(ApiError) as err:
                kube.patch("FineTuneJob", "fixed", patch)
            assert err.value.status == 422 and "backend is immutable" in err.value.message
        else:
            kube.patch("FineTuneJob", "fixed", patch)  # spelling out the default is no change


# ------------------------------------------------------------------------ the truth about a run


def test_succeeded_rayjob_with_an_unfinished_trainer_is_a_failed_attempt(kube: Kube, operator) -> None:
    """KubeRay says Complete/SUCCEEDED (an entrypoint or log tail exited 0) while the trainer's
    progress document is still in train with no result: the attempt is TrainerIncomplete and
    retried, never recorded as a success; then SUCCEEDED while the trainer reported Diverged: the
    job fails with the trainer's own reason."""
    _ready_dataset(kube)
    kube.apply(job_manifest("truth", backoffLimit=1))
    _rayjob(kube, "truth-r1")
    kube.set_rayjob_status("truth-r1", "Running", "RUNNING")
    kube.write_progress("truth-r1", {"run": "truth-r1", "attempt": 1, "stage": "train", "state": "Running",
                                     "step": 40, "totalSteps": 300})
    _phase(kube, "truth", "Running", op=operator)
    kube.set_rayjob_status("truth-r1", "Complete", "SUCCEEDED")
    failed = wait_until(lambda: next((e for e in kube.events("truth") if e["reason"] == "AttemptFailed"), None), 30,
                        what="the AttemptFailed event", on_timeout=operator.log_tail)
    assert "(TrainerIncomplete: KubeRay reports the Ray job SUCCEEDED" in failed["message"], failed["message"]
    assert "stage train step 40/300" in failed["message"], failed["message"]
    status = kube.status("FineTuneJob", "truth")
    assert status["attempts"] == 2 and status["phase"] != "Succeeded" and not status.get("history"), status
    # attempt 2: a new RayJob of the same run; KubeRay again says SUCCEEDED, the trainer says Diverged
    wait_until(lambda: (r := kube.get("RayJob", "truth-r1")) and
               r["metadata"]["annotations"].get("tailor.dev/attempt") == "2", 60, what="the attempt-2 RayJob",
               on_timeout=operator.log_tail)
    kube.set_rayjob_status("truth-r1", "Running", "RUNNING")
    kube.write_progress("truth-r1", {"run": "truth-r1", "attempt": 2, "stage": "train", "state": "Failed",
                                     "step": 7, "error": {"reason": "Diverged", "message": "loss is NaN at step 7"}})
    kube.set_rayjob_status("truth-r1", "Complete", "SUCCEEDED")
    status = _phase(kube, "truth", "Failed", op=operator)
    assert status["error"]["reason"] == "Diverged" and "NaN" in status["error"]["message"], status["error"]
    assert status["history"][0]["phase"] == "Failed" and "champion" not in status, status


def test_a_silent_trainer_is_declared_lost_and_retried(kube: Kube, operator) -> None:
    """The progress heartbeat stops (a hung collective, a lost relay) while KubeRay keeps saying
    RUNNING: after progressDeadlineSeconds the attempt fails with ProgressDeadlineExceeded, its
    RayJob is replaced by attempt 2 (resuming from the checkpoint), counting against backoffLimit."""
    _ready_dataset(kube)
    kube.apply(job_manifest("silent", backoffLimit=1, progressDeadlineSeconds=30))
    _rayjob(kube, "silent-r1")
    kube.set_rayjob_status("silent-r1", "Running", "RUNNING")
    kube.write_progress("silent-r1", {"run": "silent-r1", "attempt": 1, "stage": "train", "state": "Running",
                                      "step": 10, "totalSteps": 300,
                                      "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _phase(kube, "silent", "Running", op=operator)
    t0 = time.monotonic()
    failed = wait_until(lambda: next((e for e in kube.events("silent") if e["reason"] == "AttemptFailed"), None), 60,
                        what="AttemptFailed after the progress deadline", on_timeout=operator.log_tail)
    waited = time.monotonic() - t0
    assert "(ProgressDeadlineExceeded: run silent-r1 attempt 1 reported no progress for" in failed["message"], \
        failed["message"]
    assert "last: stage train, step 10/300" in failed["message"], failed["message"]
    assert waited >= 20, waited  # the deadline counts from the last update (30 s), never earlier
    wait_until(lambda: (r := kube.get("RayJob", "silent-r1")) and
               r["metadata"]["annotations"].get("tailor.dev/attempt") == "2", 60, what="the attempt-2 RayJob",
               on_timeout=operator.log_tail)
    assert kube.status("FineTuneJob", "silent")["attempts"] == 2

