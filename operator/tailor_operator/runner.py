"""`tailor operator`: run the kopf operator with Tailor's handlers, metrics and liveness endpoint.

Settings that shape children come from `TAILOR_*` environment variables (one per
`OperatorSettings` field, e.g. TAILOR_TRAINER_IMAGE, TAILOR_TRAINER_IMAGE_PULL_POLICY=Always,
TAILOR_VALIDATION_CPU=250m, TAILOR_DATASET_BACKEND=local, TAILOR_LOCAL_MAX_CONCURRENT=2,
TAILOR_BACKOFF_BASE_SECONDS=10); process settings too:
TAILOR_WORKDIR (local runs), TAILOR_RESYNC_SECONDS (timer), TAILOR_WORKERS (reconcile threads).
The Helm chart sets them from values.yaml.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

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


def _default_workdir() -> Path:
    return Path(os.environ.get("TAILOR_WORKDIR") or Path.home() / ".cache" / "tailor" / "operator")


def run_operator(namespaces: list[str], all_namespaces: bool, metrics_port: int, health_port: int,
                 verbose: bool) -> None:
    """Run until SIGTERM/SIGINT. With no namespace and no --all-namespaces, watch $POD_NAMESPACE
    when set (the chart's default), else every namespace."""
    import kopf
    from prometheus_client import disable_created_metrics, start_http_server

    from tailor_operator.cluster import Cluster, new_api_client
    from tailor_operator.handlers import configure, register
    from tailor_operator.handlers.context import Context
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
    cluster = Cluster(new_api_client(pool_size=workers + 4), on_write=metrics.api_write)
    ctx = Context(settings=settings, cluster=cluster, metrics=metrics, workdir=_default_workdir(),
                  resync_seconds=float(os.environ.get("TAILOR_RESYNC_SECONDS", "60")), workers=workers,
                  instance=os.environ.get("POD_NAME") or socket.gethostname())
    registry = kopf.OperatorRegistry()
    register(registry, ctx)

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)  # in-cluster ServiceAccount or $KUBECONFIG, like Cluster

    @kopf.on.startup(registry=registry)
    def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, workers, clusterwide=all_namespaces)
        ctx.queue.start()

    @kopf.on.cleanup(registry=registry)
    def _cleanup(**_: Any) -> None:
        ctx.queue.stop()

    start_http_server(metrics_port, registry=metrics.registry)
    logger.info("tailor operator starting", extra={
        "namespaces": namespaces or "*", "metrics_port": metrics_port, "health_port": health_port,
        "settings": dataclasses.asdict(settings)})
    asyncio.run(kopf.operator(
        registry=registry,
        clusterwide=all_namespaces,
        namespaces=namespaces,
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
    ))


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
