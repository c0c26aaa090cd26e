"""The progress reporter the operator reads: one JSON document, replaced as a whole, in a file
(local backend) or a ConfigMap ``<run>-progress`` (kuberay backend; rate-limited)."""

from __future__ import annotations

import json

from tailor_trainer.config import ProgressSink, RunInfo
from tailor_trainer.report import PROGRESS_KEY, ConfigMapSink, FileSink, Reporter

RUN = RunInfo(job="job", name="job-r2", namespace="team", attempt=2)


class FakeApiError(Exception):
    def __init__(self, status: int):
        super().__init__(f"status {status}")
        self.status = status


class FakeCoreV1:
    """Stands in for kubernetes.client.CoreV1Api (the seam ConfigMapSink takes)."""

    def __init__(self, exists: bool = False, fail: bool = False):
        self.exists, self.fail = exists, fail
        self.calls: list[tuple[str, dict]] = []

    def patch_namespaced_config_map(self, name, namespace, body):
        if self.fail:
            raise FakeApiError(500)
        if not self.exists:
            raise FakeApiError(404)
        self.calls.append(("patch", body))

    def create_namespaced_config_map(self, namespace, body):
        self.exists = True
        self.calls.append(("create", body))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_file_sink_replaces_the_document_atomically(tmp_path):
    path = tmp_path / "sub" / "progress.json"
    reporter = Reporter(RUN, [FileSink(str(path))])
    reporter.update(stage="train", step=3, totalSteps=10, loss=2.5, tokensPerSecond=100.0, etaSeconds=7)
    doc = json.loads(path.read_text())
    assert doc["run"] == "job-r2" and doc["attempt"] == 2 and doc["state"] == "Running"
    assert (doc["stage"], doc["step"], doc["loss"], doc["etaSeconds"]) == ("train", 3, 2.5, 7)
    assert [p.name for p in path.parent.iterdir()] == ["progress.json"]  # no temp files left
    # A new stage clears the previous stage's counters.
    reporter.update(stage="evaluate")
    doc = json.loads(path.read_text())
    assert doc["stage"] == "evaluate" and doc["step"] is None and doc["loss"] is None


def test_success_and_failure_documents(tmp_path):
    path = tmp_path / "progress.json"
    Reporter(RUN, [FileSink(str(path))]).succeed({"metrics": {"loss": 1.0}})
    doc = json.loads(path.read_text())
    assert doc["state"] == "Succeeded" and doc["result"] == {"metrics": {"loss": 1.0}} and doc["error"] is None
    Reporter(RUN, [FileSink(str(path))]).fail("Diverged", "loss became nan at step 3",
                                              "spec.hyperparameters.learningRate")
    doc = json.loads(path.read_text())
    assert doc["state"] == "Failed" and doc["result"] is None
    assert doc["error"] == {"reason": "Diverged", "message": "loss became nan at step 3",
                            "field": "spec.hyperparameters.learningRate"}


def test_configmap_sink_creates_then_patches_and_is_rate_limited():
    api, clock = FakeCoreV1(), Clock()
    reporter = Reporter.from_config(RUN, ProgressSink(config_map="job-r2-progress"), api=api,
                                    clock=clock, min_interval=5.0)
    reporter.update(stage="train", step=1)  # stage change: written at once (404 -> create)
    assert [c[0] for c in api.calls] == ["create"]
    body = api.calls[0][1]
    assert body["metadata"]["name"] == "job-r2-progress" and body["metadata"]["namespace"] == "team"
    assert body["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "tailor",
                                          "tailor.dev/finetunejob": "job", "tailor.dev/run": "job-r2"}
    assert json.loads(body["data"][PROGRESS_KEY])["step"] == 1
    for step in range(2, 6):  # within the interval: held back
        clock.t += 1.0
        reporter.update(step=step)
    assert len(api.calls) == 1
    clock.t += 1.5
    reporter.update(step=6)
    assert [c[0] for c in api.calls] == ["create", "patch"]
    assert json.loads(api.calls[-1][1]["data"][PROGRESS_KEY])["step"] == 6
    clock.t += 0.1
    reporter.fail("GateFailed", "gate failed: loss = 3, required <= 2 (max)")  # terminal: always written
    last = json.loads(api.calls[-1][1]["data"][PROGRESS_KEY])
    assert last["state"] == "Failed" and last["error"]["reason"] == "GateFailed"


def test_configmap_errors_never_stop_training():
    sink = ConfigMapSink("p", "ns", api=FakeCoreV1(fail=True))
    sink.write({"state": "Running"}, force=True)  # logs a warning, raises nothing
    sink.close()
