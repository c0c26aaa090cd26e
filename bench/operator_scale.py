#!/usr/bin/env python3
"""Scale benchmark: how the operator keeps up with FineTuneJobs (kuberay backend) on the test control plane.

    python bench/operator_scale.py -n 1000 --repeat 3     # bulk: 1,000 jobs applied at once, 3 times
    python bench/operator_scale.py --rate 5 --duration 60 # steady arrival: 5 jobs/s for 60 s
    python bench/operator_scale.py -n 1000 --rate 5       # both
    KUBECONFIG=... python bench/operator_scale.py ...     # an existing (test) cluster

No kubelet and no KubeRay: RayJobs are only created, never run, so every figure is about the
operator's path from a FineTuneJob to its RayJob, and the jobs stay `Queued`.

Bulk mode (`-n N`), per repeat:
- raw: the same N RayJobs (as the operator builds them) created straight through the API server by
  `--workers` client threads, the operator's number of workers, each asking for only the metadata
  back as the operator does, timed like the operator's side until the last RayJob is seen by the
  same metadata-only watch; its jobs/s is the reference;
- operator: N FineTuneJobs applied by 8 client threads while the operator runs; its jobs/s is N over
  the time from the first apply until the last RayJob appears (seen by a metadata-only watch), and
  it is reported as a fraction of the raw rate of the same repeat (1.0 = as fast as creating the
  RayJobs directly; below 1 is slower).
- latency of each job: from the moment its create request is sent until its RayJob is seen.
Steady mode (`--rate R`): one FineTuneJob every 1/R s for `--duration` s; latency as above.

Both modes count the API writes made while the jobs go from applied to Queued and then sit there
for `--settle` seconds (longer than the operator's 30 s poll, so re-checks are included):
`apiserver_request_total` of write verbs, minus the benchmark's own FineTuneJob creates and
minus `leases` (the control plane's own heartbeats; the operator holds no Lease here), per job
and broken down by verb and resource; and, as a cross-check, the operator's own
`tailor_api_writes_total`. Duplicates are checked by listing: exactly one RayJob per job.
With `--repeat K` every figure is the median of K repeats with its min–max. Timing figures are
informational; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer"), str(REPO / "tests" / "integration")]

from operator_fixtures import OperatorProcess, dataset_manifest, job_manifest, ready_result, wait_until  # noqa: E402

APPLY_THREADS = 8
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY"}
NOT_OURS = {"leases"}
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"  # kube-apiserver and kube-controller-manager heartbeats
OPERATOR_ENV = {"TAILOR_RESYNC_SECONDS": "600", "TAILOR_ACTIVE_POLL_SECONDS": "30"}


# ------------------------------------------------------------------------------- measuring

def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def apiserver_writes(cluster) -> Counter:
    """apiserver_request_total of write verbs, by (verb, resource[/subresource]), all clients."""
    params = cluster.api.param_serialize(method="GET", resource_path="/metrics",
                                         header_params={"Accept": "text/plain"}, auth_settings=["BearerToken"])
    text = cluster.api.call_api(*params, _request_timeout=60).read().decode()
    counts: Counter = Counter()
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if labels.get("verb") in WRITE_VERBS:
            resource = labels.get("resource", "?") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[(labels["verb"], resource)] += float(line.rsplit(" ", 1)[1])
    return counts


def operator_counter(operator: OperatorProcess, name: str) -> Counter:
    """A labelled counter of the operator's /metrics, by its label values."""
    counts: Counter = Counter()
    for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", operator.metrics(), re.M):
        counts[tuple(re.findall(r'="([^"]*)"', labels))] += float(value)
    return counts


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def control_plane_cpu() -> dict[str, float]:
    """CPU seconds so far of the local kube-apiserver and etcd (empty for a remote cluster)."""
    out = {}
    for name, pattern in (("apiserver", "kube-apiserver"), ("etcd", "etcd ")):
        pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        if pids:
            out[name] = sum(cpu_seconds(int(p)) for p in pids)
    return out


def cpu_ms_per_job(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {k: 1000 * (after[k] - before[k]) / n for k in after if k in before}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RayJobWatch:
    """When each RayJob of a namespace first appears, from a metadata-only watch (the server sends
    PartialObjectMetadata: decoding whole RayJobs would make the watcher, not the operator, late)."""

    def __init__(self, api_client, namespace: str) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        self.seen: dict[str, float] = {}
        self.ready = threading.Event()
        self._stop = threading.Event()
        path = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
        accept = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"

        def run() -> None:
            version = None
            while not self._stop.is_set():
                query = {"watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": "60"}
                if version:
                    query["resourceVersion"] = version
                try:
                    params = api_client.param_serialize(method="GET", resource_path=f"{path}?{urlencode(query)}",
                                                        header_params={"Accept": accept},
                                                        auth_settings=["BearerToken"])
                    response = api_client.call_api(*params, _request_timeout=(10, 90))  # not read: streamed
                    self.ready.set()
                    for line in iter_resp_lines(response.response):
                        now = time.monotonic()
                        event = json.loads(line)
                        meta = (event.get("object") or {}).get("metadata") or {}
                        if event.get("type") == "ERROR":
                            version = None  # expired: start over (ADDED again for what exists)
                            break
                        version = meta.get("resourceVersion") or version
                        if event.get("type") in ("ADDED", "MODIFIED") and meta.get("name"):
                            self.seen.setdefault(meta["name"], now)
                        if self._stop.is_set():
                            return
                except Exception:  # noqa: BLE001 - reconnect
                    time.sleep(0.2)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("RayJob watch did not start")

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------------- helpers

def create_namespace(cluster, name: str) -> None:
    cluster.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": name}})
    # the control plane's own writes for a new namespace (ServiceAccount, root CA ConfigMap) first
    wait_until(lambda: cluster.get("ConfigMap", name, "kube-root-ca.crt"), 30, what="namespace set up")


def delete_namespace(cluster, name: str, wait: float = 120) -> bool:
    """Delete and wait until it is gone, so the next measurement does not share the API server with
    the namespace controller (nor count its writes). FineTuneJobs and Datasets still holding a
    finalizer after 20 s (an operator version that put kopf's on every object, stopped by now) are
    released by hand.
    False when it is still there after `wait`."""
    try:
        cluster.request("DELETE", f"/api/v1/namespaces/{name}")
    except Exception:  # noqa: BLE001
        return True
    started = time.monotonic()
    released = False
    while time.monotonic() - started < wait:
        try:
            cluster.request("GET", f"/api/v1/namespaces/{name}")
        except Exception:  # noqa: BLE001 - 404: gone
            return True
        if not released and time.monotonic() - started > 20:
            for kind in ("FineTuneJob", "Dataset"):
                for obj in cluster.list(kind, name):
                    if obj["metadata"].get("finalizers"):
                        cluster.merge_patch(kind, name, obj["metadata"]["name"], {"metadata": {"finalizers": None}})
            released = True
        time.sleep(1)
    return False


def quiesce(cluster, wait: float = 300) -> None:
    """Before a measurement: no namespace is being deleted (the namespace controller's writes
    would be counted, and its work competes for the API server)."""
    def quiet() -> bool:
        items = cluster.request("GET", "/api/v1/namespaces")["items"]
        return not [n for n in items if n["status"].get("phase") == "Terminating"]

    wait_until(quiet, wait, interval=2, what="no namespace terminating")


def first_runs(n: int, namespace: str) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """What the operator writes for N new jobs, from the pure reconcile: each job's status and its
    first run's children (NetworkPolicy, RayJob; ownerReferences dropped: no owner to point at)."""
    from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob
    from tailor_operator.reconcile import JobObserved, OperatorSettings, reconcile_finetunejob
    from tailor_operator.reconcile.plan import StartRun
    from tailor_operator.reconcile.status import status_body

    ds = Dataset.model_validate({**dataset_manifest(), "metadata": {"name": "tickets", "namespace": namespace},
                                 "status": {"revision": ready_result()["revision"], "rows": 1000,
                                            "conditions": [{"type": "Ready", "status": "True", "reason": "Validated",
                                                            "message": "ok",
                                                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    settings = OperatorSettings(model_preflight=False)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    out = []
    for i in range(n):
        name = f"job-{i:05d}"
        job = FineTuneJob.model_validate({**job_manifest(name), "metadata": {
            "name": name, "namespace": namespace, "uid": f"00000000-0000-0000-0000-{i:012d}", "generation": 1}})
        plan = reconcile_finetunejob(job, JobObserved(dataset=ds), settings, now)
        start = next(a for a in plan.actions if isinstance(a, StartRun))
        for child in start.children:
            child["metadata"].pop("ownerReferences", None)
        out.append((status_body(plan.status), list(start.children)))
    return out


def rayjob_bodies(n: int, namespace: str) -> list[dict[str, Any]]:
    """The RayJobs the operator would create for N jobs (first_runs)."""
    return [next(c for c in children if c["kind"] == "RayJob") for _, children in first_runs(n, namespace)]


def raw_create(cluster, n: int, namespace: str, workers: int) -> tuple[float, dict[str, float]]:
    """Seconds to create the N RayJobs straight through the API server with `workers` threads,
    asking, as the operator does, for only the metadata back: from the first create until the last
    RayJob is seen by the same metadata-only watch that times the operator (both sides are
    observed, and pay for the observer, alike), and the control plane's CPU per job meanwhile."""
    quiesce(cluster)
    create_namespace(cluster, namespace)
    bodies = rayjob_bodies(n, namespace)
    watch = RayJobWatch(cluster.api, namespace)
    path = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
    headers = {"Content-Type": "application/json", "Accept": METADATA_ONLY}

    def create(body: dict[str, Any]) -> None:
        params = cluster.api.param_serialize(method="POST", resource_path=path, header_params=headers, body=body,
                                             auth_settings=["BearerToken"])
        response = cluster.api.call_api(*params, _request_timeout=60)
        response.read()
        if response.status != 201:
            raise RuntimeError(f"create {body['metadata']['name']}: HTTP {response.status}")

    try:
        cpu_before = control_plane_cpu()
        started = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(create, bodies))
        wait_until(lambda: len(watch.seen) >= n, 120, interval=0.05, what=f"{n} raw RayJobs seen")
        return max(watch.seen.values()) - started, cpu_ms_per_job(cpu_before, control_plane_cpu(), n)
    finally:
        watch.stop()


class OperatorRun:
    """A namespace with a Ready Dataset and the operator watching it; apply jobs, then measure."""

    def __init__(self, kubeconfig: Path, api_client, workdir: Path, namespace: str, workers: int) -> None:
        from tailor_operator.cluster import Cluster

        self.cluster = Cluster(api_client)
        self.api_client = api_client
        self.ns = namespace
        quiesce(self.cluster)
        create_namespace(self.cluster, namespace)
        self.cluster.create({**dataset_manifest(), "metadata": {"name": "tickets", "namespace": namespace}})
        self.operator = OperatorProcess(kubeconfig, workdir / namespace, namespaces=[namespace],
                                        env={**OPERATOR_ENV, "TAILOR_WORKERS": str(workers)}).start()
        try:
            self._prepare(namespace, api_client)
        except BaseException:
            self.operator.stop()
            raise

    def _prepare(self, namespace: str, api_client) -> None:
        cm = wait_until(lambda: next(iter(self.cluster.list("ConfigMap", namespace, {"tailor.dev/dataset": "tickets"})),
                                     None), 60, what="validation ConfigMap")
        self.cluster.merge_patch("ConfigMap", namespace, cm["metadata"]["name"],
                                 {"data": {"status.json": json.dumps(ready_result())}})
        wait_until(self._dataset_ready, 60, what="Dataset Ready")
        time.sleep(2)  # the Dataset's status write and its echo are done
        self.created: dict[str, float] = {}
        self._lock = threading.Lock()
        self.writes_before = apiserver_writes(self.cluster)
        self.ops_before = operator_counter(self.operator, "tailor_api_writes_total")
        self.reconciles_before = self._reconciles()
        self.watch = RayJobWatch(api_client, namespace)

    def _dataset_ready(self) -> bool:
        status = (self.cluster.get("Dataset", self.ns, "tickets") or {}).get("status") or {}
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))

    def _reconciles(self) -> float:
        counts = operator_counter(self.operator, "tailor_reconcile_duration_seconds_count")
        return counts.get(("FineTuneJob",), 0.0)

    def apply(self, i: int) -> None:
        name = f"job-{i:05d}"
        sent = time.monotonic()
        self.cluster.create({**job_manifest(name), "metadata": {"name": name, "namespace": self.ns}})
        with self._lock:
            self.created[f"{name}-r1"] = sent

    def wait_for_rayjobs(self, n: int) -> None:
        wait_until(lambda: len(self.watch.seen) >= n, 1800, interval=0.2, what=f"{n} RayJobs",
                   on_timeout=lambda: f"{len(self.watch.seen)} seen\n{self.operator.log_tail(20)}")

    def finish(self, n: int, settle: float) -> dict[str, Any]:
        """After every RayJob is there: let the jobs sit Queued for `settle` s, then count."""
        self.watch.stop()
        latencies = [self.watch.seen[r] - self.created[r] for r in self.created]

        def queued() -> bool:
            items = self.cluster.list("FineTuneJob", self.ns)
            return len(items) == n and all((i.get("status") or {}).get("phase") == "Queued" for i in items)

        wait_until(queued, 600, interval=2, what="all jobs Queued")
        time.sleep(settle)
        writes = apiserver_writes(self.cluster) - self.writes_before
        writes[("POST", "finetunejobs")] -= n  # the benchmark's own creates
        ops = operator_counter(self.operator, "tailor_api_writes_total") - self.ops_before
        reconciles = self._reconciles() - self.reconciles_before
        rss = peak_rss_mib(self.operator.process.pid)
        rayjobs = self.cluster.list("RayJob", self.ns)
        jobs = {(r["metadata"].get("labels") or {}).get("tailor.dev/finetunejob") for r in rayjobs} - {None}
        duplicates = len(rayjobs) - len(jobs)  # RayJobs beyond one per job
        missing = n - len(jobs)
        ours = {k: v for k, v in writes.items() if k[1] not in NOT_OURS and v}
        return {
            "latencies": latencies,
            "writes_per_job": sum(ours.values()) / n,
            "writes_breakdown": {f"{verb} {res}": v / n for (verb, res), v in sorted(ours.items())},
            "not_counted": {f"{verb} {res}": v for (verb, res), v in writes.items() if res in NOT_OURS and v},
            "operator_writes_per_job": sum(ops.values()) / n,
            "reconciles_per_job": reconciles / n,
            "rayjobs": len(rayjobs),
            "duplicates": duplicates,
            "missing": missing,
            "peak_rss_mib": rss,
        }

    def close(self) -> None:
        self.watch.stop()
        self.operator.stop()


def bulk(kubeconfig: Path, api_client, n: int, workers: int, settle: float, workdir: Path, tag: str) -> dict[str, Any]:
    from tailor_operator.cluster import Cluster

    cluster = Cluster(api_client)
    raw_ns = f"raw-{tag}"
    raw_seconds, raw_cpu = raw_create(cluster, n, raw_ns, workers)
    gone = delete_namespace(cluster, raw_ns)
    run = OperatorRun(kubeconfig, api_client, workdir, f"op-{tag}", workers)
    try:
        cpu_before = {**control_plane_cpu(), "operator": cpu_seconds(run.operator.process.pid)}
        t0 = time.monotonic()
        with ThreadPoolExecutor(APPLY_THREADS) as pool:
            list(pool.map(run.apply, range(n)))
        apply_seconds = time.monotonic() - t0
        run.wait_for_rayjobs(n)
        operator_seconds = max(run.watch.seen.values()) - t0
        op_cpu = cpu_ms_per_job(cpu_before, {**control_plane_cpu(), "operator": cpu_seconds(run.operator.process.pid)}, n)
        result = run.finish(n, settle)
    finally:
        run.close()
    gone = delete_namespace(cluster, run.ns) and gone
    lat = result.pop("latencies")
    raw_rate, op_rate = n / raw_seconds, n / operator_seconds
    return {"mode": "bulk", "n": n, "apply_seconds": apply_seconds, "operator_seconds": operator_seconds,
            "operator_jobs_per_s": op_rate, "raw_seconds": raw_seconds, "raw_jobs_per_s": raw_rate,
            "fraction_of_raw": op_rate / raw_rate, "p50": percentile(lat, 50), "p90": percentile(lat, 90),
            "p99": percentile(lat, 99), "max": max(lat), "namespaces_deleted": gone,
            **{f"raw_cpu_ms_{k}": v for k, v in raw_cpu.items()}, **{f"op_cpu_ms_{k}": v for k, v in op_cpu.items()},
            **result}


def steady(kubeconfig: Path, api_client, rate: float, duration: float, workers: int, settle: float,
           workdir: Path, tag: str) -> dict[str, Any]:
    from tailor_operator.cluster import Cluster

    n = int(rate * duration)
    run = OperatorRun(kubeconfig, api_client, workdir, f"steady-{tag}", workers)
    try:
        t0 = time.monotonic()
        late = 0.0
        # a few threads, so one slow create does not hold back the next arrivals
        with ThreadPoolExecutor(APPLY_THREADS) as pool:
            for i in range(n):
                due = t0 + i / rate
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                else:
                    late = max(late, -wait)
                pool.submit(run.apply, i)
        run.wait_for_rayjobs(n)
        result = run.finish(n, settle)
    finally:
        run.close()
    gone = delete_namespace(Cluster(api_client), run.ns)
    lat = result.pop("latencies")
    return {"mode": "steady", "rate": rate, "duration": duration, "n": n, "arrivals_late_max_s": late,
            "p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99), "max": max(lat),
            "namespaces_deleted": gone, **result}


# --------------------------------------------------------------------------------- report

def summary(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows]
    med = statistics.median(values)
    fmt = (lambda v: f"{v:.2f}") if med < 100 else (lambda v: f"{v:.0f}")
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


def report(rows: list[dict[str, Any]]) -> None:
    bulk_rows = [r for r in rows if r["mode"] == "bulk"]
    steady_rows = [r for r in rows if r["mode"] == "steady"]
    for n in sorted({r["n"] for r in bulk_rows}):
        group = [r for r in bulk_rows if r["n"] == n]
        print(f"\nbulk: N={n} FineTuneJobs, {len(group)} repeat(s); median (min–max)")
        print(f"  raw create (RayJobs straight, {group[0]['workers']} threads) jobs/s  {summary(group, 'raw_jobs_per_s')}")
        print(f"  operator (FineTuneJob -> RayJob)         jobs/s  {summary(group, 'operator_jobs_per_s')}"
              f"   [apply took {summary(group, 'apply_seconds')} s, last RayJob after "
              f"{summary(group, 'operator_seconds')} s]")
        print(f"  operator rate as a fraction of raw               {summary(group, 'fraction_of_raw')}"
              "   (1.0 = as fast as creating the RayJobs directly)")
        _common(group)
    if steady_rows:
        group = steady_rows
        r0 = group[0]
        print(f"\nsteady: {r0['rate']:g} jobs/s for {r0['duration']:g} s ({r0['n']} jobs), {len(group)} repeat(s); "
              f"median (min–max); latest arrival behind schedule {max(r['arrivals_late_max_s'] for r in group):.2f} s")
        _common(group)


def _common(group: list[dict[str, Any]]) -> None:
    print(f"  latency apply -> RayJob s   p50 {summary(group, 'p50')}  p90 {summary(group, 'p90')}  "
          f"p99 {summary(group, 'p99')}  max {summary(group, 'max')}")
    print(f"  API writes per job (apiserver, minus the bench's creates and leases)  {summary(group, 'writes_per_job')}"
          f"   operator's own count {summary(group, 'operator_writes_per_job')}")
    keys = sorted({k for r in group for k in r["writes_breakdown"]})
    for k in keys:
        values = [r["writes_breakdown"].get(k, 0.0) for r in group]
        print(f"      {k:<40} {statistics.median(values):.2f}")
    not_counted = Counter()
    for r in group:
        not_counted.update(r["not_counted"])
    if not_counted:
        print("      not counted (control plane heartbeats): "
              + ", ".join(f"{k} {v / len(group):.0f}" for k, v in sorted(not_counted.items())))
    if "raw_cpu_ms_apiserver" in group[0] and "op_cpu_ms_apiserver" in group[0]:
        print(f"  CPU ms per job, raw: apiserver {summary(group, 'raw_cpu_ms_apiserver')}, etcd "
              f"{summary(group, 'raw_cpu_ms_etcd')}; operator path: apiserver {summary(group, 'op_cpu_ms_apiserver')}, "
              f"etcd {summary(group, 'op_cpu_ms_etcd')}, operator {summary(group, 'op_cpu_ms_operator')}")
    print(f"  FineTuneJob reconciles per job {summary(group, 'reconciles_per_job')}   "
          f"operator peak RSS MiB {summary(group, 'peak_rss_mib')}")
    dup = sum(r["duplicates"] for r in group)
    missing = sum(r["missing"] for r in group)
    print(f"  RayJobs listed: {[r['rayjobs'] for r in group]} for {group[0]['n']} jobs each; "
          f"duplicates {dup}, jobs without a RayJob {missing}")


@contextlib.contextmanager
def test_control_plane() -> Iterator[Path]:
    """$KUBECONFIG's cluster, or a `scripts/testenv up` control plane started (and stopped after)."""
    if os.environ.get("KUBECONFIG"):
        yield Path(os.environ["KUBECONFIG"])
        return
    state = Path(tempfile.mkdtemp(prefix="tailor-bench-"))
    try:
        r = subprocess.run([str(REPO / "scripts" / "testenv"), "up", "--dir", str(state / "cp")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"scripts/testenv up failed:\n{r.stderr}")
        os.environ["KUBECONFIG"] = r.stdout.strip().split("=", 1)[1]
        yield Path(os.environ["KUBECONFIG"])
    finally:
        os.environ.pop("KUBECONFIG", None)
        subprocess.run([str(REPO / "scripts" / "testenv"), "down", "--dir", str(state / "cp")], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, action="append", help="bulk mode: number of FineTuneJobs (repeatable)")
    parser.add_argument("--rate", type=float, help="steady mode: FineTuneJobs per second")
    parser.add_argument("--duration", type=float, default=60.0, help="steady mode: seconds of arrivals (60)")
    parser.add_argument("--repeat", type=int, default=1, help="repeats of every measurement (median, min–max)")
    parser.add_argument("--workers", type=int, default=16,
                        help="operator worker threads (TAILOR_WORKERS) and raw-create client threads (16)")
    parser.add_argument("--settle", type=float, default=35.0,
                        help="seconds the jobs sit Queued before writes are counted (35: past the 30 s poll)")
    parser.add_argument("--json", type=Path, help="also write every repeat's figures here")
    args = parser.parse_args()
    sizes = args.n or ([] if args.rate else [1000])
    from tailor_operator.cluster import new_api_client

    workdir = Path(tempfile.mkdtemp(prefix="tailor-bench-work-"))
    rows: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        with test_control_plane() as kubeconfig:
            api_client = new_api_client(pool_size=max(args.workers, APPLY_THREADS) * 2)
            stamp = int(time.time()) % 100000
            for k in range(args.repeat):
                for n in sizes:
                    row = bulk(kubeconfig, api_client, n, args.workers, args.settle, workdir, f"{n}-{stamp}-{k}")
                    rows.append({**row, "repeat": k, "workers": args.workers})
                    print(f"[repeat {k + 1}] bulk N={n}: operator {row['operator_jobs_per_s']:.1f} jobs/s, raw "
                          f"{row['raw_jobs_per_s']:.1f} jobs/s ({row['fraction_of_raw']:.2f} of raw), "
                          f"p99 {row['p99']:.2f} s, {row['writes_per_job']:.2f} writes/job", flush=True)
                if args.rate:
                    row = steady(kubeconfig, api_client, args.rate, args.duration, args.workers, args.settle,
                                 workdir, f"{stamp}-{k}")
                    rows.append({**row, "repeat": k, "workers": args.workers})
                    print(f"[repeat {k + 1}] steady {args.rate:g}/s: p50 {row['p50']:.2f} s, p99 {row['p99']:.2f} s, "
                          f"{row['writes_per_job']:.2f} writes/job", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()
    print(f"\noperator: {args.workers} workers, resync 600 s, poll 30 s, model preflight off; "
          f"{os.cpu_count()} CPUs shared with the control plane; load average at the end "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    report(rows)
    if args.json:
        args.json.write_text(json.dumps({"started": started, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                       for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
