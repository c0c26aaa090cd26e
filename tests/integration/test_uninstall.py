"""The uninstall and stuck-deletion procedures of docs/operator.md ("Uninstall and stuck
deletion"), run exactly as written with real kubectl, the real KubeRay operator and the
kube-controller-manager's garbage collector: no RayJob or RayCluster is left behind."""

from __future__ import annotations

import time

import pytest

from operator_fixtures import Kube, OperatorProcess, dataset_manifest, job_manifest, ready_result, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def real_kuberay(control_plane):
    control_plane.start_kuberay()
    yield control_plane
    control_plane.stop_kuberay()  # other modules play KubeRay themselves


def _job_with_raycluster(kube: Kube, name: str, timeout: float = 90) -> None:
    kube.apply(job_manifest(name))
    wait_until(lambda: [c for c in kube.list("RayCluster") if c["metadata"]["name"].startswith(f"{name}-r1")],
               timeout, what=f"KubeRay's RayCluster for {name}")


def _ready_dataset(kube: Kube) -> None:
    kube.apply(dataset_manifest("tickets"))
    kube.publish_validation("tickets", ready_result())
    wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 30, what="Ready")


def test_uninstall_procedure_leaves_no_rayclusters(real_kuberay, k8s_client, namespace, tmp_path) -> None:
    """Step 1 of the procedure: delete every FineTuneJob while the operator and KubeRay still run
    (kuberay jobs go at once: no finalizer); the garbage collector deletes their RayJobs and KubeRay
    the RayClusters."""
    kube = Kube(k8s_client, namespace)
    operator = OperatorProcess(real_kuberay.kubeconfig, tmp_path / "op", namespaces=[namespace]).start()
    try:
        _ready_dataset(kube)
        for name in ("first", "second"):
            _job_with_raycluster(kube, name)
        t0 = time.monotonic()
        r = real_kuberay.kubectl("delete", "finetunejobs,datasets", "--all", "-n", namespace, "--wait",
                                 "--timeout=120s", timeout=150)
        assert r.returncode == 0, r.stderr + operator.log_tail()
        took = time.monotonic() - t0
        wait_until(lambda: not kube.list("RayJob") and not kube.list("RayCluster"), 90,
                   what="no RayJob or RayCluster left", on_timeout=lambda: str(kube.list("RayCluster")))
        print(f"\n[uninstall] 2 jobs deleted in {took:.1f}s; RayJobs and RayClusters gone after "
              f"{time.monotonic() - t0:.1f}s")
    finally:
        operator.stop()


def test_a_job_deleted_after_the_operator_is_gone_leaves_nothing_behind(
        real_kuberay, k8s_client, namespace, tmp_path) -> None:
    """The operator is gone (uninstalled first, or crashed for good): a deleted kuberay job needs
    no one — it has no finalizer, the garbage collector removes its RayJob and ConfigMaps (owner
    references) and KubeRay the RayCluster. A local-backend job waits on its finalizer until the
    documented patch releases it."""
    kube = Kube(k8s_client, namespace)
    operator = OperatorProcess(real_kuberay.kubeconfig, tmp_path / "op", namespaces=[namespace]).start()
    try:
        _ready_dataset(kube)
        _job_with_raycluster(kube, "orphan")
        kube.apply(job_manifest("laptop", backend="local", baseModel={"uri": str(tmp_path / "no-model")},
                                output={"uri": str(tmp_path / "out")}, datasetRef={"name": "absent"}))
        wait_until(lambda: (kube.get("FineTuneJob", "laptop") or {}).get("metadata", {}).get("finalizers"), 60,
                   what="the local job's finalizer", on_timeout=operator.log_tail)
    finally:
        operator.kill()
    real_kuberay.kubectl("delete", "ftj", "orphan", "-n", namespace, "--wait=true", "--timeout=30s", check=True)
    t0 = time.monotonic()
    wait_until(lambda: kube.get("FineTuneJob", "orphan") is None and not kube.list("RayJob")
               and not kube.list("RayCluster") and not kube.list("ConfigMap", {"tailor.dev/finetunejob": "orphan"}),
               90, what="job, RayJob, RayCluster and ConfigMaps gone",
               on_timeout=lambda: f"{kube.list('RayJob')}\n{kube.list('RayCluster')}")
    print(f"\n[uninstall] kuberay job deleted without an operator: children garbage-collected in "
          f"{time.monotonic() - t0:.1f}s")

    real_kuberay.kubectl("delete", "ftj", "laptop", "-n", namespace, "--wait=false", check=True)
    stuck = kube.get("FineTuneJob", "laptop")
    assert stuck is not None and stuck["metadata"].get("deletionTimestamp"), stuck
    assert stuck["metadata"]["finalizers"] == ["tailor.dev/finalizer"], stuck["metadata"]
    # the documented command, verbatim
    real_kuberay.kubectl("patch", "ftj", "laptop", "-n", namespace, "--type=merge",
                         "-p", '{"metadata":{"finalizers":null}}', check=True)
    wait_until(lambda: kube.get("FineTuneJob", "laptop") is None, 30, what="local job released by the patch")
