"""Helpers for tests on a real node: `scripts/testenv up --node --kuberay` (kubelet, containerd +
runc, CNI bridge, kube-scheduler, kube-proxy, CoreDNS, the real KubeRay operator), the images built
from the project's Dockerfile by `scripts/images` and imported into the node's containerd, and the
chart installed from those images. See docs/testenv.md ("The node").

Nothing here is skipped: without root, the Debian packages or the built binaries, the tests fail
and say what is missing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from operator_fixtures import TESTENV, ControlPlane  # noqa: E402,F401 (TESTENV: re-exported)

IMAGES_SCRIPT = REPO / "scripts" / "images"
OPERATOR_NAMESPACE = "tailor-system"


class NodeCluster(ControlPlane):
    """The control plane plus its node, and the image references the Dockerfile produced."""

    node: dict
    images: dict

    def pods(self, namespace: str, selector: str | None = None) -> list[dict]:
        args = ["get", "pods", "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.kubectl(*args, check=True).stdout)["items"]

    def get_json(self, *args: str) -> dict | None:
        r = self.kubectl("get", *args, "-o", "json")
        return json.loads(r.stdout) if r.returncode == 0 else None


def images_cmd(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(IMAGES_SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def operator_values(cluster: NodeCluster) -> list[str]:
    """`helm install` flags of the e2e: the images built here, and a 2-core node (small requests).

    The node is tainted like a GPU pool: the operator pod and the CPU parts of a run (Ray head,
    submitter, Dataset validation) get there through the chart's tolerations, the Ray workers
    through the FineTuneJob's own nodeSelector and tolerations."""
    taint = cluster.node["taint"]
    toleration = json.dumps([{"key": taint["key"], "operator": "Equal", "value": taint["value"],
                              "effect": taint["effect"]}])
    operator_repo, operator_tag = cluster.images["operator"].rsplit(":", 1)
    return [
        "--set", f"image.repository={operator_repo}", "--set", f"image.tag={operator_tag}",
        "--set", "image.pullPolicy=Never",
        "--set", f"trainer.image={cluster.images['trainer']}", "--set", "trainer.imagePullPolicy=Never",
        "--set-json", f"tolerations={toleration}",
        "--set-json", f"trainer.cpuPool.tolerations={toleration}",
        "--set", "trainer.headCpu=250m", "--set", "trainer.headMemory=6Gi",
        "--set", "trainer.validation.cpu=250m", "--set", "trainer.validation.memory=1Gi",
        "--set", "trainer.clusterTtlSeconds=10",
        "--set", "operator.activePollSeconds=3", "--set", "operator.statusMinIntervalSeconds=2",
        "--set", "operator.backoffBaseSeconds=5",
    ]


def pod_logs(cluster: NodeCluster, namespace: str, lines: int = 40) -> str:
    out = []
    for pod in cluster.pods(namespace):
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            r = cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"], "-c", c["name"],
                                f"--tail={lines}")
            out.append(f"----- {namespace}/{pod['metadata']['name']} [{c['name']}] "
                       f"{pod['status'].get('phase')} -----\n{r.stdout}{r.stderr}")
    return "\n".join(out)


