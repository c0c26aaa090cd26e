"""What a reconcile decides: the new status, the actions on children, events, and when to look again.

Actions are plain data; the handlers execute them through a backend (kuberay or local) and
``tailor_operator.cluster``. Every action is idempotent, so a plan may be applied twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from tailor_operator.api.v1alpha1 import DatasetStatus, FineTuneJobStatus, RolloutTarget
from tailor_trainer.config import ResolvedDataset, TrainerConfig


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the reconciled object."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class StartRun:
    """Create (or adopt) the run's children: config, progress sink and RayJob, or a local process."""

    run: str
    attempt: int
    config: TrainerConfig
    number: int = 0
    """N of `<job>-r<N>`."""
    children: tuple[dict[str, Any], ...] = ()
    """kuberay: ConfigMaps and the RayJob, in creation order. Empty for the local backend."""


@dataclass(frozen=True)
class StopRun:
    """Stop the run's compute (delete the RayJob / terminate the process); its files stay."""

    run: str
    reason: str


@dataclass(frozen=True)
class DeleteRun:
    """Remove every child object of a finished run (ttlSecondsAfterFinished, deletion)."""

    run: str


@dataclass(frozen=True)
class ApplyPromotion:
    """Point the rollout target at the new champion's model."""

    run: str
    model_uri: str
    target: RolloutTarget
    canary_traffic_percent: Optional[int] = None
    """InferenceService with a staged rollout: the canary's share of traffic (None: removed)."""
    manage_canary: bool = False
    """Whether the patch sets (or removes) canaryTrafficPercent; False leaves it as it is."""


@dataclass(frozen=True)
class StartValidation:
    """Validate a Dataset revision on CPU: a batch/v1 Job (kuberay) or a subprocess (local)."""

    key: str
    dataset: ResolvedDataset
    children: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class DeleteValidation:
    key: str


@dataclass(frozen=True)
class StartPreflight:
    """Check the base model against the spec on CPU (kuberay): ConfigMap + batch/v1 Job `<key>`."""

    key: str
    children: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class DeletePreflight:
    key: str


Action = Union[StartRun, StopRun, DeleteRun, ApplyPromotion, StartValidation, DeleteValidation, StartPreflight,
               DeletePreflight]


@dataclass
class JobPlan:
    status: FineTuneJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: Optional[float] = None


@dataclass
class DatasetPlan:
    status: DatasetStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: Optional[float] = None


def sooner(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """The earlier of two optional requeue delays."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
