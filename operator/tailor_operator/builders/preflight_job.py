"""Pure: check the base model against the spec on a CPU before any GPU is requested.

For the kuberay backend the operator cannot read most models itself (hf://, s3://, a PVC), so a
small batch/v1 Job of the trainer image runs `python -m tailor_trainer preflight` on the job's
TrainerConfig: it fetches the model's config and tokenizer (never the weights), builds the model on
the meta device and checks target modules, frozen/unfrozen modules and maxSeqLength — the checks
the adapt stage would otherwise make on GPU nodes. The result lands in ConfigMap `<key>` under
`status.json`, like a Dataset validation's. One check per (model, adaptation, sequence length,
image): a new Dataset revision does not check again; a spec edit that changes any of them does.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import FineTuneJob
from tailor_operator.builders.configmaps import CONFIG_KEY, render_config
from tailor_operator.builders.inspect_job import (
    MOUNT,
    PUBLISH_KEY,
    PUBLISH_SCRIPT,
    InspectJobOptions,
    build_cpu_check_job,
)
from tailor_operator.builders.labels import LABEL_JOB, LABEL_NAME, MANAGED_BY, MANAGER, object_meta
from tailor_operator.builders.naming import safe_name
from tailor_operator.builders.rayjob import pvc_claim
from tailor_trainer.config import TrainerConfig

NAME = "tailor-preflight"
COMMAND = (
    f"python -m tailor_trainer preflight --config {MOUNT}/{CONFIG_KEY} --result-file /tmp/status.json; rc=$?; "
    f'if [ -s /tmp/status.json ]; then python {MOUNT}/{PUBLISH_KEY} "$TAILOR_RESULT_CONFIGMAP" '
    "/tmp/status.json && exit 0; fi; exit $rc"
)


def preflight_key(job: FineTuneJob, image: str) -> str:
    """`<job>-m<hash>`: what the check depends on, nothing else (deterministic)."""
    spec = job.spec
    basis = {
        "model": spec.base_model.model_dump(by_alias=True, mode="json", exclude_none=True),
        "adaptation": spec.adaptation.model_dump(by_alias=True, mode="json", exclude_none=True),
        "maxSeqLength": spec.hyperparameters.max_seq_length,
        "image": spec.resources.image or image,
    }
    digest = hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:8]
    return safe_name(f"{job.metadata.name}-m", digest)


def preflight_labels(job: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGER, LABEL_JOB: job, LABEL_NAME: NAME}


def build_preflight_config_map(job: FineTuneJob, key: str, config: TrainerConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(key, job.metadata.namespace, preflight_labels(job.metadata.name), job),
        "data": {CONFIG_KEY: render_config(config), PUBLISH_KEY: PUBLISH_SCRIPT},
    }


def build_preflight_job(job: FineTuneJob, key: str, options: InspectJobOptions) -> dict[str, Any]:
    """The batch/v1 Job `<key>`: the model's Secret in its environment, a PVC model mounted."""
    model = job.spec.base_model
    secrets = [model.secret_ref.name] if model.secret_ref else []
    claim: Optional[str] = pvc_claim(model.uri)
    return build_cpu_check_job(key, job.metadata.namespace, preflight_labels(job.metadata.name), job, "preflight",
                               COMMAND, options, image=job.spec.resources.image, secrets=secrets,
                               claims=[claim] if claim else [])
