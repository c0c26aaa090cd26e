"""Pure: the ConfigMaps of a run (trainer config when too large for the RayJob, progress sink owner)."""

from __future__ import annotations

import json
from typing import Any

from tailor_operator.api.v1alpha1 import FineTuneJob
from tailor_operator.builders.labels import ANNOTATION_ATTEMPT, object_meta, run_labels
from tailor_operator.builders.naming import config_map_name, progress_config_map_name
from tailor_trainer.config import TrainerConfig

CONFIG_KEY = "config.json"


def render_config(config: TrainerConfig) -> str:
    """config.json exactly as the trainer reads it (stable key order, so reruns compare equal)."""
    return json.dumps(config.model_dump(by_alias=True, mode="json", exclude_none=True),
                      indent=2, sort_keys=True)


def build_config_map(job: FineTuneJob, run: str, config: TrainerConfig) -> dict[str, Any]:
    """`<run>-config` with key config.json, mounted read-only at /etc/tailor in every Ray pod."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(config_map_name(run), job.metadata.namespace,
                                run_labels(job.metadata.name, run), job,
                                {ANNOTATION_ATTEMPT: str(config.run.attempt)}),
        "data": {CONFIG_KEY: render_config(config)},
    }


def progress_owner_patch(job: FineTuneJob, run: str) -> dict[str, Any]:
    """Merge patch that makes the job the owner of `<run>-progress`. The trainer creates that
    ConfigMap on its first report (the operator no longer creates it ahead of the run: one write
    less per job before it runs); the operator adds itself as owner when it first reads it, so
    deleting the job removes it (the trainer's own updates leave labels and owner alone)."""
    meta = object_meta(progress_config_map_name(run), job.metadata.namespace, run_labels(job.metadata.name, run), job)
    return {"metadata": {"labels": meta["labels"], "ownerReferences": meta["ownerReferences"]}}
