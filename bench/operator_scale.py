#!/usr/bin/env python3
"""Scale benchmark: apply N FineTuneJobs (kuberay backend) and measure how the operator keeps up.

    python bench/operator_scale.py                 # N = 500 and 1000 on a fresh test control plane
    python bench/operator_scale.py -n 200          # one size
    KUBECONFIG=... python bench/operator_scale.py  # an existing (test) cluster

Per N it prints: time from the first apply until every RayJob exists; p50/p99 latency from a job's
creation to its RayJob's appearance (seen by a watch); API writes per job (the operator's own
count, and the API server's request counter minus the benchmark's own writes); the operator's
peak RSS; and the baseline: the same N RayJob creations made directly through the API server by
the same client concurrency, as a ratio. No kubelet: RayJobs are only created, never run.
Timing figures are informational; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer"), str(REPO / "tests" / "integration")]

from operator_fixtures import OperatorProcess, dataset_manifest, job_manifest, ready_result, wait_until  # noqa: E402

CLIENT_THREADS = 8
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE"}


def _apiserver_writes(cluster) -> int:
    """Sum of apiserver_request_total over write verbs (all clients)."""
    params = cluster.api.param_serialize(method="GET", resource_path="/metrics", header_params={"Accept": "text/plain"},
                                         auth_settings=["BearerToken"])
    text = cluster.api.call_api(*params, _request_timeout=60).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            verb = re.search(r'verb="([A-Z]+)"', line)
            if verb and verb.group(1) in WRITE_VERBS:
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RayJobWatch:
    """Arrival time of each RayJob in a namespace (a watch, so latency is not a polling artefact)."""

    def __init__(self, api_client, namespace: str) -> None:
        from kubernetes import client, watch

        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._watch = watch.Watch()
        api = client.CustomObjectsApi(api_client)

        def run() -> None:
            while not self._stop.is_set():
                try:
                    for event in self._watch.stream(api.list_namespaced_custom_object, "ray.io", "v1", namespace,
                                                    "rayjobs", timeout_seconds=60):
                        name = event["object"]["metadata"]["name"]
                        self.seen.setdefault(name, time.monotonic())
                        if self._stop.is_set():
                            return
                except Exception:  # noqa: BLE001 - restart the watch
                    time.sleep(0.2)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._watch.stop()


def _namespace(cluster, name: str) -> None:
    cluster.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": name}})


def baseline(cluster, n: int, namespace: str) -> float:
    """The same N RayJob creations through the API server, straight from a client."""
    from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob
    from tailor_operator.builders.rayjob import RayJobOptions, build_rayjob

    _namespace(cluster, namespace)
    ds = Dataset.model_validate({**dataset_manifest(), "metadata": {"name": "tickets", "namespace": namespace}})
    bodies = []
    for i in range(n):
        job = FineTuneJob.model_validate({**job_manifest(f"job-{i:05d}"),
                                          "metadata": {"name": f"job-{i:05d}", "namespace": namespace, "uid": "x"}})
        rayjob = build_rayjob(job, ds, f"job-{i:05d}-r1", number=1, attempt=1, dataset_revision="r",
                              config_hash="0" * 16, options=RayJobOptions())
        rayjob["metadata"].pop("ownerReferences")
        bodies.append(rayjob)
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(cluster.create, bodies))
    return time.monotonic() - started


def run_size(cp_kubeconfig: Path, api_client, n: int, workdir: Path) -> dict:
    from tailor_operator.cluster import Cluster

    cluster = Cluster(api_client)
    ns = f"bench-{n}-{int(time.time()) % 100000}"
    _namespace(cluster, ns)
    cluster.create({**dataset_manifest(), "metadata": {"name": "tickets", "namespace": ns}})

    operator = OperatorProcess(cp_kubeconfig, workdir / f"op-{n}", namespaces=[ns],
                               env={"TAILOR_WORKERS": "16", "TAILOR_RESYNC_SECONDS": "600",
                                    "TAILOR_ACTIVE_POLL_SECONDS": "30"}).start()
    try:
        inspect = wait_until(lambda: next(iter(cluster.list("ConfigMap", ns, {"tailor.dev/dataset": "tickets"})), None),
                             60, what="validation ConfigMap")
        cluster.merge_patch("ConfigMap", ns, inspect["metadata"]["name"],
                            {"data": {"status.json": json.dumps(ready_result())}})
        def ready() -> bool:
            status = (cluster.get("Dataset", ns, "tickets") or {}).get("status") or {}
            return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
        wait_until(ready, 60, what="Dataset Ready")
        time.sleep(1)
        writes_before = _apiserver_writes(cluster)
        ops_before = _operator_writes(operator)
        watch = RayJobWatch(api_client, ns)
        created: dict[str, float] = {}

        def apply(i: int) -> None:
            name = f"job-{i:05d}"
            cluster.create({**job_manifest(name), "metadata": {"name": name, "namespace": ns}})
            created[f"{name}-r1"] = time.monotonic()

        t0 = time.monotonic()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            list(pool.map(apply, range(n)))
        apply_seconds = time.monotonic() - t0
        wait_until(lambda: len(watch.seen) >= n, 1800, interval=0.5, what=f"{n} RayJobs",
                   on_timeout=lambda: f"{len(watch.seen)} seen\n{operator.log_tail(20)}")
        all_rayjobs = max(watch.seen.values()) - t0
        watch.stop()
        latencies = sorted(watch.seen[r] - created[r] for r in created)
        # let every job's status settle (phase Queued) before counting writes
        def settled() -> bool:
            items = cluster.list("FineTuneJob", ns)
            return len(items) == n and all((i.get("status") or {}).get("phase") == "Queued" for i in items)
        wait_until(settled, 600, interval=2, what="all jobs Queued")
        time.sleep(3)
        writes = _apiserver_writes(cluster) - writes_before - n  # minus the benchmark's own N creates
        op_writes = _operator_writes(operator) - ops_before
        rss = _peak_rss_mib(operator.process.pid)
    finally:
        operator.stop()
    base = baseline(cluster, n, f"{ns}-baseline")
    for name in (ns, f"{ns}-baseline"):
        try:
            cluster.request("DELETE", f"/api/v1/namespaces/{name}")
        except Exception:  # noqa: BLE001
            pass
    return {
        "n": n,
        "apply_seconds": apply_seconds,
        "all_rayjobs_seconds": all_rayjobs,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "writes_per_job": writes / n,
        "operator_writes_per_job": op_writes / n,
        "peak_rss_mib": rss,
        "baseline_seconds": base,
        "ratio": all_rayjobs / base if base else float("nan"),
    }


def _operator_writes(operator: OperatorProcess) -> float:
    return sum(float(m) for m in re.findall(r"^tailor_api_writes_total\{[^}]*\} (\S+)$", operator.metrics(), re.M))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, action="append", help="number of FineTuneJobs (repeatable; default 500, 1000)")
    args = parser.parse_args()
    sizes = args.n or [500, 1000]
    from tailor_operator.cluster import new_api_client

    state = None
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        state = Path(tempfile.mkdtemp(prefix="tailor-bench-"))
        r = subprocess.run([str(REPO / "scripts" / "testenv"), "up", "--dir", str(state / "cp")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        kubeconfig = r.stdout.strip().split("=", 1)[1]
        os.environ["KUBECONFIG"] = kubeconfig
    workdir = Path(tempfile.mkdtemp(prefix="tailor-bench-work-"))
    try:
        api_client = new_api_client(pool_size=CLIENT_THREADS * 2)
        rows = [run_size(Path(kubeconfig), api_client, n, workdir) for n in sizes]
    finally:
        if state is not None:
            subprocess.run([str(REPO / "scripts" / "testenv"), "down", "--dir", str(state / "cp")],
                           capture_output=True)
            shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'N':>6} {'apply s':>8} {'all RayJobs s':>14} {'p50 s':>7} {'p99 s':>7} {'writes/job':>11} "
          f"{'(operator)':>10} {'peak RSS MiB':>13} {'baseline s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['n']:>6} {r['apply_seconds']:>8.1f} {r['all_rayjobs_seconds']:>14.1f} {r['p50']:>7.2f} "
              f"{r['p99']:>7.2f} {r['writes_per_job']:>11.2f} {r['operator_writes_per_job']:>10.2f} "
              f"{r['peak_rss_mib']:>13.0f} {r['baseline_seconds']:>11.1f} {r['ratio']:>6.1f}")
    print("\nbaseline = the same N RayJob creations straight through the API server "
          f"({CLIENT_THREADS} client threads); ratio = (time until every RayJob exists) / baseline")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
