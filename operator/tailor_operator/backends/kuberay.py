"""KubeRay backend: runs are RayJobs; Dataset validations and model checks are batch/v1 Jobs.

Reads are kept to what the reconcile needs: the current run's RayJob by name (and the next one's,
once the status records a run; a label-selected list only for ttlSecondsAfterFinished), the
progress ConfigMap of the current run only, and its pods until the run has succeeded (a pod-level
reason while it starts or fails; a lost Ray head while it runs).

Starting a run is one create (the RayJob, config inside) after its NetworkPolicy; a create that
answers AlreadyExists adopts the existing RayJob. The trainer creates `<run>-progress`; the first
observation that reads it makes the job its owner (one patch), so garbage collection covers it.
"""

from __future__ import annotations

from typing import Any, Optional

from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob
from tailor_operator.builders.inspect_job import RESULT_KEY
from tailor_operator.builders.labels import LABEL_DATASET, LABEL_JOB, LABEL_NAME, LABEL_RUN
from tailor_operator.builders.configmaps import progress_owner_patch
from tailor_operator.builders.naming import config_map_name, progress_config_map_name
from tailor_operator.builders.preflight_job import preflight_labels
from tailor_operator.reconcile.observe import (
    RunObservation,
    ValidationObservation,
    observe_inspect,
    observe_rayjob,
)
from tailor_operator.reconcile.plan import StartPreflight, StartRun, StartValidation
from tailor_trainer.contract import PROGRESS_FILE, ProgressDoc

# Deployment states in which the trainer may have written a progress document.
_TRAINER_STARTED = {"Running", "Complete", "Failed", "ValidationFailed"}


def _owned_by(obj: dict[str, Any], uid: Optional[str], strict: bool = False) -> bool:
    """Whether `obj` has an owner reference to `uid` (an unknown uid counts as yes unless strict)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    if not uid:
        return not strict
    return any(r.get("uid") == uid for r in refs)


def parse_progress(config_map: Optional[dict[str, Any]]) -> Optional[ProgressDoc]:
    """The progress document the trainer wrote into its ConfigMap, or None."""
    raw = ((config_map or {}).get("data") or {}).get(PROGRESS_FILE)
    return ProgressDoc.read(raw) if raw else None


class KubeRayBackend:
    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def observe(self, job: FineTuneJob, current: Optional[str] = None, following: Optional[str] = None,
                everything: bool = False) -> dict[str, RunObservation]:
        """The current run and the one after it (which exists only if a predecessor operator created
        it and died before recording it), by name: GETs stay O(1) however many RayJobs a namespace
        holds. `everything` lists all of the job's RayJobs (for ttlSecondsAfterFinished)."""
        ns = job.metadata.namespace
        if everything:
            rayjobs = self.cluster.list("RayJob", ns, {LABEL_JOB: job.metadata.name})
        else:
            rayjobs = [r for r in (self.cluster.get("RayJob", ns, n) for n in (current, following) if n) if r]
        runs: dict[str, RunObservation] = {}
        for rayjob in rayjobs:
            if not _owned_by(rayjob, job.metadata.uid):
                continue  # a same-named job's leftovers, being garbage-collected
            name = rayjob["metadata"]["name"]
            status = rayjob.get("status") or {}
            deployment = status.get("jobDeploymentStatus") or ""
            progress = pods = None
            read = False
            if name in (current, following):
                if deployment in _TRAINER_STARTED or status.get("jobStatus"):
                    sink = self.cluster.get("ConfigMap", ns, progress_config_map_name(name))
                    if sink is not None and not _owned_by(sink, job.metadata.uid, strict=True):
                        self.cluster.merge_patch("ConfigMap", ns, progress_config_map_name(name),
                                                 progress_owner_patch(job, name))
                    progress = parse_progress(sink)
                    read = True
                # while it runs too: a lost Ray head shows only in the pods (KubeRay keeps RUNNING)
                if deployment and (deployment, status.get("jobStatus")) != ("Complete", "SUCCEEDED"):
                    pods = self.cluster.list("Pod", ns, {LABEL_RUN: name})
            runs[name] = observe_rayjob(rayjob, progress, pods, progress_read=read)
        return runs

    def start(self, job: FineTuneJob, action: StartRun) -> bool:
        """Create the run's NetworkPolicy (and config ConfigMap, when the config is too large to
        ride on the RayJob), then the RayJob; True if the RayJob is new (an existing one, e.g.
        created before an operator restart, is adopted)."""
        created = False
        for child in action.children:  # only the answers' metadata: the bodies are known
            if child["kind"] == "RayJob":
                _, created = self.cluster.create_or_adopt(child, metadata_only=True)
            else:
                self.cluster.apply(child, metadata_only=True)
        return created

    def stop(self, job: FineTuneJob, run: str) -> None:
        self.cluster.delete("RayJob", job.metadata.namespace, run)

    def delete(self, job: FineTuneJob, run: str) -> None:
        ns = job.metadata.namespace
        self.cluster.delete("RayJob", ns, run)
        self.cluster.delete("ConfigMap", ns, config_map_name(run))
        self.cluster.delete("ConfigMap", ns, progress_config_map_name(run))
        self.cluster.delete("NetworkPolicy", ns, run)


class KubeRayValidation:
    """Dataset validation as a batch/v1 Job that publishes its result into a ConfigMap."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def observe(self, dataset: Dataset, key: str) -> tuple[ValidationObservation, tuple[str, ...]]:
        ns = dataset.metadata.namespace
        labels = {LABEL_DATASET: dataset.metadata.name, LABEL_NAME: "tailor-inspect"}
        config_maps = [c for c in self.cluster.list("ConfigMap", ns, labels) if _owned_by(c, dataset.metadata.uid)]
        mine = next((c for c in config_maps if c["metadata"]["name"] == key), None)
        others = tuple(sorted(c["metadata"]["name"] for c in config_maps if c["metadata"]["name"] != key))
        if mine is not None and ((mine.get("data") or {}).get(RESULT_KEY)):
            return observe_inspect(key, config_map=mine, job=None), others
        job = self.cluster.get("Job", ns, key) if mine is not None else None
        # still running: its pod may be waiting for something only the user can fix (a Secret)
        pods = self.cluster.list("Pod", ns, {"job-name": key}) if job is not None else None
        return observe_inspect(key, config_map=mine, job=job, pods=pods), others

    def start(self, dataset: Dataset, action: StartValidation) -> None:
        for child in action.children:
            self.cluster.create_or_adopt(child)

    def delete(self, dataset: Dataset, key: str) -> None:
        ns = dataset.metadata.namespace
        self.cluster.delete("Job", ns, key)
        self.cluster.delete("ConfigMap", ns, key)

    def cleanup(self, namespace: str, name: str) -> None:
        """Owner references remove these with the Dataset; nothing to do eagerly."""


class KubeRayPreflight:
    """A FineTuneJob's model check (builders/preflight_job.py): a batch/v1 Job that publishes its
    verdict into a ConfigMap, observed like a Dataset validation."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def observe(self, job: FineTuneJob, key: str) -> tuple[Optional[ValidationObservation], tuple[str, ...]]:
        """The check named `key` (None when it does not exist) and the names of older ones."""
        ns = job.metadata.namespace
        config_maps = [c for c in self.cluster.list("ConfigMap", ns, preflight_labels(job.metadata.name))
                       if _owned_by(c, job.metadata.uid)]
        mine = next((c for c in config_maps if c["metadata"]["name"] == key), None)
        others = tuple(sorted(c["metadata"]["name"] for c in config_maps if c["metadata"]["name"] != key))
        if mine is None:
            return None, others
        if (mine.get("data") or {}).get(RESULT_KEY):
            return observe_inspect(key, config_map=mine, job=None), others
        check = self.cluster.get("Job", ns, key)
        pods = self.cluster.list("Pod", ns, {"job-name": key}) if check is not None else None
        return observe_inspect(key, config_map=mine, job=check, pods=pods), others

    def start(self, action: StartPreflight) -> None:
        for child in action.children:
            self.cluster.create_or_adopt(child)

    def delete(self, namespace: str, key: str) -> None:
        self.cluster.delete("Job", namespace, key)
        self.cluster.delete("ConfigMap", namespace, key)
