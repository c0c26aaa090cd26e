"""Helpers for the operator's integration tests: run the operator as a real process (so it can be
SIGKILLed), apply objects, and play KubeRay/the trainer by writing RayJob status and progress
documents through the real API (there is no kubelet: pods never run)."""

from __future__ import annotations

import json
import re
import os
from datetime import datetime
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TESTENV = REPO / "scripts" / "testenv"
LOG_NAMES = ("kube-apiserver", "kube-controller-manager", "etcd", "ray-operator",
             "kubelet", "containerd", "kube-scheduler", "kube-proxy", "coredns")
GROUP, VERSION = "tailor.dev", "v1alpha1"

# Fast settings for tests (production defaults are minutes, not seconds).
FAST_ENV = {
    "TAILOR_ACTIVE_POLL_SECONDS": "1",
    "TAILOR_STATUS_MIN_INTERVAL_SECONDS": "1",
    "TAILOR_BACKOFF_BASE_SECONDS": "1",
    "TAILOR_BACKOFF_MAX_SECONDS": "4",
    "TAILOR_RESYNC_SECONDS": "15",
    "TAILOR_WORKERS": "4",
    # This test installation opts in to what the chart's policy.* defaults refuse: most tests run
    # the local backend on files under the repository and tmp_path (the kuberay ones on s3://, hf://
    # and, in test_operator_kuberay's target-module check, a local model directory).
    "TAILOR_ALLOWED_BACKENDS": "kuberay,local",
    "TAILOR_ALLOWED_LOCAL_ROOTS": "*",
    # No kubelet here: a model check's pod never runs, so kuberay jobs would wait for it forever.
    # test_operator_kuberay's preflight test turns it on and plays the pod; the node tests run it.
    "TAILOR_MODEL_PREFLIGHT": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "condition",
               on_timeout: Optional[Callable[[], str]] = None) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{on_timeout()}" if on_timeout else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r}){extra}")


@dataclass
class ControlPlane:
    dir: Path
    kubeconfig: Path
    server: str
    bin_dir: Path
    kubeconfigs: dict = field(default_factory=dict)  # identity -> kubeconfig path
    users: dict = field(default_factory=dict)  # identity -> user name the API server sees
    env: dict = field(default_factory=dict)  # os.environ + KUBECONFIG + PATH with bin_dir first
    startup_seconds: float = 0.0

    @classmethod
    def up(cls, state: Path, bin_dir: Path, *extra: str, timeout: float = 300) -> "ControlPlane":
        """`scripts/testenv up --dir STATE --watch-pid <this pid> EXTRA...`; fails the test run (never
        skips) when it does not come up. The env has the bin dir first on PATH, KUBECONFIG, and
        helm's caches/config isolated in STATE."""
        t0 = time.monotonic()
        r = subprocess.run([str(TESTENV), "up", "--dir", str(state), "--watch-pid", str(os.getpid()), *extra],
                           capture_output=True, text=True, timeout=timeout)
        m = re.fullmatch(r"export KUBECONFIG=(\S+)\n?", r.stdout)
        if r.returncode != 0 or not m:
            subprocess.run([str(TESTENV), "down", "--dir", str(state), "--keep-logs"], capture_output=True)
            pytest.fail(f"`scripts/testenv up {' '.join(extra)}` failed (rc {r.returncode}); stdout={r.stdout!r}\n"
                        f"{r.stderr[-6000:]}", pytrace=False)
        info = json.loads((state / "env.json").read_text())
        env = dict(os.environ)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["KUBECONFIG"] = m.group(1)
        env.pop("KUBERNETES_SERVICE_HOST", None)
        # helm keeps caches/config under $HOME by default: isolate it per session
        for var, sub in (("HELM_CACHE_HOME", "helm/cache"), ("HELM_CONFIG_HOME", "helm/config"),
                         ("HELM_DATA_HOME", "helm/data")):
            env[var] = str(state / sub)
        return cls(dir=state, kubeconfig=Path(m.group(1)), server=info["server"], bin_dir=bin_dir,
                   kubeconfigs={k: Path(v) for k, v in info["kubeconfigs"].items()}, users=info["users"], env=env,
                   startup_seconds=time.monotonic() - t0)

    def run(self, argv: list[str], *, user: str = "admin", input: str | None = None, check: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(self.env, KUBECONFIG=str(self.kubeconfigs[user]))
        return subprocess.run(argv, input=input, env=env, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def kubectl(self, *args: str, user: str = "admin", input: str | None = None, check: bool = False,
                timeout: float = 120) -> subprocess.CompletedProcess:
        r = self.run([str(self.bin_dir / "kubectl"), *args], user=user, input=input, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}):\n{r.stderr}{r.stdout}")
        return r

    def helm(self, *args: str, user: str = "admin", check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
        r = self.run([str(self.bin_dir / "helm"), *args], user=user, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stderr}{r.stdout}")
        return r

    def api_client(self, user: str = "admin"):
        from kubernetes import config as kconfig
        return kconfig.new_client_from_config(config_file=str(self.kubeconfigs[user]))

    def log_tails(self, lines: int = 60) -> str:
        out = []
        for n in LOG_NAMES:
            p = self.dir / "logs" / f"{n}.log"
            if p.is_file():
                text = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"----- {p} (last {len(text)} lines) -----\n" + "\n".join(text))
        return "\n".join(out)

    def start_kuberay(self) -> None:
        r = subprocess.run([str(TESTENV), "kuberay-up", "--dir", str(self.dir)], capture_output=True, text=True,
                           env=self.env, timeout=180)
        if r.returncode != 0:
            pytest.fail(f"`scripts/testenv kuberay-up` failed:\n{r.stderr}\n{self.log_tails(40)}")

    def stop_kuberay(self) -> None:
        subprocess.run([str(TESTENV), "kuberay-down", "--dir", str(self.dir)], capture_output=True, text=True,
                       env=self.env, timeout=60)

    def _testenv(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([str(TESTENV), *args, "--dir", str(self.dir)], capture_output=True, text=True,
                           env=self.env, timeout=timeout)
        if r.returncode != 0:
            pytest.fail(f"`scripts/testenv {' '.join(args)}` failed:\n{r.stderr}\n{self.log_tails(40)}")
        return r

    def stop_apiserver(self) -> None:
        """Stop the kube-apiserver only (etcd and the controller manager keep running)."""
        self._testenv("apiserver-stop")

    def start_apiserver(self) -> None:
        """Start it again with its recorded argv (same etcd, port, certificates); waits for /readyz."""
        self._testenv("apiserver-start")

    def add_apiserver(self) -> Path:
        """A second kube-apiserver on the same etcd; returns its admin kubeconfig (also in
        `kubeconfigs["admin-2"]`), through which a test writes while the first one is down."""
        r = self._testenv("apiserver-add")
        m = re.fullmatch(r"export KUBECONFIG=(\S+)\n?", r.stdout)
        assert m, r.stdout
        self.kubeconfigs["admin-2"] = Path(m.group(1))
        return self.kubeconfigs["admin-2"]



class OperatorProcess:
    """`python -m tailor_operator.runner` against the test control plane."""

    def __init__(self, kubeconfig: Path, workdir: Path, env: Optional[dict[str, str]] = None,
                 namespaces: Optional[list[str]] = None, log: Optional[Path] = None) -> None:
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.extra_env = dict(env or {})
        self.namespaces = namespaces
        self.log_path = log or workdir / "operator.log"
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.process: Optional[subprocess.Popen] = None

    def start(self, wait: bool = True) -> "OperatorProcess":
        env = dict(os.environ)
        env.update(FAST_ENV)
        env.update({"KUBECONFIG": str(self.kubeconfig), "TAILOR_WORKDIR": str(self.workdir / "runs"),
                    "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"),
                                                   env.get("PYTHONPATH", "")])})
        env.pop("KUBERNETES_SERVICE_HOST", None)
        env.update(self.extra_env)
        args = [sys.executable, "-m", "tailor_operator.runner", f"--metrics-port={self.metrics_port}",
                f"--health-port={self.health_port}"]
        args += [f"--namespace={n}" for n in self.namespaces] if self.namespaces else ["--all-namespaces"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                        start_new_session=True)
        log.close()
        if wait:
            wait_until(self.healthy, 60, what="operator /healthz", on_timeout=self.log_tail)
        return self

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"operator exited ({self.process and self.process.returncode}):\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no graceful shutdown (the crash the operator must survive)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "----- operator log -----\n" + "\n".join(text)

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Kube:
    """Small typed helpers over the API for one namespace (via tailor_operator.cluster)."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from tailor_operator.cluster import Cluster

        self.cluster = Cluster(api_client)
        self.ns = namespace

    # objects
    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = json.loads(json.dumps(obj))
        obj.setdefault("metadata", {})["namespace"] = self.ns
        return self.cluster.create(obj)

    def get(self, kind: str, name: str) -> Optional[dict[str, Any]]:
        return self.cluster.get(kind, self.ns, name)

    def list(self, kind: str, labels: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
        return self.cluster.list(kind, self.ns, labels)

    def patch(self, kind: str, name: str, patch: dict[str, Any], sub: Optional[str] = None) -> dict[str, Any]:
        return self.cluster.merge_patch(kind, self.ns, name, patch, sub)

    def delete(self, kind: str, name: str) -> bool:
        return self.cluster.delete(kind, self.ns, name)

    def status(self, kind: str, name: str) -> dict[str, Any]:
        return (self.get(kind, name) or {}).get("status") or {}

    def condition(self, kind: str, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(kind, name).get("conditions", []) if c["type"] == type_), {})

    def events(self, name: str) -> list[dict[str, Any]]:
        items = [e for e in self.cluster.list("Event", self.ns) if (e.get("involvedObject") or {}).get("name") == name]
        return sorted(items, key=lambda e: int(e["metadata"].get("resourceVersion") or 0))  # creation order

    def event_reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in self.events(name)]

    def wait_event(self, name: str, reason: str, timeout: float = 20) -> None:
        """kopf posts Events from a queue of its own, after the status patch: a reason seen in a
        condition may reach the Event list a moment later (seconds on a loaded machine)."""
        wait_until(lambda: reason in self.event_reasons(name), timeout, what=f"{reason} event on {name}",
                   on_timeout=lambda: f"events: {self.event_reasons(name)}")

    # playing KubeRay and the trainer
    def set_rayjob_status(self, name: str, deployment: str, job_status: str = "", **extra: Any) -> None:
        status = {"jobDeploymentStatus": deployment, "jobStatus": job_status, **extra}
        self.patch("RayJob", name, {"status": status}, sub="status")

    def write_progress(self, run: str, doc: dict[str, Any]) -> None:
        """Play the trainer's ConfigMapSink: patch `<run>-progress`, create it (labels, no owner)
        when it is not there yet."""
        from tailor_operator.cluster import NotFound

        labels = {"app.kubernetes.io/managed-by": "tailor", "tailor.dev/finetunejob": run.rsplit("-r", 1)[0],
                  "tailor.dev/run": run}
        body = {"metadata": {"name": f"{run}-progress", "labels": labels},
                "data": {"progress.json": json.dumps(doc)}}
        try:
            self.patch("ConfigMap", f"{run}-progress", body)
        except NotFound:
            self.apply({"apiVersion": "v1", "kind": "ConfigMap", **body})

    def run_config(self, run: str) -> dict[str, Any]:
        """The config.json a run's pods read: from its RayJob's head pod template (the downward API
        mounts that annotation), or ConfigMap `<run>-config` when it was too large for one."""
        rayjob = self.get("RayJob", run) or {}
        template = ((rayjob.get("spec") or {}).get("rayClusterSpec") or {}).get("headGroupSpec", {}).get("template", {})
        inline = ((template.get("metadata") or {}).get("annotations") or {}).get("tailor.dev/config")
        if inline is not None:
            return json.loads(inline)
        return json.loads(self.get("ConfigMap", f"{run}-config")["data"]["config.json"])

    def publish_validation(self, dataset: str, result: dict[str, Any], timeout: float = 60,
                           waiting_only: bool = False) -> str:
        """Play the validation pod: put status.json into the operator's inspect ConfigMap (with
        `waiting_only`, the one that has none yet: an earlier revision's may still be there)."""
        def found() -> Optional[dict[str, Any]]:
            cms = self.list("ConfigMap", {"tailor.dev/dataset": dataset, "app.kubernetes.io/name": "tailor-inspect"})
            return next((c for c in cms if not waiting_only or "status.json" not in (c.get("data") or {})), None)
        cm = wait_until(found, timeout, what=f"validation ConfigMap of {dataset}",
                        on_timeout=lambda: f"Dataset {dataset} status: {self.status('Dataset', dataset)}")
        self.patch("ConfigMap", cm["metadata"]["name"], {"data": {"status.json": json.dumps(result)}})
        return cm["metadata"]["name"]

    def new_revision(self, dataset: str, revision: str, timeout: float = 30) -> None:
        """A new user-set revision of a Dataset, validated: continuous-learning jobs start their next run."""
        self.patch("Dataset", dataset, {"spec": {"revision": revision}})
        self.publish_validation(dataset, ready_result(revision), timeout, waiting_only=True)
        wait_until(lambda: self.status("Dataset", dataset).get("revision") == revision, timeout, what="new revision")


def ready_result(revision: str = "sha256:0123456789abcdef", rows: int = 1000) -> dict[str, Any]:
    """What `python -m tailor_trainer inspect` prints for a good Dataset."""
    return {"revision": revision, "rows": rows, "rowsRead": rows + 12,
            "splits": {"train": int(rows * 0.8), "validation": rows // 10, "test": rows // 10},
            "dropped": {"duplicate": 10, "tooShort": 2}, "firstErrors": [],
            "conditions": [{"type": "Ready", "status": "True", "reason": "Validated", "message": f"{rows} rows"}]}


def dataset_manifest(name: str = "tickets", **spec: Any) -> dict[str, Any]:
    body = {"source": {"uri": "s3://acme/tickets.jsonl"}, "format": "jsonl", "schema": "instruction"}
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Dataset", "metadata": {"name": name}, "spec": body}


def job_manifest(name: str = "support", dataset: str = "tickets", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "backend": "kuberay",
        "baseModel": {"uri": "hf://acme/tiny-llama"},
        "datasetRef": {"name": dataset},
        "hyperparameters": {"maxSteps": 300},
        "resources": {"workers": 2, "gpusPerWorker": 1, "cpusPerWorker": "4", "memoryPerWorker": "16Gi"},
        "output": {"uri": "s3://acme/runs"},
        "backoffLimit": 0,
    }
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}


def result_doc(run: str, loss: float, **metrics: float) -> dict[str, Any]:
    return {"run": run, "attempt": 1, "stage": "evaluate", "state": "Succeeded", "step": 300, "totalSteps": 300,
            "result": {"run": run, "metrics": {"loss": loss, "baseLoss": 2.5, **metrics},
                       "artifacts": {"model": f"s3://acme/runs/support/{run}/train/model",
                                     "report": f"s3://acme/runs/support/{run}/evaluate/report.html"},
                       "tokensTrained": 1000}}


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ----------------------------------------------------------------- the operator identity's writes

TAILOR_USER = "system:serviceaccount:tailor-system:tailor"
"""The identity of `ControlPlane.kubeconfigs["tailor"]` (the chart's ServiceAccount)."""

AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Request
  users: ["{TAILOR_USER}"]
  verbs: ["create", "update", "patch", "delete", "deletecollection"]
- level: None
"""
"""What a control plane of one's own (conftest `own_control_plane`) records: every write of the
operator identity, with its request body."""


def job_owner(name: str) -> str:
    """The FineTuneJob a written object belongs to: itself, its runs' children (`<job>-r1`,
    `<job>-r1-config`, ...), its events (`<job>.<suffix>`)."""
    return re.sub(r"-r\d+(-.*)?$", "", name.split(".", 1)[0])


def writes_since(audit_log: Path, since: datetime, namespace: str, names: set[str]) -> tuple[dict[str, int], list]:
    """Successful writes by the operator's identity since `since` (from the audit log) to the
    FineTuneJobs `names` and to their children (`<name>-r1...`), counted by
    `verb resource[/subresource]`, and the first few requests."""
    counts: dict[str, int] = {}
    samples: list = []
    for line in audit_log.read_text().splitlines():
        ev = json.loads(line)
        ref = ev.get("objectRef") or {}
        ts = datetime.fromisoformat(ev["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if (ev.get("stage") != "ResponseComplete" or ev["user"]["username"] != TAILOR_USER or ts < since
                or ref.get("namespace") != namespace or ref.get("resource") == "leases"
                or (ev.get("responseStatus") or {}).get("code", 200) >= 400
                or job_owner(ref.get("name") or "") not in names):
            continue
        key = f"{ev['verb']} {ref.get('resource')}{'/' + ref['subresource'] if ref.get('subresource') else ''}"
        counts[key] = counts.get(key, 0) + 1
        if len(samples) < 3:
            samples.append((key, ref.get("name"), ev.get("userAgent"), ev.get("requestObject")))
    return counts, samples
