"""Golden manifests from the pure builders: tests/data/{rayjob,inspect,promotion}-<case>/.

`rayjob-*`: input {job, dataset, run, number, attempt, datasetRevision, options} -> the run's
children (config ConfigMap, progress ConfigMap, RayJob). `inspect-*`: a Dataset -> validation
ConfigMap + Job. `promotion-*`: a rollout target -> ConfigMap body / InferenceService patch.
The integration suite applies the RayJob golden to the real KubeRay CRD.

Regenerate with `TAILOR_UPDATE_GOLDENS=1 pytest tests/unit/test_builders.py` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob, RolloutTarget
from tailor_operator.builders.configmaps import build_config_map, render_config
from tailor_operator.builders.inspect_job import InspectJobOptions, build_inspect_config_map, build_inspect_job
from tailor_operator.builders.naming import run_name, safe_name
from tailor_operator.builders.promotion import build_inference_service_patch, build_target_config_map
from tailor_operator.builders.rayjob import INLINE_CONFIG_MAX_BYTES, RayJobOptions, build_rayjob, config_inline
from tailor_operator.builders.trainer_config import build_trainer_config
from tailor_operator.reconcile.dataset import resolved_dataset, validation_key

DATA = Path(__file__).resolve().parents[1] / "data"
UPDATE = os.environ.get("TAILOR_UPDATE_GOLDENS") == "1"


def _cases(prefix: str) -> list[Path]:
    return sorted(p for p in DATA.glob(f"{prefix}-*") if (p / "input.yaml").is_file())


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (config.json, scripts) as literal blocks, so goldens read like kubectl."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _check(case: Path, got: Any) -> None:
    path = case / "expected.yaml"
    if UPDATE or not path.exists():
        docs = got if isinstance(got, list) else [got]
        path.write_text(yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=110))
        if not UPDATE:
            pytest.fail(f"wrote missing {path}; review it and rerun")
    expected = list(yaml.safe_load_all(path.read_text()))
    assert (got if isinstance(got, list) else [got]) == expected


def run_children(doc: dict[str, Any]) -> list[dict[str, Any]]:
    job = FineTuneJob.model_validate(doc["job"])
    dataset = Dataset.model_validate(doc["dataset"])
    run, attempt = doc["run"], doc.get("attempt", 1)
    config = build_trainer_config(job, dataset, run, attempt=attempt, dataset_revision=doc.get("datasetRevision"),
                                  inline_data=doc.get("inlineData"))
    rendered = render_config(config)
    inline = config_inline(rendered)  # as reconcile_finetunejob decides
    rayjob = build_rayjob(job, dataset, run, number=doc.get("number", 1), attempt=attempt,
                          dataset_revision=doc.get("datasetRevision"), config_hash=config.config_hash(),
                          options=RayJobOptions(**(doc.get("options") or {})),
                          config_json=rendered if inline else None)
    return [rayjob] if inline else [build_config_map(job, run, config), rayjob]


@pytest.mark.parametrize("case", _cases("rayjob"), ids=lambda p: p.name)
def test_rayjob_golden(case: Path) -> None:
    _check(case, run_children(yaml.safe_load((case / "input.yaml").read_text())))


@pytest.mark.parametrize("case", _cases("inspect"), ids=lambda p: p.name)
def test_inspect_job_golden(case: Path) -> None:
    from datetime import datetime

    doc = yaml.safe_load((case / "input.yaml").read_text())
    dataset = Dataset.model_validate(doc["dataset"])
    now = datetime.fromisoformat(doc["now"].replace("Z", "+00:00"))
    key = validation_key(dataset, doc.get("fingerprint"), now)
    resolved = resolved_dataset(dataset, doc.get("fingerprint"), doc.get("inlineData"))
    _check(case, [build_inspect_config_map(dataset, key, resolved),
                  build_inspect_job(dataset, key, InspectJobOptions(**(doc.get("options") or {})))])


@pytest.mark.parametrize("case", _cases("promotion"), ids=lambda p: p.name)
def test_promotion_golden(case: Path) -> None:
    doc = yaml.safe_load((case / "input.yaml").read_text())
    job = FineTuneJob.model_validate(doc["job"])
    target = RolloutTarget.model_validate(doc["target"])
    if target.config_map is not None:
        got = build_target_config_map(job, target, doc["run"], doc["modelUri"])
    else:
        got = build_inference_service_patch(doc["run"], doc["modelUri"])
    _check(case, got)


# ------------------------------------------------------------------------------ properties


def _gpu_case() -> dict[str, Any]:
    return yaml.safe_load((DATA / "rayjob-gpu-workers" / "input.yaml").read_text())


def test_rayjob_references_secrets_but_never_copies_values() -> None:
    doc = _gpu_case()
    children = run_children(doc)
    text = json.dumps(children)
    rayjob = children[-1]
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    # environment only: no Secret volume, so no file a Dataset's source.uri could name
    assert not [v for v in worker["volumes"] if "secret" in v]
    assert {e["secretRef"]["name"] for e in worker["containers"][0]["envFrom"]} == {"hf-token", "s3-credentials"}
    assert "stringData" not in text and '"data": {"AWS' not in text


def test_rayjob_labels_owner_and_kueue() -> None:
    rayjob = run_children(_gpu_case())[-1]
    meta = rayjob["metadata"]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "tailor"
    assert meta["labels"]["tailor.dev/finetunejob"] == "support-llama"
    assert meta["labels"]["tailor.dev/run"] == "support-llama-r1"
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-ml"
    owner = meta["ownerReferences"][0]
    assert owner["kind"] == "FineTuneJob" and owner["controller"] is True
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 0
    assert spec["entrypoint"] == "python -m tailor_trainer run --config /etc/tailor/config.json"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def _config_volumes(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]]
    return [next(v for v in t["spec"]["volumes"] if v["name"] == "tailor-config") for t in templates]


def test_config_rides_on_the_rayjob_and_is_mounted_where_the_trainer_reads_it() -> None:
    """One create starts a run: config.json is an annotation of the head and worker pod templates,
    projected by the downward API to /etc/tailor/config.json, byte for byte what a ConfigMap held."""
    doc = _gpu_case()
    [rayjob] = run_children(doc)
    job, dataset = FineTuneJob.model_validate(doc["job"]), Dataset.model_validate(doc["dataset"])
    config = build_trainer_config(job, dataset, doc["run"], attempt=1, dataset_revision=doc.get("datasetRevision"))
    cluster = rayjob["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert template["metadata"]["annotations"]["tailor.dev/config"] == render_config(config)
        mount = next(m for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] == "tailor-config")
        assert mount["mountPath"] == "/etc/tailor" and mount["readOnly"] is True
    for volume in _config_volumes(rayjob):
        assert volume["downwardAPI"]["items"] == [
            {"path": "config.json", "fieldRef": {"fieldPath": "metadata.annotations['tailor.dev/config']"}}]
    assert "annotations" not in rayjob["spec"]["submitterPodTemplate"]["metadata"]  # it reads no config


def test_a_config_too_large_for_annotations_goes_into_a_configmap() -> None:
    doc = _gpu_case()
    doc["inlineData"] = '{"instruction": "x", "output": "y"}\n' * (INLINE_CONFIG_MAX_BYTES // 30)
    config_map, rayjob = run_children(doc)
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["name"] == f"{doc['run']}-config"
    assert len(config_map["data"]["config.json"].encode()) > INLINE_CONFIG_MAX_BYTES
    assert all(v == {"name": "tailor-config", "configMap": {"name": f"{doc['run']}-config"}}
               for v in _config_volumes(rayjob))
    cluster = rayjob["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert "annotations" not in template["metadata"]


def test_build_is_deterministic() -> None:
    assert run_children(_gpu_case()) == run_children(_gpu_case())


@pytest.mark.parametrize("length", [20, 44, 45, 60, 200])
def test_run_names_are_length_safe_and_distinct(length: int) -> None:
    job = "j" * length
    names = {run_name(job, n) for n in range(1, 30)}
    assert len(names) == 29
    for name in names:
        assert len(name) <= 47
        assert safe_name(name, "-progress").endswith("-progress")
        assert len(safe_name(name, "-progress")) <= 63


def test_run_network_policy_admits_only_the_run_and_the_installations_rules() -> None:
    from tailor_operator.builders.networkpolicy import DEFAULT_INGRESS, build_run_network_policy
    from tailor_operator.reconcile.settings import OperatorSettings

    doc = _gpu_case()
    job = FineTuneJob.model_validate(doc["job"])
    policy = build_run_network_policy(job, "support-llama-r1")
    rayjob = run_children(doc)[-1]
    pod_labels = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    # it selects exactly the pods KubeRay creates for this run (head, workers; the submitter too)
    assert spec["podSelector"] == {"matchLabels": {"tailor.dev/run": "support-llama-r1"}}
    assert pod_labels["tailor.dev/run"] == "support-llama-r1"
    submitter = rayjob["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert submitter["tailor.dev/run"] == "support-llama-r1"
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"][0] == {"from": [{"podSelector": {"matchLabels": {"tailor.dev/run": "support-llama-r1"}}}]}
    # the KubeRay operator may reach the dashboard port only; nothing else from outside the run
    assert spec["ingress"][1:] == list(DEFAULT_INGRESS)
    assert spec["ingress"][1]["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    # the installation replaces the extra rules (JSON, checked at start-up)
    prom = [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
             "ports": [{"port": 8080}]}]
    settings = OperatorSettings(ray_network_policy_ingress=json.dumps(prom))
    assert build_run_network_policy(job, "r", settings.network_policy_ingress())["spec"]["ingress"][1:] == prom
    with pytest.raises(ValueError, match="ray_network_policy_ingress"):
        OperatorSettings(ray_network_policy_ingress='{"from": []}')


def test_run_directory_carries_namespace_and_job_uid() -> None:
    from tailor_operator.builders.trainer_config import run_output_uri

    doc = _gpu_case()["job"]

    def job(namespace: str, uid: str | None) -> FineTuneJob:
        meta = {**doc["metadata"], "namespace": namespace, "uid": uid}
        return FineTuneJob.model_validate({**doc, "metadata": meta})

    first = run_output_uri(job("team-ml", "7b0c6a52-1111-4000-8000-000000000001"), "support-llama-r1")
    assert first == "s3://acme-ml-models/support/team-ml/support-llama-7b0c6a52/support-llama-r1"
    # the same name recreated (new UID), or in another namespace: another directory, nothing shared
    recreated = run_output_uri(job("team-ml", "90aa0000-2222-4000-8000-000000000002"), "support-llama-r1")
    other_ns = run_output_uri(job("team-b", "7b0c6a52-1111-4000-8000-000000000001"), "support-llama-r1")
    assert len({first, recreated, other_ns}) == 3
    # no API server (`tailor run`): the name alone, so running the manifest again resumes
    assert run_output_uri(job("default", None), "support-llama-r1").endswith("/default/support-llama/support-llama-r1")
