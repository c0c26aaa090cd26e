"""The Lease elector against a fake API and a fake clock (tailor_operator.leader), and the
liveness decisions of tailor_operator.runner.Health."""

from __future__ import annotations

import copy
import threading
from datetime import datetime, timezone
from typing import Any, Optional

import pytest

from tailor_operator.cluster import Conflict
from tailor_operator.handlers.context import WorkQueue
from tailor_operator.leader import LeaderElector, LeaseConfig
from tailor_operator.runner import Health


class FakeLeases:
    """An API server's optimistic concurrency for one Lease: resourceVersion checked on PUT."""

    def __init__(self) -> None:
        self.obj: Optional[dict[str, Any]] = None
        self.rv = 0
        self.fail_next = 0

    def _check(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("connection refused")

    def get(self, namespace: str, name: str) -> Optional[dict[str, Any]]:
        self._check()
        return copy.deepcopy(self.obj)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._check()
        if self.obj is not None:
            raise Conflict(409, "AlreadyExists")
        self.rv += 1
        self.obj = copy.deepcopy(obj)
        self.obj["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.obj)

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._check()
        if self.obj is None or obj["metadata"].get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
            raise Conflict(409, "Conflict")
        self.rv += 1
        self.obj = copy.deepcopy(obj)
        self.obj["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.obj)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _elector(api: FakeLeases, clock: Clock, identity: str) -> LeaderElector:
    config = LeaseConfig(name="tailor", namespace="ops", identity=identity, lease_duration=15, renew_deadline=10,
                         retry_period=2)
    return LeaderElector(api, config, clock=clock, wall=lambda: datetime(2026, 1, 1, tzinfo=timezone.utc))


def test_acquires_a_missing_lease_and_labels_it() -> None:
    api, clock = FakeLeases(), Clock()
    a = _elector(api, clock, "a")
    assert a.try_acquire_or_renew() and a.is_leader
    assert api.obj["spec"]["holderIdentity"] == "a" and api.obj["spec"]["leaseDurationSeconds"] == 15
    assert api.obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tailor"
    assert api.obj["spec"]["renewTime"] == "2026-01-01T00:00:00.000000Z"


def test_follower_waits_for_expiry_measured_from_its_own_observation() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = _elector(api, clock, "a"), _elector(api, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # held and unexpired
    clock.t += 14.9
    assert not b.try_acquire_or_renew()  # 14.9 s since b first saw this record
    clock.t += 0.2
    assert b.try_acquire_or_renew() and b.is_leader  # expired: taken over
    assert api.obj["spec"]["holderIdentity"] == "b" and api.obj["spec"]["leaseTransitions"] == 1


def test_renewals_keep_the_lease_and_reset_the_followers_view() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = _elector(api, clock, "a"), _elector(api, clock, "b")
    assert a.try_acquire_or_renew()
    for _ in range(20):  # 40 s of renewals every 2 s: b never takes over
        assert not b.try_acquire_or_renew()
        clock.t += 2
        assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew() and api.obj["spec"]["holderIdentity"] == "a"
    assert api.obj["spec"]["leaseTransitions"] == 0


def test_a_concurrent_write_makes_the_loser_back_off() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = _elector(api, clock, "a"), _elector(api, clock, "b")
    assert a.try_acquire_or_renew()
    clock.t += 20  # expired for b, but a renews between b's GET and PUT
    real_get = api.get

    def get_then_renew(ns: str, name: str) -> Optional[dict[str, Any]]:
        seen = real_get(ns, name)
        api.get = real_get
        assert a.try_acquire_or_renew()
        return seen

    b.try_acquire_or_renew()  # observes the record once
    clock.t += 20
    api.get = get_then_renew
    assert not b.try_acquire_or_renew()  # 409: a's renewal won
    assert api.obj["spec"]["holderIdentity"] == "a" and not b.is_leader


def test_leader_that_cannot_renew_gives_up_before_the_lease_expires() -> None:
    api, clock = FakeLeases(), Clock()
    a = _elector(api, clock, "a")
    assert a.try_acquire_or_renew() and not a.expired()
    clock.t += 10.1
    assert a.expired()  # renew deadline (10 s) < lease duration (15 s): stops before anyone may take over


def test_keep_reports_a_takeover_once() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = _elector(api, clock, "a"), _elector(api, clock, "b")
    assert a.try_acquire_or_renew()
    b.try_acquire_or_renew()
    clock.t += 16
    assert b.try_acquire_or_renew()  # a was partitioned; b took over
    a.last_renew = clock.t  # keep the watchdog quiet: this test is about the takeover path
    a.config = LeaseConfig("tailor", "ops", "a", lease_duration=0.3, renew_deadline=0.2, retry_period=0.01)
    lost: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=a.keep, args=(stop, lost.append))
    thread.start()
    thread.join(5)
    stop.set()
    assert lost and "taken over by b" in lost[0] and len(lost) == 1 and not a.is_leader


def test_release_hands_over_at_once() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = _elector(api, clock, "a"), _elector(api, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    assert a.release() and not a.is_leader
    assert api.obj["spec"]["holderIdentity"] == "" and api.obj["spec"]["leaseDurationSeconds"] == 1
    assert b.try_acquire_or_renew()  # no waiting for expiry
    assert not a.release()  # not ours any more: nothing written
    assert api.obj["spec"]["holderIdentity"] == "b"


def test_acquire_retries_through_api_errors_and_stops_on_request() -> None:
    api, clock = FakeLeases(), Clock()
    a = _elector(api, clock, "a")
    a.config = LeaseConfig("tailor", "ops", "a", lease_duration=3, renew_deadline=2, retry_period=0.01)
    api.fail_next = 3
    assert a.acquire(threading.Event()) and a.is_leader
    stop = threading.Event()
    stop.set()
    assert not _elector(api, clock, "b").acquire(stop)


def test_config_from_env() -> None:
    assert LeaseConfig.from_env({}) is None
    c = LeaseConfig.from_env({"TAILOR_LEADER_ELECTION": "true", "POD_NAME": "op-1", "POD_NAMESPACE": "ops",
                              "TAILOR_LEASE_DURATION_SECONDS": "4", "TAILOR_LEASE_RENEW_DEADLINE_SECONDS": "3",
                              "TAILOR_LEASE_RETRY_PERIOD_SECONDS": "1"})
    assert c is not None and c.namespace == "ops" and c.name == "tailor-operator"
    assert c.identity.startswith("op-1_") and (c.lease_duration, c.renew_deadline, c.retry_period) == (4, 3, 1)
    with pytest.raises(ValueError):
        LeaseConfig("x", "ns", "id", lease_duration=10, renew_deadline=10, retry_period=2)


# ------------------------------------------------------------------------------------ liveness

def test_work_queue_reports_a_stuck_reconcile_and_a_stalled_queue() -> None:
    release = threading.Event()
    queue = WorkQueue(lambda key: release.wait(10) and None, workers=1)
    queue.start()
    try:
        queue.add(("FineTuneJob", "ns", "a"))
        queue.add(("FineTuneJob", "ns", "b"))
        threading.Event().wait(0.3)
        assert queue.stuck(60) is None
        problem = queue.stuck(0.1)
        assert problem and "FineTuneJob/ns/a running" in problem
        release.set()
    finally:
        assert queue.stop(wait=5)
    stalled = WorkQueue(lambda key: None, workers=0)  # nothing takes keys: the queue stalls
    stalled.start()
    stalled.add(("Dataset", "ns", "d"))
    assert stalled.stuck(60) is None
    threading.Event().wait(0.3)
    assert "1 keys waiting" in stalled.stuck(0.1)
    stalled.stop()


class FakeElector:
    def __init__(self, clock: Clock) -> None:
        self.is_leader = True
        self.last_attempt = clock.t
        self.config = LeaseConfig("tailor", "ops", "a")


def test_health_fails_an_acting_leader_whose_watches_or_workers_stall() -> None:
    clock = Clock()
    stuck: list[Optional[str]] = [None]
    health = Health(lambda bound: stuck[0], stuck_seconds=600, watch_stall_seconds=60, clock=clock)
    health.elector, health.heartbeats = FakeElector(clock), True
    assert health.problem() is None  # follower
    clock.t += 500
    assert health.problem() is not None  # follower whose election loop stopped trying
    health.elector.last_attempt = clock.t
    health.start_acting()
    clock.t += 59
    assert health.problem() is None
    clock.t += 2
    assert "no watch event" in health.problem()
    health.beat()
    assert health.problem() is None
    stuck[0] = "reconcile of x running for 700s"
    assert health.problem() == stuck[0]
