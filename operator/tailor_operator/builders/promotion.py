"""Pure: the patches that apply a promotion to its rollout target."""

from __future__ import annotations

from typing import Any, Optional

from tailor_operator.api.v1alpha1 import FineTuneJob, RolloutTarget
from tailor_operator.builders.labels import LABEL_JOB, MANAGED_BY, MANAGER

ANNOTATION_CHAMPION = "tailor.dev/champion-run"
ISVC_API_VERSION = "serving.kserve.io/v1beta1"


def build_target_config_map(job: FineTuneJob, target: RolloutTarget, run: str, model_uri: str) -> dict[str, Any]:
    """The target ConfigMap as a merge patch / create body: only our key changes, other keys stay.
    Not owned by the job: serving reads it, and it must outlive the FineTuneJob."""
    assert target.config_map is not None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": target.config_map.name,
            "namespace": job.metadata.namespace,
            "labels": {MANAGED_BY: MANAGER, LABEL_JOB: job.metadata.name},
            "annotations": {ANNOTATION_CHAMPION: run},
        },
        "data": {target.config_map.key: model_uri},
    }


def build_inference_service_patch(run: str, model_uri: str, canary_traffic_percent: Optional[int] = None,
                                  manage_canary: bool = False) -> dict[str, Any]:
    """JSON merge patch for a KServe InferenceService (v1beta1): the predictor's model storageUri.
    With `manage_canary` (a staged rollout), also spec.predictor.canaryTrafficPercent: the canary's
    share, or null (removed: KServe sends all traffic to the latest ready revision)."""
    predictor: dict[str, Any] = {"model": {"storageUri": model_uri}}
    if manage_canary:
        predictor["canaryTrafficPercent"] = canary_traffic_percent
    return {
        "metadata": {"annotations": {ANNOTATION_CHAMPION: run}},
        "spec": {"predictor": predictor},
    }
