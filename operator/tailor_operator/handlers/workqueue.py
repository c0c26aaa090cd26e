"""A de-duplicating keyed work queue with delayed re-adds, per-key exclusivity and two classes of
keys, like client-go's workqueue.

A key is never processed by two threads at once, a burst of adds for one key becomes one pass,
and `add_after` schedules the next look (backoff, deadlines, progress polling, the periodic
resync) without a timer per object. Keys never processed before (new objects, or every object
just after a start) are served before re-checks of known ones, so a burst of new FineTuneJobs is
not stuck behind resyncs and polls.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

logger = logging.getLogger("tailor.operator")

Key = tuple[str, str, str]  # (kind, namespace, name)


class WorkQueue:
    """De-duplicating keyed queue with delayed re-adds and per-key exclusivity."""

    def __init__(self, process: Callable[[Key], Optional[float]], workers: int = 8,
                 on_depth: Optional[Callable[[int], None]] = None) -> None:
        self._process = process
        self._cond = threading.Condition()
        self._fresh: deque[Key] = deque()  # never reconciled: served first
        self._queue: deque[Key] = deque()  # re-checks of known keys
        self._known: set[Key] = set()
        self._queued: set[Key] = set()
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        self._seq = 0
        self._stopped = False
        self._started = False
        # progress tracking for the liveness endpoint
        self._busy_since: dict[Key, float] = {}
        self._enqueued_at: dict[Key, float] = {}
        self.last_done = time.monotonic()
        self._on_depth = on_depth
        self._threads = [threading.Thread(target=self._work, name=f"tailor-worker-{i}", daemon=True)
                         for i in range(workers)]
        self._threads.append(threading.Thread(target=self._tick, name="tailor-timer", daemon=True))

    def start(self) -> None:
        self._started = True
        for t in self._threads:
            t.start()

    def stop(self, wait: float = 0.0) -> bool:
        """Stop taking keys; with `wait`, wait up to that long for in-flight reconciles to end.
        True when none is left running."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        deadline = time.monotonic() + wait
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            return not self._busy_since

    def stuck(self, bound: float) -> Optional[str]:
        """Why the workers are not making progress, or None: a reconcile running longer than
        `bound`, a key waiting longer than `bound` while no reconcile finished for as long, or a
        worker thread gone."""
        now = time.monotonic()
        with self._cond:
            if self._started and not self._stopped and not all(t.is_alive() for t in self._threads):
                return "a work-queue thread died"
            for key, since in self._busy_since.items():
                if now - since > bound:
                    return f"reconcile of {'/'.join(key)} running for {now - since:.0f}s"
            oldest = min((self._enqueued_at.get(k, now) for k in self._queued), default=now)
            if now - oldest > bound and now - self.last_done > bound:
                return f"{len(self._queued)} keys waiting, none reconciled for {now - self.last_done:.0f}s"
        return None

    def add(self, key: Key) -> None:
        with self._cond:
            self._add_locked(key)

    def forget(self, key: Key) -> None:
        """The object is gone: its key counts as new again, should the name come back."""
        with self._cond:
            self._known.discard(key)
            self._failures.pop(key, None)

    def depth(self) -> int:
        with self._cond:
            return len(self._queued)

    def _add_locked(self, key: Key) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            (self._queue if key in self._known else self._fresh).append(key)
            self._queued.add(key)
            self._enqueued_at[key] = time.monotonic()
            self._cond.notify()
        if self._on_depth:
            self._on_depth(len(self._queued))

    def add_after(self, key: Key, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        due = time.monotonic() + delay
        with self._cond:
            if key in self._due and self._due[key] <= due:
                return  # an earlier look is already scheduled
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._timers, (due, self._seq, key))
            self._cond.notify_all()

    def run_exclusive(self, key: Key, fn: Callable[[], Any]) -> Any:
        """Run fn while no worker reconciles `key` (used by the deletion finalizer)."""
        with self._cond:
            while key in self._processing:
                self._cond.wait(0.5)
            self._processing.add(key)
        try:
            return fn()
        finally:
            with self._cond:
                self._processing.discard(key)
                self._dirty.discard(key)
                self._cond.notify_all()

    def _tick(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    due, _, key = heapq.heappop(self._timers)
                    if self._due.get(key) == due:
                        del self._due[key]
                        self._add_locked(key)
                wait = (self._timers[0][0] - now) if self._timers else 1.0
                self._cond.wait(min(max(wait, 0.01), 1.0))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._fresh and not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                key = (self._fresh or self._queue).popleft()
                self._known.add(key)
                self._queued.discard(key)
                self._enqueued_at.pop(key, None)
                self._processing.add(key)
                self._busy_since[key] = time.monotonic()
            requeue: Optional[float] = None
            try:
                requeue = self._process(key)
                self._failures.pop(key, None)
            except Exception:  # noqa: BLE001 - one object's failure must not stop the operator
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                requeue = min(0.5 * 2 ** failures, 60.0)
                logger.exception("reconcile of %s/%s/%s failed (retry in %.1fs)", *key, requeue)
            finally:
                with self._cond:
                    self._processing.discard(key)
                    self._busy_since.pop(key, None)
                    self.last_done = time.monotonic()
                    if key in self._dirty:
                        self._dirty.discard(key)
                        self._add_locked(key)
                    self._cond.notify_all()
            if requeue is not None:
                self.add_after(key, requeue)
