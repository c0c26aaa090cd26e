"""End to end on the local backend: the quickstart Dataset + FineTuneJob applied with kubectl, the
operator validating the data and training the real model in a subprocess (real torch), ending in
Succeeded with eval metrics, artifacts and a complete event trail; `kubectl get ftj` shows
progress while it runs. A shorter variant of examples/quickstart.yaml keeps it to a minute or two."""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import pytest
import yaml

from operator_fixtures import REPO, Kube, OperatorProcess, load_yaml_docs, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUICKSTART = REPO / "examples" / "quickstart.yaml"
MAX_STEPS = 8
DATA_ROWS = 600


@pytest.fixture
def model_dir(request) -> Path:
    shipped = REPO / "examples" / "models" / "tailor-tiny-llama"
    if (shipped / "config.json").is_file():
        return shipped
    return request.getfixturevalue("tiny_model_dir")  # tests/conftest.py builds a tiny llama


def _quickstart(model: Path, out: Path, data: Path) -> list[dict]:
    """examples/quickstart.yaml, shortened: the first DATA_ROWS rows, MAX_STEPS steps, a small eval."""
    docs = copy.deepcopy(load_yaml_docs(QUICKSTART))
    for doc in docs:
        if doc["kind"] == "Dataset":
            source = REPO / doc["spec"]["source"]["uri"]
            data.write_text("".join(source.read_text().splitlines(keepends=True)[:DATA_ROWS]))
            doc["spec"]["source"]["uri"] = str(data)
        else:
            spec = doc["spec"]
            spec["backend"] = "local"
            spec["baseModel"]["uri"] = str(model)
            spec["output"]["uri"] = str(out)
            hp = spec["hyperparameters"]
            hp.update(maxSteps=MAX_STEPS, batchSize=8, checkpointEverySteps=MAX_STEPS, evalEverySteps=MAX_STEPS)
            ev = spec["evaluation"]
            ev.update(maxEvalRows=16, samplePrompts=ev.get("samplePrompts", [])[:1], maxNewTokens=8)
            ev["metrics"] = [m for m in ev["metrics"] if m != "exactMatch"]
            ev["gates"] = [{"metric": "loss", "max": 20.0}]  # the quickstart's 4.0 needs its 120 steps
    return docs


def test_quickstart_on_the_local_backend(control_plane, k8s_client, namespace, tmp_path, model_dir) -> None:
    kube = Kube(k8s_client, namespace)
    out = tmp_path / "runs"
    operator = OperatorProcess(control_plane.kubeconfig, tmp_path / "op", namespaces=[namespace],
                               env={"TAILOR_DATASET_BACKEND": "local", "TAILOR_LOCAL_MAX_CONCURRENT": "1"}).start()
    try:
        manifest = tmp_path / "quickstart.yaml"
        manifest.write_text(yaml.safe_dump_all(_quickstart(model_dir, out, tmp_path / "support.jsonl"),
                                               sort_keys=False))
        control_plane.kubectl("apply", "-n", namespace, "-f", str(manifest), check=True)

        ds = wait_until(lambda: (c := kube.condition("Dataset", "support", "Ready")).get("status") in ("True", "False")
                        and c, 180, interval=1, what="Dataset validated", on_timeout=operator.log_tail)
        assert ds["status"] == "True", ds
        ds_status = kube.status("Dataset", "support")
        assert ds_status["revision"].startswith("sha256:") and ds_status["rows"] > 100

        seen_progress: set[str] = set()
        reconciling: dict = {}
        phases: list[str] = []
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            row = control_plane.kubectl("get", "ftj", "support-assistant", "-n", namespace, "--no-headers",
                                        check=True).stdout.split()
            phase = row[1] if len(row) > 1 else ""
            if not phases or phases[-1] != phase:
                phases.append(phase)
            match = re.search(r"\d+% \d+/\d+", " ".join(row))
            if match:
                seen_progress.add(match.group(0))
            if phase == "Running" and not reconciling:
                reconciling = kube.condition("FineTuneJob", "support-assistant", "Reconciling")
            if phase in ("Succeeded", "Failed"):
                break
            time.sleep(1)
        status = kube.status("FineTuneJob", "support-assistant")
        assert status.get("phase") == "Succeeded", f"{status}\n{operator.log_tail()}\n{_trainer_log(tmp_path)}"
        assert "Running" in phases and seen_progress, (phases, seen_progress)
        # GitOps health (kstatus): what `kubectl wait`, Flux and Argo CD read
        assert reconciling.get("status") == "True" and reconciling.get("reason") in ("Running", "Evaluating"), \
            reconciling
        for kind, name in (("ftj", "support-assistant"), ("tds", "support")):
            control_plane.kubectl("wait", f"{kind}/{name}", "-n", namespace, "--for=condition=Ready",
                                  "--timeout=30s", check=True)
        generation = kube.get("FineTuneJob", "support-assistant")["metadata"]["generation"]
        assert status["observedGeneration"] == generation
        assert all(c.get("observedGeneration") == generation for c in status["conditions"]), status["conditions"]
        assert {c["type"] for c in status["conditions"]}.isdisjoint({"Reconciling", "Stalled"})

        metrics = status["metrics"]
        assert metrics["loss"] > 0 and metrics["perplexity"] > 1 and "baseLoss" in metrics
        assert status["progress"]["summary"] == f"100% {MAX_STEPS}/{MAX_STEPS}"
        model = Path(status["artifacts"]["model"].replace("file://", ""))
        assert model.is_dir() and any(model.iterdir())
        assert status["champion"]["run"] == "support-assistant-r1"
        assert status["currentRun"] == "support-assistant-r1" and status["attempts"] == 1
        reasons = kube.event_reasons("support-assistant")
        for reason in ("Running", "RunSucceeded", "Promoted"):
            assert reason in reasons, reasons
        assert {"Validating", "Validated"} <= set(kube.event_reasons("support"))
        text = operator.metrics()
        assert re.search(r'^tailor_runs_succeeded_total\{backend="local"\} 1\.0$', text, re.M)
        assert re.search(r'^tailor_eval_metric\{finetunejob="support-assistant",metric="loss",namespace=', text, re.M)
    finally:
        operator.stop()


def _trainer_log(root: Path) -> str:
    logs = sorted(root.rglob("trainer.log"))
    return "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]) for p in logs)


def test_data_changed_after_validation_fails_the_run_with_dataset_changed(control_plane, k8s_client, namespace,
                                                                          tmp_path, model_dir) -> None:
    """Pinned data: a user-set revision stays put when the file changes (no re-validation, so no
    race), but the run's prep reads other rows than the validation did: DatasetChanged, final."""
    kube = Kube(k8s_client, namespace)
    docs = _quickstart(model_dir, tmp_path / "runs", tmp_path / "support.jsonl")
    dataset = next(d for d in docs if d["kind"] == "Dataset")
    job = next(d for d in docs if d["kind"] == "FineTuneJob")
    dataset["spec"]["revision"] = "v1"
    dataset["spec"].pop("refreshInterval", None)
    operator = OperatorProcess(control_plane.kubeconfig, tmp_path / "op", namespaces=[namespace],
                               env={"TAILOR_DATASET_BACKEND": "local", "TAILOR_LOCAL_MAX_CONCURRENT": "1"}).start()
    try:
        (tmp_path / "ds.yaml").write_text(yaml.safe_dump(dataset, sort_keys=False))
        control_plane.kubectl("apply", "-n", namespace, "-f", str(tmp_path / "ds.yaml"), check=True)
        name = dataset["metadata"]["name"]
        ds = wait_until(lambda: (c := kube.condition("Dataset", name, "Ready")).get("status") in ("True", "False")
                        and c, 180, interval=1, what="Dataset validated", on_timeout=operator.log_tail)
        assert ds["status"] == "True", ds
        validated = kube.status("Dataset", name)
        assert validated["revision"] == "v1" and validated["contentFingerprint"]

        data = tmp_path / "support.jsonl"
        lines = data.read_text().splitlines(keepends=True)
        data.write_text("".join(lines[:-1]))  # one row fewer, same revision label

        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
        control_plane.kubectl("apply", "-n", namespace, "-f", str(tmp_path / "job.yaml"), check=True)
        job_name = job["metadata"]["name"]
        status = wait_until(lambda: (s := kube.status("FineTuneJob", job_name)).get("phase") in ("Succeeded", "Failed")
                            and s, 300, interval=1, what="run finished", on_timeout=operator.log_tail)
        assert status["phase"] == "Failed", status
        assert status["error"]["reason"] == "DatasetChanged", status
        assert validated["contentFingerprint"] in status["error"]["message"]
        assert status["attempts"] == 1 and status["datasetRevision"] == "v1"
        assert kube.status("Dataset", name)["contentFingerprint"] == validated["contentFingerprint"]
    finally:
        operator.stop()
