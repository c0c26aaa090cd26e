"""The operator rides out API server outages and throttling (issue 12).

Each test starts a control plane of its own (the session's one is shared and must not be
stopped or throttled): one whose kube-apiserver is stopped for 30 s while a second kube-apiserver
on the same etcd takes a change, and one with tiny inflight limits and APF off, so the operator
gets real 429s while 300 objects converge. The figures are printed (run with -s)."""

from __future__ import annotations

import json
import re
import ssl
import time
import urllib.request
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


def _namespace(kube_client, name: str) -> None:
    from kubernetes import client

    client.CoreV1Api(kube_client).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))


def _ready_dataset(kube: Kube) -> None:
    kube.apply(dataset_manifest("tickets"))
    kube.publish_validation("tickets", ready_result(), timeout=120)
    wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 120,
               what="Dataset Ready")


# ------------------------------------------------------------------------------------ outage


def test_operator_resumes_after_a_30s_api_server_outage(own_control_plane: ControlPlane, tmp_path) -> None:
    cp = own_control_plane
    second = cp.add_apiserver()
    api, api2 = cp.api_client(), cp.api_client("admin-2")
    _namespace(api, "outage")
    kube, kube2 = Kube(api, "outage"), Kube(api2, "outage")
    op = OperatorProcess(cp.kubeconfig, tmp_path / "op", namespaces=["outage"]).start()
    try:
        _ready_dataset(kube)
        kube.apply(job_manifest("before"))
        wait_until(lambda: kube.get("RayJob", "before-r1"), 60, what="RayJob before-r1", on_timeout=op.log_tail)
        kube.set_rayjob_status("before-r1", "Running", "RUNNING")
        wait_until(lambda: kube.status("FineTuneJob", "before").get("phase") == "Running", 60, what="Running",
                   on_timeout=op.log_tail)
        pid = op.process.pid

        t_stop = time.monotonic()
        cp.stop_apiserver()
        # during the outage, through the second API server: a new job, and a spec change (suspend)
        kube2.apply(job_manifest("during"))
        kube2.patch("FineTuneJob", "before", {"spec": {"suspend": True}})
        assert kube2.get("RayJob", "during-r1") is None
        time.sleep(max(0.0, 30 - (time.monotonic() - t_stop)))
        cp.start_apiserver()
        t_up = time.monotonic()
        print(f"\n[outage] API server down for {t_up - t_stop:.1f}s (restart included)")

        wait_until(lambda: kube.get("RayJob", "during-r1"), 60, interval=0.5, what="RayJob during-r1 after the outage",
                   on_timeout=op.log_tail)
        t_created = time.monotonic() - t_up
        wait_until(lambda: kube.status("FineTuneJob", "before").get("phase") == "Suspended"
                   and kube.get("RayJob", "before-r1") is None, 60 - t_created, interval=0.5,
                   what="suspended job's RayJob deleted", on_timeout=lambda: json.dumps(
                       kube.status("FineTuneJob", "before")) + op.log_tail())
        t_suspended = time.monotonic() - t_up
        print(f"[outage] new job's RayJob created {t_created:.1f}s, suspend applied {t_suspended:.1f}s "
              f"after the API server was back")
        assert op.process.poll() is None and op.process.pid == pid  # never restarted
        assert op.healthy()
        assert t_suspended < 60
    finally:
        op.stop()


# -------------------------------------------------------------------------------- throttling

N_JOBS = 300


def _apiserver_429s(cp: ControlPlane) -> int:
    info = json.loads((cp.dir / "env.json").read_text())
    req = urllib.request.Request(cp.server + "/metrics", headers={"Authorization": f"Bearer {info['tokens']['admin']}"})
    with urllib.request.urlopen(req, timeout=10, context=ssl.create_default_context(cafile=info["ca"])) as r:
        text = r.read().decode()
    return int(sum(float(m.group(1)) for m in re.finditer(r'^apiserver_request_total\{[^}]*code="429"[^}]*\} (\S+)$',
                                                            text, re.M)))


def _converged(kube: Kube) -> tuple[set[str], set[str]]:
    """(jobs whose run is created and recorded: Queued, waiting for KubeRay; those of them that
    carry nothing of kopf's: no finalizer, no `tailor.dev/` annotation. kopf has no handler that
    writes to a kuberay-backend job, so the two sets must be equal.)"""
    jobs = kube.list("FineTuneJob")
    rayjobs = {r["metadata"]["name"] for r in kube.list("RayJob")}
    tailor = {j["metadata"]["name"] for j in jobs
              if (j.get("status") or {}).get("currentRun") == f"{j['metadata']['name']}-r1"
              and (j.get("status") or {}).get("phase") == "Queued" and f"{j['metadata']['name']}-r1" in rayjobs}
    clean = {j["metadata"]["name"] for j in jobs if j["metadata"]["name"] in tailor
             and not j["metadata"].get("finalizers")
             and not [a for a in (j["metadata"].get("annotations") or {}) if a.startswith("tailor.dev/")]}
    return tailor, clean


# APF off: the plain inflight limits answer 429 (with Retry-After: 1) to all but system:masters
@pytest.mark.parametrize("own_control_plane", [("--enable-priority-and-fairness=false", "--max-requests-inflight=2",
                                                "--max-mutating-requests-inflight=1")], indirect=True,
                         ids=["inflight-2-1"])
def test_300_objects_converge_under_real_429s_and_a_restart_writes_nothing(own_control_plane: ControlPlane,
                                                                           tmp_path) -> None:
    cp = own_control_plane
    api = cp.api_client()
    _namespace(api, "throttled")
    # the operator runs as the tailor identity: system:masters is never answered 429
    cp.kubectl("create", "clusterrolebinding", "tailor-admin", "--clusterrole=cluster-admin",
               f"--user={TAILOR_USER}", check=True)
    kube = Kube(api, "throttled")
    env = {"TAILOR_RESYNC_SECONDS": "15", "TAILOR_ACTIVE_POLL_SECONDS": "30"}
    kube.apply(dataset_manifest("tickets"))
    t0 = time.monotonic()
    for i in range(N_JOBS):
        kube.apply(job_manifest(f"job-{i:03d}"))
    print(f"\n[throttle] {N_JOBS} FineTuneJobs created in {time.monotonic() - t0:.1f}s (operator stopped)")
    base_429 = _apiserver_429s(cp)

    op = OperatorProcess(cp.kubeconfigs["tailor"], tmp_path / "op", env=env, namespaces=["throttled"])
    t_start = time.monotonic()
    op.start()
    kube.publish_validation("tickets", ready_result(), timeout=120)
    wait_until(lambda: len(_converged(kube)[0]) == N_JOBS, 300, interval=3, what=f"{N_JOBS} jobs converged",
               on_timeout=lambda: f"{len(_converged(kube)[0])} converged\n" + op.log_tail())
    t_conv = time.monotonic() - t_start
    tailor_done, clean = _converged(kube)
    throttled = _apiserver_429s(cp) - base_429
    metrics = op.metrics()
    retries = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^tailor_api_retries_total\{code="([^"]+)"\} (\S+)$', metrics, re.M)}
    print(f"[throttle] {len(tailor_done)} jobs converged (status, RayJob) in {t_conv:.1f}s; API server answered "
          f"{throttled} x 429; operator retries {retries}")
    assert op.process.poll() is None and op.healthy()  # no crash
    assert clean == tailor_done  # kopf wrote nothing to them: no finalizer, no annotation
    assert throttled > 0, "the API server never answered 429: the test did not throttle"
    assert sum(retries.values()) > 0

    # a restarted operator must not write to converged objects, through at least one full resync
    op.stop()
    since = datetime.now(timezone.utc)
    op2 = OperatorProcess(cp.kubeconfigs["tailor"], tmp_path / "op2", env=env, namespaces=["throttled"]).start()
    try:
        time.sleep(15 + 20)  # TAILOR_RESYNC_SECONDS + the time to list and reconcile 300 objects
        assert op2.process.poll() is None and op2.healthy()
        reconciles = sum(float(m.group(1)) for m in re.finditer(
            r'^tailor_reconcile_duration_seconds_count\{kind="FineTuneJob"\} (\S+)$', op2.metrics(), re.M))
        print(f"[throttle] the restarted operator reconciled FineTuneJobs {reconciles:.0f} times in that window")
        assert reconciles >= 2 * N_JOBS  # the first sight and at least one resync of every job
        writes, samples = writes_since(cp.audit_log, since, "throttled", tailor_done)
        print(f"[throttle] writes in the 35 s after the restart to the {len(tailor_done)} converged jobs: "
              f"{writes or 0}")
        assert len(_converged(kube)[0]) == N_JOBS
        assert writes == {}, json.dumps(samples, indent=1)
    finally:
        op2.stop()
