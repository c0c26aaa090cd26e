"""Where training runs: Ray in this process, a private local Ray, or the cluster of a RayJob.

``use_local_mode``: one worker and no cluster to join -> Ray Train's local mode (no Ray start-up
at all). ``ensure_ray``: join ``RAY_ADDRESS``, else start a small local Ray once per process.
The relay actor carries rank 0's progress and outcome back to the driver, which owns the
reporter; it lives on the driver's node (a lost worker pod must not take it along). ``stage_error_in`` digs a worker's StageError out of Ray's exception wrappers.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Optional

from tailor_trainer.config import TrainerConfig
from tailor_trainer.errors import StageError


def use_local_mode(cfg: TrainerConfig) -> bool:
    """One worker and no cluster to join: run in this process (Ray Train local mode)."""
    forced = os.environ.get("TAILOR_RAY_LOCAL_MODE")
    if forced in ("0", "1"):
        return forced == "1"
    return cfg.resources.workers == 1 and not os.environ.get("RAY_ADDRESS")


def ensure_ray(cfg: Optional[TrainerConfig] = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a small local Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # A private single-node Ray: no spot preemption to watch for (saves an actor per fit).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    cpus = os.cpu_count() or 1
    if cfg is not None:
        cpus = max(cpus, math.ceil(cfg.resources.workers * cfg.resources.cpus_per_worker))
    # Workers must import tailor_trainer from wherever this process did.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    for attempt in range(3):
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0",
                                               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}})
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            # Ray waits a fixed 30 s for its raylet; on a busy machine that is not always enough.
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
            time.sleep(2)


def start_relay() -> Any:
    """A ProgressRelay on this (the driver's) node: it lives and dies with the driver, never with a
    worker pod that a node failure or preemption takes away (that froze a run's progress once)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return relay_class().options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()


def relay_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class ProgressRelay:
        """Holds rank 0's latest progress and final outcome for the driver to pick up."""

        def __init__(self) -> None:
            self.seq, self.latest, self.outcome = 0, None, None

        def update(self, doc: dict) -> None:
            self.seq, self.latest = self.seq + 1, doc

        def poll(self) -> tuple[int, Optional[dict]]:
            return self.seq, self.latest

        def finish(self, outcome: dict) -> None:
            self.outcome = outcome

        def result(self) -> Optional[dict]:
            return self.outcome

    return ProgressRelay


def stage_error_in(exc: BaseException) -> Optional[StageError]:
    """The StageError a worker raised, found inside Ray's wrappers."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StageError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
        todo += list(getattr(e, "worker_failures", {}).values())
        ctrl = getattr(e, "controller_failure", None)
        if ctrl is not None:
            todo.append(ctrl)
    return None
