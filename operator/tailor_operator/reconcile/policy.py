"""What an installation lets its tenants ask for: backends, trainer images, local paths, addresses.

Tenants (whoever may create Datasets and FineTuneJobs in a watched namespace) are not trusted with
the operator's own identity: the local backend runs the trainer inside the operator's pod, an
image of their choice would run with the trainer's ServiceAccount, a local path reads whatever
the pod that opens it can read, and an http(s) source on a link-local, loopback or metadata
address reaches the node's or the cloud's internals. Each check here is syntactic and pure; the
trainer repeats the address check on the addresses a host name resolves to (tailor_trainer.netpolicy).
A refusal names the field and the chart value that decides it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Optional

from tailor_operator.api.v1alpha1 import Backend, Dataset, FineTuneJob
from tailor_operator.builders.labels import ANNOTATION_BACKEND
from tailor_operator.reconcile.settings import OperatorSettings
from tailor_trainer.netpolicy import blocked_host, uri_host

POLICY_VIOLATION = "PolicyViolation"
ANY_ROOT = "*"


@dataclass(frozen=True)
class PolicyProblem:
    field: str
    message: str
    reason: str = POLICY_VIOLATION


def local_path(uri: Optional[str]) -> Optional[str]:
    """The path of a file:// or bare-path URI (what a pod or subprocess would open), else None."""
    if not uri:
        return None
    if uri.startswith("file://"):
        return uri[len("file://"):] or "/"
    return None if "://" in uri else uri


def path_allowed(uri: Optional[str], settings: OperatorSettings) -> bool:
    """A URI that is not a local path, or a local path under one of the allowed roots ("*": any;
    otherwise absolute roots, and only absolute paths that stay under one after normalising)."""
    path = local_path(uri)
    if path is None:
        return True
    roots = settings.local_roots()
    if ANY_ROOT in roots:
        return True
    if not path.startswith("/"):
        return False
    normal = posixpath.normpath(path)
    return any(normal == root or normal.startswith(root.rstrip("/") + "/") for root in roots)


def _local_root_problem(field: str, uri: Optional[str], settings: OperatorSettings) -> Optional[PolicyProblem]:
    if path_allowed(uri, settings):
        return None
    roots = settings.local_roots()
    allowed = (f"allows local paths only under: {', '.join(roots)}" if roots
               else "allows no local paths")
    return PolicyProblem(field, f"{field} {uri!r} is a local path; the installation {allowed} "
                                "(chart value policy.allowedLocalRoots); use pvc://<claim>/<path>, s3:// or hf://")


def _backend_problem(field: str, backend: Backend, settings: OperatorSettings) -> Optional[PolicyProblem]:
    allowed = settings.backends()
    if backend.value in allowed:
        return None
    return PolicyProblem(field, f"{field} {backend.value} is not allowed: the installation allows backends: "
                                f"{', '.join(allowed) or 'none'} (chart value policy.allowedBackends)")


def _image_problem(image: Optional[str], settings: OperatorSettings) -> Optional[PolicyProblem]:
    field = "spec.resources.image"
    if not image:
        return None
    if not settings.allow_image_override:
        return PolicyProblem(field, f"{field} {image!r} is not allowed: the installation runs every job with its "
                                    "own trainer image (chart value policy.allowImageOverride is false)")
    prefixes = settings.image_prefixes()
    if prefixes and not any(image.startswith(p) for p in prefixes):
        return PolicyProblem(field, f"{field} {image!r} is not allowed: the installation allows images starting "
                                    f"with: {', '.join(prefixes)} (chart value policy.allowedImagePrefixes)")
    return None


def _address_problem(field: str, uri: Optional[str], settings: OperatorSettings) -> Optional[PolicyProblem]:
    if settings.allow_private_addresses or not uri or not uri.startswith(("http://", "https://")):
        return None
    host = uri_host(uri)
    why = blocked_host(host)
    if why is None:
        return None
    return PolicyProblem(field, f"{field}: host {host} is {why}, which the installation does not let sources "
                                "reach (chart value policy.allowPrivateAddresses)")


def check_job_policy(job: FineTuneJob, settings: OperatorSettings) -> Optional[PolicyProblem]:
    """The first policy a FineTuneJob's spec breaks, else None."""
    spec = job.spec
    return (_backend_problem("spec.backend", spec.backend, settings)
            or _image_problem(spec.resources.image if spec.resources else None, settings)
            or _local_root_problem("spec.baseModel.uri", spec.base_model.uri, settings)
            or _local_root_problem("spec.output.uri", spec.output.uri, settings))


def check_dataset_policy(dataset: Dataset, backend: Backend, settings: OperatorSettings) -> Optional[PolicyProblem]:
    """The first policy a Dataset breaks, else None. `backend` is where its validation would run;
    the installation's own default (settings.dataset_backend) is always allowed, the annotation
    may pick only an allowed one."""
    uri = dataset.spec.source.uri
    problem = None
    if backend is not settings.dataset_backend:
        problem = _backend_problem(f"metadata.annotations[{ANNOTATION_BACKEND}]", backend, settings)
    return (problem
            or _local_root_problem("spec.source.uri", uri, settings)
            or _address_problem("spec.source.uri", uri, settings))
