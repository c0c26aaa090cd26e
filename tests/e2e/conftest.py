"""Fixtures for tests on a real node (see node_fixtures.py and docs/testenv.md, "The node").

Module-scoped: the node (and whatever a failed test left running on it) is gone before the next
module's tests start, so it never competes with them for the two cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node_fixtures import (OPERATOR_NAMESPACE, REPO, TESTENV, NodeCluster, images_cmd,
                           operator_values, pod_logs)

_ACTIVE: dict = {}


@pytest.fixture(scope="module")
def node_cluster(tmp_path_factory) -> NodeCluster:
    if os.geteuid() != 0:
        pytest.fail("the node tests run a kubelet and containerd and need root", pytrace=False)
    r = subprocess.run([str(TESTENV), "env"], capture_output=True, text=True)
    bin_dir = Path(r.stdout.strip())
    needed = ["kube-apiserver", "kubelet", "kube-scheduler", "kube-proxy", "coredns", "ray-operator", "helm"]
    missing = [b for b in needed if not (bin_dir / b).is_file()]
    if missing:
        pytest.fail(f"binaries missing in {bin_dir}: {', '.join(missing)}; run `scripts/testenv build`",
                    pytrace=False)
    # the images: built (or found cached) before the node starts, so `up` is not racing a build
    t0 = time.monotonic()
    built = images_cmd("build", timeout=3600)
    if built.returncode != 0:
        pytest.fail(f"`scripts/images build` failed:\n{built.stderr[-6000:]}", pytrace=False)
    images = json.loads(built.stdout)
    cluster = NodeCluster.up(tmp_path_factory.mktemp("node"), bin_dir, "--node", "--kuberay", timeout=600)
    state = cluster.dir
    info = json.loads((state / "env.json").read_text())
    cluster.node = info["node"]
    cluster.images = images
    imported = images_cmd("import", "--address", info["node"]["containerd"], timeout=1800)
    if imported.returncode != 0:
        subprocess.run([str(TESTENV), "down", "--dir", str(state)], capture_output=True, timeout=300)
        pytest.fail(f"`scripts/images import` failed:\n{imported.stderr[-6000:]}", pytrace=False)
    cluster.startup_seconds = time.monotonic() - t0
    sys.stderr.write(f"\n[node] images, node and import ready in {cluster.startup_seconds:.0f}s\n")
    _ACTIVE["cluster"] = cluster
    try:
        yield cluster
    finally:
        _ACTIVE.pop("cluster", None)
        subprocess.run([str(TESTENV), "down", "--dir", str(state)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tailor_release(node_cluster: NodeCluster) -> NodeCluster:
    """The chart installed as users install it, with the operator image built from the Dockerfile.
    `testenv up` applied crds/ with kubectl already (as a user who started from the plain CRDs):
    `--take-ownership` lets the chart's CRD templates adopt them (docs/operator.md)."""
    t0 = time.monotonic()
    node_cluster.helm("install", "tailor", str(REPO / "charts" / "tailor"), "--namespace", OPERATOR_NAMESPACE,
                      "--create-namespace", "--take-ownership", *operator_values(node_cluster),
                      "--wait", "--timeout", "5m",
                      check=True, timeout=400)
    sys.stderr.write(f"[node] helm install --wait: {time.monotonic() - t0:.0f}s\n")
    yield node_cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cluster = _ACTIVE.get("cluster")
    if report.failed and cluster is not None:
        report.sections.append(("node logs", cluster.log_tails(40)))
        try:
            report.sections.append(("operator pod logs", pod_logs(cluster, OPERATOR_NAMESPACE, 80)))
        except Exception as e:  # noqa: BLE001 - diagnostics only
            report.sections.append(("operator pod logs", f"unavailable: {e}"))
