"""Operator settings that the pure reconcile functions read (images, backoff, rate limits).

A frozen dataclass so a test can build one in a line; ``tailor_operator.runner`` fills it from
``TAILOR_*`` environment variables (the Helm chart sets them from values.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

from tailor_operator.api.v1alpha1 import Backend
from tailor_operator.builders.inspect_job import InspectJobOptions
from tailor_operator.builders.rayjob import RayJobOptions


@dataclass(frozen=True)
class OperatorSettings:
    """What an operator installation decides (as opposed to what a FineTuneJob asks for)."""

    trainer_image: str = "ghcr.io/tailor-dev/tailor-trainer:0.1.0"
    """Default trainer image (spec.resources.image overrides it per job)."""
    ray_version: str = "2.47.1"
    """Ray version inside the trainer image (KubeRay needs it for the RayCluster)."""
    trainer_service_account: str | None = None
    """ServiceAccount of trainer and validation pods (needs ConfigMap write in its namespace)."""
    head_cpu: str = "1"
    head_memory: str = "4Gi"
    cluster_ttl_seconds: int = 300
    """RayCluster kept this long after the Ray job finishes (logs), then KubeRay deletes it."""
    dataset_backend: Backend = Backend.kuberay
    """Where Dataset validation runs unless the Dataset's `tailor.dev/backend` annotation says."""
    local_max_concurrent: int = 1
    """Local runs (trainer subprocesses) at once; further runs wait in phase Queued."""
    backoff_base_seconds: float = 10.0
    """First retry delay; doubles with each failed attempt."""
    backoff_max_seconds: float = 600.0
    status_min_interval_seconds: float = 5.0
    """At most one progress-only status write per object in this interval."""
    active_poll_seconds: float = 10.0
    """Re-check an active run this often even without events (progress file, pods)."""
    validation_job_ttl_seconds: int = 600

    def rayjob_options(self) -> RayJobOptions:
        return RayJobOptions(
            image=self.trainer_image,
            ray_version=self.ray_version,
            service_account=self.trainer_service_account,
            head_cpu=self.head_cpu,
            head_memory=self.head_memory,
            cluster_ttl_seconds=self.cluster_ttl_seconds,
        )

    def inspect_options(self) -> InspectJobOptions:
        return InspectJobOptions(
            image=self.trainer_image,
            service_account=self.trainer_service_account,
            ttl_seconds=self.validation_job_ttl_seconds,
        )

    def backoff_seconds(self, failed_attempts: int) -> float:
        """Delay before the next attempt after `failed_attempts` failures (1, 2, ...)."""
        return min(self.backoff_base_seconds * 2 ** max(failed_attempts - 1, 0), self.backoff_max_seconds)
