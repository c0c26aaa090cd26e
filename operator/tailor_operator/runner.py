"""`tailor operator`: run the kopf operator with Tailor's handlers, metrics and liveness endpoint.

Settings that shape children come from `TAILOR_*` environment variables (one per
`OperatorSettings` field, e.g. TAILOR_TRAINER_IMAGE, TAILOR_TRAINER_IMAGE_PULL_POLICY=Always,
TAILOR_VALIDATION_CPU=250m, TAILOR_DATASET_BACKEND=local, TAILOR_LOCAL_MAX_CONCURRENT=2,
TAILOR_BACKOFF_BASE_SECONDS=10); process settings too:
TAILOR_WORKDIR (local runs), TAILOR_RESYNC_SECONDS (timer), TAILOR_WORKERS (reconcile threads),
TAILOR_STUCK_RECONCILE_SECONDS and TAILOR_WATCH_STALL_SECONDS (liveness bounds), and leader
election (tailor_operator.leader: TAILOR_LEADER_ELECTION, TAILOR_LEASE_*).
The Helm chart sets them from values.yaml.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

from tailor_operator.api.v1alpha1 import Backend
from tailor_operator.reconcile.settings import OperatorSettings

logger = logging.getLogger("tailor.operator")


def settings_from_env(env: Optional[dict[str, str]] = None) -> OperatorSettings:
    """OperatorSettings with every field overridable by TAILOR_<FIELD> (upper case)."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(OperatorSettings):
        raw = env.get(f"TAILOR_{f.name.upper()}")
        if raw is None or raw == "":
            continue
        default = f.default
        if isinstance(default, Backend):
            values[f.name] = Backend(raw)
        elif isinstance(default, bool):
            values[f.name] = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            values[f.name] = int(raw)
        elif isinstance(default, float):
            values[f.name] = float(raw)
        else:
            values[f.name] = raw
    return OperatorSettings(**values)


class Health:
    """What /healthz and /readyz answer. Live unless this replica acts (leader, or no election)
    and its reconcile workers are stuck, or its watch streams stopped delivering the Lease's
    renewals; a follower is live while its election loop keeps trying. Ready once the process
    is up, leader or not: a rolling update must not wait for a follower to lead."""

    def __init__(self, stuck: Callable[[float], Optional[str]], stuck_seconds: float = 600.0,
                 watch_stall_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stuck = stuck
        self.stuck_seconds = stuck_seconds
        self.watch_stall_seconds = watch_stall_seconds
        self.clock = clock
        self.elector: Any = None  # a LeaderElector when leader election is on
        self.acting = False
        self.heartbeats = False  # the Lease's renewals reach us through kopf's watches
        self.last_heartbeat = clock()

    def beat(self) -> None:
        self.last_heartbeat = self.clock()

    def start_acting(self) -> None:
        self.last_heartbeat = self.clock()
        self.acting = True

    def problem(self) -> Optional[str]:
        now = self.clock()
        if not self.acting:
            if self.elector is not None and now - self.elector.last_attempt > max(60.0, 10 * self.elector.config.retry_period):
                return f"leader election loop made no attempt for {now - self.elector.last_attempt:.0f}s"
            return None
        stuck = self.stuck(self.stuck_seconds)
        if stuck:
            return stuck
        if self.heartbeats and self.elector is not None and self.elector.is_leader:
            silent = now - self.last_heartbeat
            if silent > self.watch_stall_seconds:
                return f"no watch event for {silent:.0f}s although the Lease is renewed every {self.elector.config.retry_period:g}s"
        return None

    def serve(self, port: int) -> ThreadingHTTPServer:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/healthz"):
                    problem = health.problem()
                    code, text = (500, problem) if problem else (200, "ok")
                    if problem:
                        logger.error("liveness check failing: %s", problem)
                elif self.path.startswith("/readyz"):
                    code, text = 200, "ok"
                else:
                    code, text = 404, "not found"
                data = (text + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # probes every few seconds: no access log
                pass

        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="tailor-health", daemon=True).start()
        return server


def _default_workdir() -> Path:
    return Path(os.environ.get("TAILOR_WORKDIR") or Path.home() / ".cache" / "tailor" / "operator")


def run_operator(namespaces: list[str], all_namespaces: bool, metrics_port: int, health_port: int,
                 verbose: bool) -> None:
    """Run until SIGTERM/SIGINT. With no namespace and no --all-namespaces, watch $POD_NAMESPACE
    when set (the chart's default), else every namespace."""
    import kopf
    from prometheus_client import disable_created_metrics, start_http_server

    from tailor_operator.cluster import Cluster, new_api_client
    from tailor_operator.handlers import configure, register, register_lease_heartbeat
    from tailor_operator.handlers.context import Context
    from tailor_operator.leader import ClusterLeaseApi, LeaderElector, LeaseConfig
    from tailor_operator.metrics import Metrics

    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON)
    if not verbose:  # kopf logs every handler call per object at INFO: noise at scale
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    # kubelet probes hit /healthz every few seconds: one access-log line each drowns the log
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not namespaces and not all_namespaces:
        pod_namespace = os.environ.get("POD_NAMESPACE")
        namespaces = [pod_namespace] if pod_namespace else []
        all_namespaces = not namespaces
    disable_created_metrics()  # no *_created series: fewer samples per scrape
    settings = settings_from_env()
    workers = int(os.environ.get("TAILOR_WORKERS", "8"))
    metrics = Metrics()
    cluster = Cluster(new_api_client(pool_size=workers + 4), on_write=metrics.api_write, on_retry=metrics.api_retry)
    ctx = Context(settings=settings, cluster=cluster, metrics=metrics, workdir=_default_workdir(),
                  resync_seconds=float(os.environ.get("TAILOR_RESYNC_SECONDS", "60")), workers=workers,
                  instance=os.environ.get("POD_NAME") or socket.gethostname())
    registry = kopf.OperatorRegistry()
    register(registry, ctx)
    health = Health(ctx.queue.stuck, float(os.environ.get("TAILOR_STUCK_RECONCILE_SECONDS", "600")),
                    float(os.environ.get("TAILOR_WATCH_STALL_SECONDS", "60")))
    lease = LeaseConfig.from_env()
    if lease is not None and (all_namespaces or lease.namespace in namespaces):
        register_lease_heartbeat(registry, lease.namespace, lease.name, health.beat)
        health.heartbeats = True

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)  # in-cluster ServiceAccount or $KUBECONFIG, like Cluster

    @kopf.on.startup(registry=registry)
    def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, workers, clusterwide=all_namespaces)
        ctx.queue.start()
        health.start_acting()

    grace = float(os.environ.get("TAILOR_SHUTDOWN_GRACE_SECONDS", "20"))

    @kopf.on.cleanup(registry=registry)
    def _cleanup(**_: Any) -> None:
        ctx.queue.stop(wait=grace)

    start_http_server(metrics_port, registry=metrics.registry)
    health.serve(health_port)  # before the election: a follower is live and ready
    logger.info("tailor operator starting", extra={
        "namespaces": namespaces or "*", "metrics_port": metrics_port, "health_port": health_port,
        "leader_election": dataclasses.asdict(lease) if lease else False,
        "settings": dataclasses.asdict(settings)})
    stop = threading.Event()
    elector: Optional[LeaderElector] = None
    keeper_stop = threading.Event()
    keeper: Optional[threading.Thread] = None
    if lease is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):  # kopf installs its own once it runs
            signal.signal(sig, lambda *_: stop.set())
        # requests shorter than the renew deadline, so a hung one cannot outlive leadership
        lease_cluster = Cluster(new_api_client(pool_size=2), timeout=max(1.0, lease.renew_deadline / 3),
                                # a renewal that cannot finish inside the renew deadline is lost
                                # anyway: one short retry at most, never the default 30 s budget
                                max_tries=2, retry_budget=max(1.0, lease.renew_deadline / 3))
        elector = LeaderElector(ClusterLeaseApi(lease_cluster), lease)
        health.elector = elector
        metrics.leader.set(0)
        if not elector.acquire(stop):
            logger.info("stopped before becoming leader")
            return

        def lost(why: str) -> None:
            # Stop acting at once, like controller-runtime: a follower may take over when the
            # Lease expires, and a restarted container comes back as a follower.
            metrics.leader.set(0)
            logger.error("lost leadership (%s): exiting", why)
            ctx.queue.stop()
            logging.shutdown()
            os._exit(1)

        keeper = threading.Thread(target=elector.keep, args=(keeper_stop, lost), name="tailor-lease", daemon=True)
        keeper.start()
    metrics.leader.set(1)
    try:
        asyncio.run(_run_kopf(kopf, stop, registry=registry, clusterwide=all_namespaces, namespaces=namespaces))
    finally:
        # Never two actors: the Lease goes back only after kopf and the workers have stopped.
        drained = ctx.queue.stop(wait=grace)
        metrics.leader.set(0)
        if elector is not None:
            keeper_stop.set()
            if keeper is not None:
                keeper.join(lease.renew_deadline)  # no renewal in flight may land after the release
            if drained:
                elector.release()
            else:  # a reconcile outlived the grace: it dies with the process; the Lease just expires
                logger.warning("reconciles still running after %ss: lease left to expire", grace)


async def _run_kopf(kopf: Any, stop: threading.Event, **kwargs: Any) -> None:
    """kopf.operator until SIGTERM/SIGINT (kopf's own handlers), or a signal that came while we
    waited for the Lease (`stop`). An asyncio flag, not the threading.Event itself: kopf waits for
    a threading.Event in an executor thread, which would block asyncio.run's exit forever."""
    flag = asyncio.Event()
    if stop.is_set():
        flag.set()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # until kopf installs its own handlers
        signal.signal(sig, lambda *_: loop.call_soon_threadsafe(flag.set))
    await kopf.operator(standalone=True, stop_flag=flag, **kwargs)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m tailor_operator.runner` (the same as `tailor operator`)."""
    parser = argparse.ArgumentParser(prog="python -m tailor_operator.runner", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--namespace", action="append", default=[], help="namespace to watch (repeatable)")
    parser.add_argument("-A", "--all-namespaces", action="store_true")
    parser.add_argument("--metrics-port", type=int, default=8080)
    parser.add_argument("--health-port", type=int, default=8081)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    run_operator(args.namespace, args.all_namespaces, args.metrics_port, args.health_port, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
