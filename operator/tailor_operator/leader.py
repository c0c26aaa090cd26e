"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go's leaderelection does it.

Only the holder of the Lease runs kopf and the reconcile workers; the other replicas wait. Every
write is a PUT with the Lease's resourceVersion, so two candidates never both win: the loser gets
409 Conflict. A candidate judges expiry by its own clock, from the moment it *observed* the
record change (never by comparing the holder's renewTime with its own clock), so clock skew
between nodes cannot make it take over early. The leader gives up (and the runner exits) when it
has not renewed for `renew_deadline` < `lease_duration`: it has stopped acting before any
follower may consider the Lease expired.

Pure apart from the injected `LeaseApi` and clock, so the unit tests drive it with fakes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Protocol

from tailor_operator.cluster import Conflict

logger = logging.getLogger("tailor.leader")

LEASE_LABELS = {"app.kubernetes.io/managed-by": "tailor", "app.kubernetes.io/component": "operator"}


@dataclass(frozen=True)
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs 0 < retryPeriod < renewDeadline < leaseDuration "
                             f"(got {self.retry_period}, {self.renew_deadline}, {self.lease_duration})")

    @classmethod
    def from_env(cls, env: Optional[dict[str, str]] = None) -> Optional["LeaseConfig"]:
        """None unless TAILOR_LEADER_ELECTION is true. The identity is POD_NAME (else the host
        name) plus a random suffix, like controller-runtime: a restarted container is a new
        candidate and waits for the old holder's Lease to expire instead of resuming it."""
        env = dict(os.environ if env is None else env)
        if env.get("TAILOR_LEADER_ELECTION", "false").lower() not in ("1", "true", "yes"):
            return None
        namespace = env.get("TAILOR_LEASE_NAMESPACE") or env.get("POD_NAMESPACE") or "default"
        pod = env.get("POD_NAME") or socket.gethostname()
        return cls(name=env.get("TAILOR_LEASE_NAME") or "tailor-operator", namespace=namespace,
                   identity=f"{pod}_{uuid.uuid4().hex[:8]}",
                   lease_duration=float(env.get("TAILOR_LEASE_DURATION_SECONDS") or 15),
                   renew_deadline=float(env.get("TAILOR_LEASE_RENEW_DEADLINE_SECONDS") or 10),
                   retry_period=float(env.get("TAILOR_LEASE_RETRY_PERIOD_SECONDS") or 2))


class LeaseApi(Protocol):
    def get(self, namespace: str, name: str) -> Optional[dict[str, Any]]: ...
    def create(self, obj: dict[str, Any]) -> dict[str, Any]: ...  # Conflict when it exists
    def replace(self, obj: dict[str, Any]) -> dict[str, Any]: ...  # Conflict on a stale resourceVersion


class ClusterLeaseApi:
    """LeaseApi over tailor_operator.cluster (give it a Cluster with a short request timeout)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def get(self, namespace: str, name: str) -> Optional[dict[str, Any]]:
        return self.cluster.get("Lease", namespace, name)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.cluster.request("POST", f"/apis/coordination.k8s.io/v1/namespaces/{obj['metadata']['namespace']}"
                                    "/leases", body=obj)

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.cluster.request("PUT", f"/apis/coordination.k8s.io/v1/namespaces/{meta['namespace']}"
                                    f"/leases/{meta['name']}", body=obj)


def micro_time(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, api: LeaseApi, config: LeaseConfig, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.api = api
        self.config = config
        self.clock = clock
        self.wall = wall
        self.is_leader = False
        self.last_renew = float("-inf")  # clock() when the last successful acquire/renew was *sent*
        self.last_attempt = clock()
        self._observed: Optional[tuple[Any, ...]] = None
        self._observed_at = float("-inf")

    @property
    def holder(self) -> Optional[str]:
        return self._observed[0] if self._observed else None

    def _spec(self, now: datetime, acquire_time: Optional[str], transitions: int) -> dict[str, Any]:
        return {"holderIdentity": self.config.identity, "leaseDurationSeconds": int(round(self.config.lease_duration)),
                "acquireTime": acquire_time or micro_time(now), "renewTime": micro_time(now),
                "leaseTransitions": transitions}

    def try_acquire_or_renew(self) -> bool:
        """One attempt (client-go's tryAcquireOrRenew): True when this candidate holds the Lease now."""
        started, now = self.clock(), self.wall()
        self.last_attempt = started
        lease = self.api.get(self.config.namespace, self.config.name)
        if lease is None:
            obj = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                   "metadata": {"name": self.config.name, "namespace": self.config.namespace,
                                "labels": dict(LEASE_LABELS)},
                   "spec": self._spec(now, None, 0)}
            try:
                created = self.api.create(obj)
            except Conflict:
                return False  # another candidate created it first
            return self._won(created, started)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, (lease.get("metadata") or {}).get("resourceVersion"), spec.get("renewTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, started
        duration = float(spec.get("leaseDurationSeconds") or self.config.lease_duration)
        ours = holder == self.config.identity
        if holder and not ours and self._observed_at + duration > started:
            if self.is_leader:
                logger.warning("lease %s taken over by %s", self.config.name, holder)
            self.is_leader = False
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        body = {**lease, "spec": {**spec, **self._spec(now, spec.get("acquireTime") if ours else None, transitions)}}
        try:
            updated = self.api.replace(body)
        except Conflict:
            return False  # someone else wrote it in between: the next attempt reads who
        return self._won(updated, started)

    def _won(self, lease: dict[str, Any], started: float) -> bool:
        spec = lease.get("spec") or {}
        self._observed = (spec.get("holderIdentity") or "", (lease.get("metadata") or {}).get("resourceVersion"),
                          spec.get("renewTime"))
        self._observed_at = started
        if not self.is_leader:
            logger.info("became leader", extra={"lease": f"{self.config.namespace}/{self.config.name}",
                                                 "identity": self.config.identity})
        self.is_leader = True
        self.last_renew = started
        return True

    def acquire(self, stop: threading.Event) -> bool:
        """Block until this candidate leads (True) or `stop` is set (False)."""
        logger.info("waiting for leadership", extra={"lease": f"{self.config.namespace}/{self.config.name}",
                                                     "identity": self.config.identity})
        while not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    return True
            except Exception as e:  # noqa: BLE001 - API down: keep trying, stay a follower
                logger.warning("lease %s: %s", self.config.name, e)
            stop.wait(self.config.retry_period)
        return False

    def expired(self) -> bool:
        """The leader has not renewed within renew_deadline: it must stop acting now."""
        return self.clock() - self.last_renew > self.config.renew_deadline

    def keep(self, stop: threading.Event, on_lost: Callable[[str], None]) -> None:
        """Renew every retry_period until `stop`; call on_lost once when leadership is gone (taken
        over, or not renewed within renew_deadline). A watchdog thread checks the deadline so a
        hung request cannot keep a stale leader acting."""
        fired = threading.Lock()

        def lost(why: str) -> None:
            if fired.acquire(blocking=False):
                self.is_leader = False
                on_lost(why)

        def watchdog() -> None:
            while not stop.wait(min(0.5, self.config.retry_period / 4)):
                if self.expired():
                    lost(f"lease not renewed within {self.config.renew_deadline}s")
                    return

        threading.Thread(target=watchdog, name="tailor-lease-watchdog", daemon=True).start()
        while not stop.wait(self.config.retry_period):
            try:
                if self.try_acquire_or_renew():
                    continue
            except Exception as e:  # noqa: BLE001 - retried until the renew deadline
                logger.warning("lease %s renew failed: %s", self.config.name, e)
                continue
            if self.holder and self.holder != self.config.identity:
                lost(f"lease taken over by {self.holder}")
                return

    def release(self) -> bool:
        """Hand the Lease back (holder cleared, duration 1 s) so a follower takes over at once.
        Call only after this process has stopped acting."""
        if not self.is_leader:
            return False
        self.is_leader = False
        try:
            lease = self.api.get(self.config.namespace, self.config.name)
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.config.identity:
                return False
            now = micro_time(self.wall())
            self.api.replace({**lease, "spec": {**spec, "holderIdentity": "", "leaseDurationSeconds": 1,
                                                "acquireTime": now, "renewTime": now}})
        except Exception as e:  # noqa: BLE001 - the Lease then simply expires
            logger.warning("lease %s not released: %s", self.config.name, e)
            return False
        logger.info("released leadership", extra={"identity": self.config.identity})
        return True
