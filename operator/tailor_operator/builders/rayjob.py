"""Pure: one run of a FineTuneJob -> a KubeRay RayJob (ray.io/v1) manifest.

The RayJob runs `python -m tailor_trainer run --config /etc/tailor/config.json` on a head node
(CPU only) with one worker group of `workers` pods (DDP ranks) on the GPU pool. Retries are the
operator's (KubeRay's own backoffLimit would rebuild the cluster blind to checkpoints), so the
RayJob's `backoffLimit` is 0 and the attempt number is an annotation.

The run's `config.json` travels inside the RayJob: an annotation on the head and worker pod
templates, mounted at /etc/tailor/config.json through a downward API volume, so starting a run is
one create and the config is frozen with the attempt that uses it. A config too large for that
(`INLINE_CONFIG_MAX_BYTES`, e.g. a Dataset's inline data) goes into ConfigMap `<run>-config`
instead, created before the RayJob and mounted at the same path.

Every pod (head, workers, and the submitter pod that runs `ray job submit`) carries the
securityContexts of `builders/podsecurity.py`, so a namespace enforcing the `restricted` Pod
Security Standard admits them. The submitter pod template is ours, not KubeRay's default (which has
no securityContext and requests half a CPU): its container has no command, so KubeRay fills in the
`ray job submit` command line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob
from tailor_operator.builders.labels import (
    ANNOTATION_ATTEMPT,
    ANNOTATION_CONFIG,
    ANNOTATION_CONFIG_HASH,
    ANNOTATION_GENERATION,
    ANNOTATION_REVISION,
    ANNOTATION_RUN_NUMBER,
    LABEL_NAME,
    LABEL_QUEUE,
    object_meta,
    run_labels,
)
from tailor_operator.builders.naming import config_map_name, safe_name
from tailor_operator.builders.podsecurity import container_security_context, pod_security_context

CONFIG_DIR = "/etc/tailor"
CONFIG_FILE = "config.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
# A pod's annotations may hold 256 KiB in all; the config goes on two pod templates of the RayJob
# (and of the RayCluster KubeRay makes from it), so larger configs take a ConfigMap.
INLINE_CONFIG_MAX_BYTES = 64 * 1024
ENTRYPOINT = f"python -m tailor_trainer run --config {CONFIG_PATH}"
PVC_ROOT = "/mnt/pvc"
# s3 output: the trainer's local copy of the run directory (TAILOR_RUN_CACHE) on an emptyDir, not
# on the image's filesystem.
RUN_CACHE_DIR = "/var/lib/tailor/runs"
GPU = "nvidia.com/gpu"
# KubeRay looks the submitter up by this container name (utils.SubmitterContainerName).
SUBMITTER_CONTAINER = "ray-job-submitter"
# `ray job submit` only submits and tails logs: a tenth of a CPU is plenty.
SUBMITTER_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
# KubeRay runs Ray as `/bin/bash -lc "ulimit ...; ray start ... --block"`: bash is PID 1 and does not
# pass SIGTERM on, so a deleted Ray pod sat out the whole default 30 s grace period (measured on a
# real node). Nothing is saved on SIGTERM (checkpoints are written at their steps), so waiting
# longer only keeps GPUs and the run's name busy.
RAY_POD_GRACE_SECONDS = 10


@dataclass(frozen=True)
class RayJobOptions:
    """Installation-wide choices (operator settings) that shape every RayJob."""

    image: str = "ghcr.io/tailor-dev/tailor-trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    ray_version: str = "2.60.0"
    service_account: Optional[str] = None
    head_cpu: str = "1"
    head_memory: str = "4Gi"
    cluster_ttl_seconds: int = 300
    cpu_pool_node_selector: Optional[dict[str, str]] = None
    """Where the CPU-only pods of a run go (the Ray head and the submitter): the installation's
    CPU pool. The workers go where the job's own nodeSelector/tolerations say."""
    cpu_pool_tolerations: Optional[list[dict[str, Any]]] = None
    allow_private_addresses: bool = False
    """Installation policy: http(s) sources may reach loopback/link-local/metadata addresses."""


def pvc_claim(uri: Optional[str]) -> Optional[str]:
    """`pvc://<claim>/<path>` -> claim (mounted at /mnt/pvc/<claim>)."""
    if uri and uri.startswith("pvc://"):
        claim = uri[len("pvc://"):].split("/", 1)[0]
        return claim or None
    return None


def secret_refs(job: FineTuneJob, dataset: Optional[Dataset]) -> list[tuple[str, str]]:
    """(role, secret name) for every credential the run needs: names only, never values."""
    refs: list[tuple[str, str]] = []
    if job.spec.base_model.secret_ref:
        refs.append(("model", job.spec.base_model.secret_ref.name))
    if dataset is not None and dataset.spec.source.secret_ref:
        refs.append(("dataset", dataset.spec.source.secret_ref.name))
    if job.spec.output.secret_ref:
        refs.append(("output", job.spec.output.secret_ref.name))
    return refs


def config_inline(config_json: str) -> bool:
    """Whether a rendered config.json travels in the RayJob (else in ConfigMap `<run>-config`)."""
    return len(config_json.encode()) <= INLINE_CONFIG_MAX_BYTES


def _config_volume(run: str, inline: bool) -> dict[str, Any]:
    if inline:
        path = f"metadata.annotations['{ANNOTATION_CONFIG}']"
        return {"name": "tailor-config",
                "downwardAPI": {"items": [{"path": CONFIG_FILE, "fieldRef": {"fieldPath": path}}]}}
    return {"name": "tailor-config", "configMap": {"name": config_map_name(run)}}


def _storage(job: FineTuneJob, dataset: Optional[Dataset], run: str,
             inline: bool) -> tuple[list[dict], list[dict], list[dict]]:
    """Volumes, mounts and envFrom shared by head and workers."""
    volumes: list[dict[str, Any]] = [_config_volume(run, inline)]
    mounts: list[dict[str, Any]] = [{"name": "tailor-config", "mountPath": CONFIG_DIR, "readOnly": True}]
    env_from: list[dict[str, Any]] = []
    seen_secrets: set[str] = set()
    # Credentials reach the clients (boto/s3fs, huggingface_hub) as environment variables only:
    # never as files, which a Dataset's source.uri could name and read back (docs/security.md).
    for _role, name in secret_refs(job, dataset):
        if name not in seen_secrets:
            env_from.append({"secretRef": {"name": name}})
            seen_secrets.add(name)
    uris = [job.spec.base_model.uri, job.spec.output.uri]
    if dataset is not None and dataset.spec.source.uri:
        uris.append(dataset.spec.source.uri)
    claims: list[str] = []
    for uri in uris:
        claim = pvc_claim(uri)
        if claim and claim not in claims:
            claims.append(claim)
    for claim in claims:
        volume = safe_name("pvc-", claim)
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": volume, "mountPath": f"{PVC_ROOT}/{claim}"})
    if job.spec.output.uri.startswith("s3://"):
        volumes.append({"name": "tailor-run-cache", "emptyDir": {}})
        mounts.append({"name": "tailor-run-cache", "mountPath": RUN_CACHE_DIR})
    return volumes, mounts, env_from


def _container(name: str, image: str, pull_policy: str, env: list[dict], env_from: list[dict],
               mounts: list[dict], resources: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": image, "imagePullPolicy": pull_policy,
                                 "env": copy.deepcopy(env)}
    if env_from:
        container["envFrom"] = copy.deepcopy(env_from)
    container["resources"] = copy.deepcopy(resources)
    container["securityContext"] = container_security_context()
    container["volumeMounts"] = copy.deepcopy(mounts)
    return container


def cpu_pool_placement(pod: dict[str, Any], node_selector: Optional[dict[str, str]],
                       tolerations: Optional[list[dict[str, Any]]]) -> None:
    """Put a CPU-only pod (Ray head, submitter, Dataset validation) on the installation's CPU pool."""
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = copy.deepcopy(tolerations)


def _submitter_template(image: str, labels: dict[str, str], options: RayJobOptions) -> dict[str, Any]:
    """The pod that runs `ray job submit` against the head (K8sJobMode): no command, so KubeRay
    writes it; restricted-PSS securityContexts and a small request instead of KubeRay's default."""
    pod: dict[str, Any] = {"restartPolicy": "Never"}
    if options.service_account:
        pod["serviceAccountName"] = options.service_account
    pod["securityContext"] = pod_security_context()
    cpu_pool_placement(pod, options.cpu_pool_node_selector, options.cpu_pool_tolerations)
    pod["containers"] = [{
        "name": SUBMITTER_CONTAINER,
        "image": image,
        "imagePullPolicy": options.image_pull_policy,
        "resources": copy.deepcopy(SUBMITTER_RESOURCES),
        "securityContext": container_security_context(),
    }]
    return {"metadata": {"labels": dict(labels)}, "spec": pod}


def build_rayjob(
    job: FineTuneJob,
    dataset: Optional[Dataset],
    run: str,
    *,
    number: int,
    attempt: int,
    dataset_revision: Optional[str],
    config_hash: str,
    options: RayJobOptions,
    config_json: Optional[str] = None,
) -> dict[str, Any]:
    """The RayJob for attempt `attempt` of run `run` (deterministic: same inputs, same dict).
    `config_json`: the rendered config.json to carry on the pod templates; None when it is in
    ConfigMap `<run>-config` (too large, see `config_inline`)."""
    spec = job.spec
    res = spec.resources
    namespace = job.metadata.namespace
    labels = run_labels(job.metadata.name, run)
    pod_labels = {**labels, LABEL_NAME: "tailor-trainer"}
    meta_labels = dict(pod_labels)
    if spec.queue_name:
        meta_labels[LABEL_QUEUE] = spec.queue_name
    annotations = {
        ANNOTATION_ATTEMPT: str(attempt),
        ANNOTATION_RUN_NUMBER: str(number),
        ANNOTATION_GENERATION: str(job.metadata.generation or 0),
        ANNOTATION_CONFIG_HASH: config_hash,
    }
    if dataset_revision:
        annotations[ANNOTATION_REVISION] = dataset_revision
    image = res.image or options.image
    volumes, mounts, env_from = _storage(job, dataset, run, inline=config_json is not None)
    template_meta: dict[str, Any] = {"labels": dict(pod_labels)}
    if config_json is not None:
        template_meta["annotations"] = {ANNOTATION_CONFIG: config_json}
    env = [
        {"name": "TAILOR_NAMESPACE", "value": namespace or "default"},
        {"name": "TAILOR_JOB", "value": job.metadata.name},
        {"name": "TAILOR_RUN", "value": run},
        {"name": "TAILOR_ATTEMPT", "value": str(attempt)},
        # Ray's memory monitor reads the container's cgroup usage, which counts the page cache of
        # the CUDA/torch libraries a worker maps (GBs): on a real node it killed healthy 3-4Gi CPU
        # workers (WorkerGroupError/ControllerError, in 2 of 5 runs). The kernel's cgroup OOM
        # killer still bounds memory, and an OOMKilled pod is reported as such.
        {"name": "RAY_memory_monitor_refresh_ms", "value": "0"},
    ]
    if options.allow_private_addresses:
        env.append({"name": "TAILOR_ALLOW_PRIVATE_ADDRESSES", "value": "1"})
    if job.spec.output.uri.startswith("s3://"):
        env.append({"name": "TAILOR_RUN_CACHE", "value": RUN_CACHE_DIR})
    head_resources = {
        "requests": {"cpu": options.head_cpu, "memory": options.head_memory},
        "limits": {"cpu": options.head_cpu, "memory": options.head_memory},
    }
    worker_limits: dict[str, str] = {"cpu": res.cpus_per_worker, "memory": res.memory_per_worker}
    if res.gpus_per_worker:
        worker_limits[GPU] = str(res.gpus_per_worker)
    worker_resources = {"requests": dict(worker_limits), "limits": dict(worker_limits)}

    def pod_spec(container: dict[str, Any], extra_volumes: list[dict], placement: bool) -> dict[str, Any]:
        pod: dict[str, Any] = {}
        if options.service_account:
            pod["serviceAccountName"] = options.service_account
        if res.priority_class_name:
            pod["priorityClassName"] = res.priority_class_name
        pod["securityContext"] = pod_security_context()
        pod["terminationGracePeriodSeconds"] = RAY_POD_GRACE_SECONDS
        if placement:
            if res.node_selector:
                pod["nodeSelector"] = dict(res.node_selector)
            if res.tolerations:
                pod["tolerations"] = [t.to_wire() for t in res.tolerations]
            if res.affinity:
                pod["affinity"] = res.affinity
        else:
            cpu_pool_placement(pod, options.cpu_pool_node_selector, options.cpu_pool_tolerations)
        pod["containers"] = [copy.deepcopy(container)]
        pod["volumes"] = copy.deepcopy(volumes + extra_volumes)
        return pod

    pull = options.image_pull_policy
    head = _container("ray-head", image, pull, env, env_from, mounts, head_resources)
    worker = _container("ray-worker", image, pull, env, env_from,
                        mounts + [{"name": "dshm", "mountPath": "/dev/shm"}], worker_resources)
    shm = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]

    rayjob_spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": options.cluster_ttl_seconds,
        "backoffLimit": 0,
    }
    if spec.active_deadline_seconds:
        rayjob_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    rayjob_spec["submitterPodTemplate"] = _submitter_template(image, pod_labels, options)
    rayjob_spec["rayClusterSpec"] = {
        "rayVersion": options.ray_version,
        "headGroupSpec": {
            # num-cpus 0: the head runs the driver (prep, the Ray Train controller, the progress
            # relay: all 0-CPU) but no training worker or evaluation task, so that those land on the
            # worker pods the spec sized (KubeRay would advertise the head's CPU limit otherwise)
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
            "template": {"metadata": copy.deepcopy(template_meta),
                         "spec": pod_spec(head, [], placement=False)},
        },
        "workerGroupSpecs": [
            {
                "groupName": "workers",
                "replicas": res.workers,
                "minReplicas": res.workers,
                "maxReplicas": res.workers,
                "rayStartParams": {"num-gpus": str(res.gpus_per_worker)},
                "template": {"metadata": copy.deepcopy(template_meta),
                             "spec": pod_spec(worker, shm, placement=True)},
            }
        ],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": object_meta(run, namespace, meta_labels, job, annotations),
        "spec": rayjob_spec,
    }
