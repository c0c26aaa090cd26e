"""The MLflow model registry for real: a real `mlflow server` (pinned, from its own cached venv:
scripts/mlflow-venv; sqlite backend in tmp) and the operator on the real control plane. After
promotions, a rejection and a pin, the registered versions, their metrics and the `champion`
alias must match status.history and status.champion; with the registry unreachable the job
still succeeds, the Registered condition says why, and the registration catches up.

The operator reaches MLflow through a small TCP proxy the test can cut, to play an outage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

import pytest

from operator_fixtures import (
    REPO,
    Kube,
    OperatorProcess,
    dataset_manifest,
    free_port,
    job_manifest,
    ready_result,
    result_doc,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def mlflow_process(tmp_path_factory):
    """Start `mlflow server` (not waiting for it: it starts while the rest is set up)."""
    r = subprocess.run([str(REPO / "scripts" / "mlflow-venv")], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"scripts/mlflow-venv failed:\n{r.stderr}"
    mlflow = r.stdout.strip().splitlines()[-1]
    d = tmp_path_factory.mktemp("mlflow")
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(mlflow)), "empty.db"), d / "mlflow.db")
    port = free_port()
    log = (d / "server.log").open("wb")
    proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(d))
    log.close()
    yield proc, f"http://127.0.0.1:{port}", d / "server.log"
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def mlflow_url(mlflow_process) -> str:
    proc, url, log = mlflow_process

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    wait_until(healthy, 300, interval=0.5, what="mlflow server /health",
               on_timeout=lambda: log.read_text(errors="replace")[-3000:])
    return url


class Proxy:
    """A TCP forwarder to the MLflow server that can be cut (connections refused, then reset)."""

    def __init__(self, upstream: str) -> None:
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.up = True
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.up:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # RST: the registry is "down"
                continue
            server = socket.create_connection(self.upstream)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def proxy(mlflow_process):
    p = Proxy(mlflow_process[1])
    yield p
    p.close()


@pytest.fixture(scope="module")
def operator(mlflow_process, control_plane, proxy, mlflow_url, tmp_path_factory):
    control_plane.stop_kuberay()  # this module plays KubeRay itself
    op = OperatorProcess(control_plane.kubeconfig, tmp_path_factory.mktemp("operator"),
                         env={"TAILOR_REGISTRY_URI": proxy.url, "TAILOR_REGISTRY_TIMEOUT_SECONDS": "3"}).start()
    yield op
    op.stop()


@pytest.fixture
def kube(k8s_client, namespace, operator) -> Kube:
    return Kube(k8s_client, namespace)


def _api(url: str, path: str, **query: Any) -> dict[str, Any]:
    q = urllib.parse.urlencode(query)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}?{q}", timeout=10) as r:
        return json.loads(r.read())


def _versions(url: str, name: str) -> dict[str, dict[str, Any]]:
    """run name -> model version, by the tailor.dev/run tag."""
    found = _api(url, "model-versions/search", filter=f"name='{name}'", max_results=1000).get("model_versions") or []
    return {next(t["value"] for t in v["tags"] if t["key"] == "tailor.dev/run"): v for v in found}


def _champion_version(url: str, name: str) -> Optional[str]:
    try:
        return _api(url, "registered-models/alias", name=name, alias="champion")["model_version"]["version"]
    except urllib.error.HTTPError:
        return None


def _dataset(kube: Kube, revision: str) -> None:
    kube.apply(dataset_manifest("tickets"))
    kube.publish_validation("tickets", ready_result(revision))
    wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 30, what="Dataset Ready")


def _run(kube: Kube, job: str, run: str, loss: float, op: OperatorProcess) -> dict[str, Any]:
    wait_until(lambda: kube.get("RayJob", run), 30, what=f"RayJob {run}", on_timeout=op.log_tail)
    kube.write_progress(run, result_doc(run, loss, perplexity=round(2.718 ** loss, 4)))
    kube.set_rayjob_status(run, "Complete", "SUCCEEDED")
    return wait_until(lambda: (s := kube.status("FineTuneJob", job)).get("currentRun") == run
                      and s.get("phase") == "Succeeded" and s, 30, what=f"{run} Succeeded", on_timeout=op.log_tail)


def _registered(kube: Kube, job: str, url: str, name: str, runs: set[str], champion: str) -> dict[str, Any]:
    def synced() -> Any:
        versions = _versions(url, name)
        if set(versions) != runs:
            return None
        if _champion_version(url, name) != versions[champion]["version"]:
            return None
        cond = kube.condition("FineTuneJob", job, "Registered")
        return cond.get("status") == "True" and f"(run {champion})" in cond.get("message", "") and versions
    return wait_until(synced, 45, what=f"registry: {sorted(runs)}, champion {champion}",
                      on_timeout=lambda: json.dumps({"versions": sorted(_versions(url, name)),
                                                     "cond": kube.condition("FineTuneJob", job, "Registered")}))


def test_versions_metrics_and_champion_alias_follow_status(kube: Kube, operator, mlflow_url: str) -> None:
    _dataset(kube, "rev-1")
    kube.apply(job_manifest("cl", registry={"modelName": "support"}, continuousLearning={
        "promotion": {"metric": "loss", "target": {"configMap": {"name": "cl-model"}}}}))
    name = f"{kube.ns}.support"  # always prefixed with the job's namespace
    _run(kube, "cl", "cl-r1", 1.2, operator)
    _registered(kube, "cl", mlflow_url, name, {"cl-r1"}, "cl-r1")
    kube.new_revision("tickets", "rev-2")
    _run(kube, "cl", "cl-r2", 1.0, operator)  # better: promoted
    kube.new_revision("tickets", "rev-3")
    status = _run(kube, "cl", "cl-r3", 1.4, operator)  # worse: registered, not promoted
    assert status["champion"]["run"] == "cl-r2"
    versions = _registered(kube, "cl", mlflow_url, name, {"cl-r1", "cl-r2", "cl-r3"}, "cl-r2")

    for h in status["history"]:
        v = versions[h["run"]]
        tags = {t["key"]: t["value"] for t in v["tags"]}
        assert v["source"] == h["model"] == f"s3://acme/runs/support/{h['run']}/train/model"
        assert tags["datasetRevision"] == h["datasetRevision"]
        assert float(tags["metric.loss"]) == h["metrics"]["loss"]
        if h.get("configHash"):
            assert tags["configHash"] == h["configHash"]
        # the metrics live on the MLflow run the version links to
        run = _api(mlflow_url, "runs/get", run_id=v["run_id"])["run"]
        logged = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert logged == pytest.approx(h["metrics"])
        assert run["info"]["run_name"] == h["run"] and run["info"]["status"] == "FINISHED"
    # one version per run, however often the job was reconciled
    assert sorted(int(v["version"]) for v in versions.values()) == [1, 2, 3]

    # rollback by pinning: the alias follows the champion back to r1
    kube.patch("FineTuneJob", "cl", {"spec": {"continuousLearning": {"promotion": {"pinnedRun": "cl-r1"}}}})
    wait_until(lambda: kube.status("FineTuneJob", "cl").get("champion", {}).get("run") == "cl-r1", 30,
               what="pinned champion")
    wait_until(lambda: _champion_version(mlflow_url, name) == versions["cl-r1"]["version"], 30,
               what="alias back on r1")
    assert len(_versions(mlflow_url, name)) == 3


def test_an_unreachable_registry_never_fails_the_job_and_catches_up(kube: Kube, operator, proxy: Proxy,
                                                                     mlflow_url: str) -> None:
    _dataset(kube, "rev-1")
    kube.apply(job_manifest("offline", registry={}))
    name = f"{kube.ns}.offline"  # modelName defaults to the job's name
    proxy.up = False
    try:
        _run(kube, "offline", "offline-r1", 1.1, operator)
        cond = wait_until(lambda: (c := kube.condition("FineTuneJob", "offline", "Registered")).get("status") == "False"
                          and c, 30, what="Registered False", on_timeout=operator.log_tail)
        assert cond["reason"] == "RegistryUnavailable" and "cannot reach the registry" in cond["message"]
        status = kube.status("FineTuneJob", "offline")
        assert status["phase"] == "Succeeded" and status["champion"]["run"] == "offline-r1" and not status.get("error")
        assert _versions(mlflow_url, name) == {}
    finally:
        proxy.up = True
    _registered(kube, "offline", mlflow_url, name, {"offline-r1"}, "offline-r1")


def test_model_names_are_confined_to_the_namespace(kube: Kube) -> None:
    """A tenant cannot move another namespace's alias: the name it gives is prefixed with its own
    namespace, and a name that tries to escape is refused by the API server."""
    bad = job_manifest("sneaky", registry={"modelName": "../other-team.prod"})
    from tailor_operator.cluster import ApiError

    with pytest.raises(ApiError) as e:
        kube.apply(bad)
    assert e.value.status == 422 and "modelName" in str(e.value)


def test_chart_registry_values_become_the_operators_settings(control_plane) -> None:
    """Chart behaviour: registry.trackingUri and registry.credentialsSecret reach the operator
    (its address as a setting, credentials only through secretKeyRefs); a URL with credentials
    in it is refused by values.schema.json."""
    import yaml

    chart = str(REPO / "charts" / "tailor")
    r = control_plane.helm("template", "tailor", chart, "--set", "registry.trackingUri=http://mlflow.ml:5000",
                           "--set", "registry.credentialsSecret=mlflow-auth", check=True)
    deploy = next(d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "Deployment")
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TAILOR_REGISTRY_URI"]["value"] == "http://mlflow.ml:5000"
    for var, key in (("TAILOR_REGISTRY_USERNAME", "username"), ("TAILOR_REGISTRY_PASSWORD", "password"),
                     ("TAILOR_REGISTRY_TOKEN", "token")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": key, "optional": True}
    plain = control_plane.helm("template", "tailor", chart, check=True).stdout
    assert "TAILOR_REGISTRY_USERNAME" not in plain and 'name: TAILOR_REGISTRY_URI, value: ""' in plain
    bad = control_plane.helm("template", "tailor", chart, "--set", "registry.trackingUri=http://u:p@mlflow:5000")
    assert bad.returncode != 0 and "schema" in (bad.stderr + bad.stdout).lower()
