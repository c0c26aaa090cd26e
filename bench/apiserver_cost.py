#!/usr/bin/env python3
"""What each write on a FineTuneJob's way to its RayJob costs the API server, in CPU.

    python bench/apiserver_cost.py --repeat 3          # starts a `scripts/testenv up` control plane
    KUBECONFIG=... python bench/apiserver_cost.py       # an existing (test) control plane on this host

For each write the operator path makes — the user's FineTuneJob create, the operator's status PUT,
its NetworkPolicy POST and its RayJob POST (the raw baseline of bench/operator_scale.py makes only
the last) — N objects are written by 16 client threads while the CPU time of the local
kube-apiserver and etcd processes is read from /proc before and after: milliseconds of CPU per
object, median (min–max) of the repeats. The sum over the path against the RayJob alone bounds
what fraction of the raw create rate any operator can reach when the API server is the busy
party (as on a 2-CPU machine that also runs the control plane), whatever the operator itself
costs. The status and the children are what the operator's pure reconcile plans for a new job
(bench/operator_scale.py `first_runs`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer"), str(REPO / "tests" / "integration"), str(REPO / "bench")]

import operator_scale as scale  # noqa: E402
from operator_fixtures import dataset_manifest, job_manifest  # noqa: E402

PROCESSES = ("apiserver", "etcd")


def measure(fn, items: list, threads: int) -> dict[str, float]:
    before, t0 = scale.control_plane_cpu(), time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, items))
    wall, after = time.monotonic() - t0, scale.control_plane_cpu()
    return {"per_s": len(items) / wall, **{k: 1000 * (after[k] - before[k]) / len(items) for k in PROCESSES}}


def one_round(cluster, n: int, threads: int, tag: str) -> dict[str, dict[str, float]]:
    from tailor_operator.cluster import METADATA_ONLY

    ns = f"cost-{tag}"
    scale.quiesce(cluster)
    scale.create_namespace(cluster, ns)
    cluster.create({**dataset_manifest(), "metadata": {"name": "tickets", "namespace": ns}})
    rows: dict[str, dict[str, float]] = {}
    try:
        runs = scale.first_runs(n, ns)
        rows["RayJob POST (metadata answer)"] = measure(
            lambda b: cluster.create(b, metadata_only=True),
            [next(c for c in children if c["kind"] == "RayJob") for _, children in runs], threads)
        jobs = [{**job_manifest(f"job-{i:05d}"), "metadata": {"name": f"job-{i:05d}", "namespace": ns}}
                for i in range(n)]
        created: dict[str, dict] = {}
        rows["FineTuneJob POST (the user's apply)"] = measure(
            lambda b: created.__setitem__(b["metadata"]["name"], cluster.create(b)), jobs, threads)
        statuses = {f"job-{i:05d}": status for i, (status, _) in enumerate(runs)}

        def put_status(name: str) -> None:
            cluster.request("PUT", f"/apis/tailor.dev/v1alpha1/namespaces/{ns}/finetunejobs/{name}/status",
                            body={**created[name], "status": statuses[name]}, accept=METADATA_ONLY)
        rows["FineTuneJob status PUT"] = measure(put_status, list(created), threads)
        rows["NetworkPolicy POST (metadata answer)"] = measure(
            lambda b: cluster.create(b, metadata_only=True),
            [c for _, children in runs for c in children if c["kind"] == "NetworkPolicy"], threads)
    finally:
        scale.delete_namespace(cluster, ns)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="objects per write type (1000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    from tailor_operator.cluster import Cluster, new_api_client

    with scale.test_control_plane():
        cluster = Cluster(new_api_client(pool_size=args.threads * 2))
        stamp = int(time.time()) % 100000
        rounds = [one_round(cluster, args.n, args.threads, f"{stamp}-{k}") for k in range(args.repeat)]

    def fig(label: str, key: str) -> str:
        values = [r[label][key] for r in rounds]
        return f"{statistics.median(values):6.2f} ({min(values):.2f}–{max(values):.2f})"

    print(f"\nN={args.n} per write type, {args.threads} threads, {args.repeat} repeat(s); median (min–max); "
          f"{os.cpu_count()} CPUs shared by the API server, etcd and this client")
    print(f"  {'write':40s} {'objects/s':>20s} {'apiserver ms CPU/object':>26s} {'etcd ms/object':>22s}")
    for label in rounds[0]:
        print(f"  {label:40s} {fig(label, 'per_s'):>20s} {fig(label, 'apiserver'):>26s} {fig(label, 'etcd'):>22s}")
    cost = {label: statistics.median(r[label]["apiserver"] + r[label]["etcd"] for r in rounds) for label in rounds[0]}
    raw = cost["RayJob POST (metadata answer)"]
    path = sum(cost.values())
    print(f"\n  API server + etcd CPU per job: raw (the RayJob alone) {raw:.2f} ms, FineTuneJob -> RayJob path "
          f"(the four writes) {path:.2f} ms.\n  Where the API server is the busy party, an operator that cost no "
          f"CPU at all would reach at most {raw / path:.2f} of the raw rate (watch events to the operator, "
          f"its reads and its own CPU come on top).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
