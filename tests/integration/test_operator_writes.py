"""What the operator writes for a new FineTuneJob, counted by the API server (issue 14).

A control plane of its own with an audit log of the operator identity's writes: a kuberay job
costs three writes before it runs — its status, the run's NetworkPolicy and the RayJob (config
inside) — and none more while it waits, re-checked every second; kopf writes nothing to it (no
finalizer, no annotation). A local-backend job holds the finalizer, which cleans up its trainer
processes when it is deleted. Counts, not timings: nothing here depends on how fast it runs."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import pytest

from operator_fixtures import (
    TAILOR_USER,
    ControlPlane,
    Kube,
    OperatorProcess,
    dataset_manifest,
    job_manifest,
    ready_result,
    wait_until,
    writes_since,
)

pytestmark = pytest.mark.integration

NS = "writes"


def _counter(operator: OperatorProcess, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", operator.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("own_control_plane", [()], indirect=True, ids=["audited"])
def test_a_new_job_costs_three_writes_and_kopf_writes_nothing(own_control_plane: ControlPlane, tmp_path) -> None:
    cp = own_control_plane
    api = cp.api_client()
    from kubernetes import client

    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
    cp.kubectl("create", "clusterrolebinding", "tailor-admin", "--clusterrole=cluster-admin",
               f"--user={TAILOR_USER}", check=True)
    kube = Kube(api, NS)
    # re-checked every second while Queued (ACTIVE_POLL 1 s in the test settings): none may write
    op = OperatorProcess(cp.kubeconfigs["tailor"], tmp_path / "op", namespaces=[NS]).start()
    try:
        kube.apply(dataset_manifest("tickets"))
        kube.publish_validation("tickets", ready_result(), timeout=60)
        wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 60,
                   what="Dataset Ready", on_timeout=op.log_tail)

        since = datetime.now(timezone.utc)
        kube.apply(job_manifest("one"))
        wait_until(lambda: kube.get("RayJob", "one-r1"), 60, what="RayJob", on_timeout=op.log_tail)
        wait_until(lambda: kube.status("FineTuneJob", "one").get("phase") == "Queued", 60, what="Queued")
        # a few re-checks while it waits for KubeRay (polls every second, the resync every 15 s)
        done = _counter(op, "tailor_reconcile_duration_seconds_count", kind="FineTuneJob")
        wait_until(lambda: _counter(op, "tailor_reconcile_duration_seconds_count", kind="FineTuneJob") >= done + 3,
                   60, what="three more reconciles")
        writes, samples = writes_since(cp.audit_log, since, NS, {"one"})
        assert writes == {"update finetunejobs/status": 1, "create networkpolicies": 1, "create rayjobs": 1}, \
            json.dumps(samples, indent=1)
        meta = kube.get("FineTuneJob", "one")["metadata"]
        assert not meta.get("finalizers"), meta
        assert not [a for a in meta.get("annotations") or {} if a.startswith("tailor.dev/")], meta
        assert len(kube.list("RayJob")) == 1

        # a local-backend job is the one kind that holds the finalizer: its processes need stopping
        since = datetime.now(timezone.utc)
        kube.apply(job_manifest("laptop", backend="local", baseModel={"uri": str(tmp_path / "no-model")},
                                output={"uri": str(tmp_path / "out")}, datasetRef={"name": "absent"}))
        wait_until(lambda: (kube.get("FineTuneJob", "laptop") or {}).get("metadata", {}).get("finalizers")
                   == ["tailor.dev/finalizer"], 60, what="finalizer on the local job", on_timeout=op.log_tail)
        kube.delete("FineTuneJob", "laptop")
        wait_until(lambda: kube.get("FineTuneJob", "laptop") is None, 60, what="local job released",
                   on_timeout=op.log_tail)
        # ...and the kuberay job saw none of that
        assert writes_since(cp.audit_log, since, NS, {"one"})[0] == {}
    finally:
        op.stop()
