"""Operator settings that the pure reconcile functions read (images, backoff, rate limits).

A frozen dataclass so a test can build one in a line; ``tailor_operator.runner`` fills it from
``TAILOR_*`` environment variables (the Helm chart sets them from values.yaml).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import Backend
from tailor_operator.builders.inspect_job import InspectJobOptions
from tailor_operator.builders.networkpolicy import DEFAULT_INGRESS
from tailor_operator.builders.podsecurity import PULL_POLICIES
from tailor_operator.builders.rayjob import RayJobOptions


@dataclass(frozen=True)
class OperatorSettings:
    """What an operator installation decides (as opposed to what a FineTuneJob asks for)."""

    trainer_image: str = "ghcr.io/tailor-dev/tailor-trainer:0.1.0"
    """Default trainer image (spec.resources.image overrides it per job)."""
    trainer_image_pull_policy: str = "IfNotPresent"
    """imagePullPolicy of every trainer container (Always, IfNotPresent, Never)."""
    ray_version: str = "2.60.0"
    """Ray version inside the trainer image (KubeRay needs it for the RayCluster); the ray pin of
    requirements.lock, which the trainer image installs (a contract test keeps them equal)."""
    trainer_service_account: str | None = None
    """ServiceAccount of trainer and validation pods (needs ConfigMap write in its namespace). The
    operator creates it, with its Role and RoleBinding, in a namespace that lacks them."""
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
    model_preflight: bool = True
    """kuberay: check the base model against the spec in a CPU Job (trainer image, `python -m
    tailor_trainer preflight`) before the first RayJob of a spec; skipped when the operator can read
    the model's config itself (a local path)."""
    credentials_grace_seconds: float = 30.0
    """How long a run's pod may wait for a missing Secret (the kubelet retries, so a Secret applied
    just after the job still works) before the attempt fails with CredentialsError and its pods,
    which may hold GPUs, are deleted."""
    validation_start_grace_seconds: float = 120.0
    """How long a Dataset validation Job may go without a running pod (none created, or one not
    scheduled) before the Dataset says so (reason ValidationNotStarted) instead of a bare
    "Validating"; it keeps waiting, since a node or scheduler may still come."""
    validation_job_ttl_seconds: int = 600
    validation_cpu: str = "1"
    validation_memory: str = "2Gi"
    """Request and limit of the Dataset validation Job's pod."""
    cpu_pool_node_selector: str = ""
    """JSON object: nodeSelector of the CPU-only pods (Ray head, submitter, Dataset validation)."""
    cpu_pool_tolerations: str = ""
    """JSON list of core/v1 Tolerations of the CPU-only pods."""
    ray_network_policy: bool = True
    """Create a NetworkPolicy per run that admits ingress to its Ray pods only from the run's own
    pods and the rules of `ray_network_policy_ingress` (builders/networkpolicy.py)."""
    ray_network_policy_ingress: str = ""
    """JSON list of NetworkPolicyIngressRules also admitted (empty: the KubeRay operator's pods, any
    namespace, on the dashboard port 8265)."""

    registry_uri: str = ""
    """MLflow tracking server whose model registry gets a version per successful run of a job that
    sets spec.registry (http(s)://host:port); empty: no registry. Only the installation sets it:
    tenants name a model, never an address. Credentials come from the operator's environment
    (TAILOR_REGISTRY_USERNAME/PASSWORD or TAILOR_REGISTRY_TOKEN, from a Secret)."""
    registry_timeout_seconds: float = 5.0
    """Timeout of one registry request; a failed sync is retried with backoff (up to 5 minutes)."""

    # Policy: what tenants (anyone who may create Datasets and FineTuneJobs) may ask for. The
    # defaults are the chart's: kuberay only, the installation's image, no local paths, no
    # link-local/loopback/metadata http(s) sources. reconcile/policy.py applies them.
    allowed_backends: str = "kuberay"
    """Backends a FineTuneJob's spec.backend (and a Dataset's tailor.dev/backend annotation) may
    name: a JSON list or comma-separated. `local` runs trainers inside the operator's pod, with its
    environment and ServiceAccount: allow it only where every tenant is trusted (a laptop, CI)."""
    allow_image_override: bool = False
    """Whether spec.resources.image may replace the trainer image."""
    allowed_image_prefixes: str = ""
    """When overrides are allowed: the image references they must start with (JSON list or
    comma-separated; empty: any)."""
    allowed_local_roots: str = ""
    """Directories under which file:// and bare-path URIs (Dataset source, base model, output) are
    accepted: JSON list or comma-separated absolute paths, `*` for any path; empty: none (pvc://)."""
    allow_private_addresses: bool = False
    """Let http(s) Dataset sources reach link-local, loopback, unspecified and cloud metadata
    addresses (the trainer reads the same TAILOR_ALLOW_PRIVATE_ADDRESSES variable)."""

    def __post_init__(self) -> None:
        if self.trainer_image_pull_policy not in PULL_POLICIES:
            raise ValueError(f"trainer_image_pull_policy must be one of {', '.join(PULL_POLICIES)}, "
                             f"not {self.trainer_image_pull_policy!r}")
        self.cpu_pool()  # fail at start-up, not at the first RayJob
        unknown = [b for b in self.backends() if b not in {m.value for m in Backend}]
        if unknown:
            raise ValueError(f"allowed_backends names unknown backends {unknown}; known: "
                             f"{', '.join(m.value for m in Backend)}")
        relative = [r for r in self.local_roots() if r != "*" and not r.startswith("/")]
        if relative:
            raise ValueError(f"allowed_local_roots must be absolute paths or *, not {relative}")
        self.image_prefixes()
        self.network_policy_ingress()
        if self.registry_uri and not self.registry_uri.startswith(("http://", "https://")):
            raise ValueError(f"registry_uri must be an http(s) URL of an MLflow tracking server, "
                             f"not {self.registry_uri!r}")

    def cpu_pool(self) -> tuple[Optional[dict[str, str]], Optional[list[dict[str, Any]]]]:
        """(nodeSelector, tolerations) of the CPU-only pods, parsed from their JSON settings."""
        selector = json.loads(self.cpu_pool_node_selector) if self.cpu_pool_node_selector else None
        tolerations = json.loads(self.cpu_pool_tolerations) if self.cpu_pool_tolerations else None
        if selector is not None and not (isinstance(selector, dict)
                                         and all(isinstance(v, str) for v in selector.values())):
            raise ValueError(f"cpu_pool_node_selector must be a JSON object of strings, not {selector!r}")
        if tolerations is not None and not (isinstance(tolerations, list)
                                            and all(isinstance(t, dict) for t in tolerations)):
            raise ValueError(f"cpu_pool_tolerations must be a JSON list of objects, not {tolerations!r}")
        return selector or None, tolerations or None

    def backends(self) -> tuple[str, ...]:
        return _string_list("allowed_backends", self.allowed_backends)

    def image_prefixes(self) -> tuple[str, ...]:
        return _string_list("allowed_image_prefixes", self.allowed_image_prefixes)

    def local_roots(self) -> tuple[str, ...]:
        return _string_list("allowed_local_roots", self.allowed_local_roots)

    def network_policy_ingress(self) -> tuple[dict[str, Any], ...]:
        """The extra ingress rules of each run's NetworkPolicy, parsed from their JSON setting."""
        if not self.ray_network_policy_ingress:
            return DEFAULT_INGRESS
        rules = json.loads(self.ray_network_policy_ingress)
        if not (isinstance(rules, list) and all(isinstance(r, dict) for r in rules)):
            raise ValueError(f"ray_network_policy_ingress must be a JSON list of objects, not {rules!r}")
        return tuple(rules)

    def rayjob_options(self) -> RayJobOptions:
        selector, tolerations = self.cpu_pool()
        return RayJobOptions(
            image=self.trainer_image,
            image_pull_policy=self.trainer_image_pull_policy,
            ray_version=self.ray_version,
            service_account=self.trainer_service_account,
            head_cpu=self.head_cpu,
            head_memory=self.head_memory,
            cluster_ttl_seconds=self.cluster_ttl_seconds,
            cpu_pool_node_selector=selector,
            cpu_pool_tolerations=tolerations,
            allow_private_addresses=self.allow_private_addresses,
        )

    def inspect_options(self) -> InspectJobOptions:
        selector, tolerations = self.cpu_pool()
        return InspectJobOptions(
            image=self.trainer_image,
            image_pull_policy=self.trainer_image_pull_policy,
            service_account=self.trainer_service_account,
            ttl_seconds=self.validation_job_ttl_seconds,
            cpu=self.validation_cpu,
            memory=self.validation_memory,
            cpu_pool_node_selector=selector,
            cpu_pool_tolerations=tolerations,
            allow_private_addresses=self.allow_private_addresses,
        )

    def preflight_options(self) -> InspectJobOptions:
        """The model check runs like a Dataset validation: same image, account, pool, size."""
        return self.inspect_options()

    def backoff_seconds(self, failed_attempts: int) -> float:
        """Delay before the next attempt after `failed_attempts` failures (1, 2, ...)."""
        return min(self.backoff_base_seconds * 2 ** max(failed_attempts - 1, 0), self.backoff_max_seconds)


def _string_list(name: str, raw: str) -> tuple[str, ...]:
    """A JSON list of strings (what the chart writes with toJson) or a comma-separated list."""
    text = raw.strip()
    if not text:
        return ()
    if text.startswith("["):
        items = json.loads(text)
        if not (isinstance(items, list) and all(isinstance(i, str) for i in items)):
            raise ValueError(f"{name} must be a JSON list of strings, not {items!r}")
    else:
        items = text.split(",")
    return tuple(i.strip() for i in items if i.strip())
