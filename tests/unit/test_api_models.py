"""The API models: invalid specs rejected naming the field, defaults, lossless round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tailor_operator.api.v1alpha1 import (
    Dataset,
    FineTuneJob,
    FineTuneJobSpec,
    Phase,
    parse_object,
)
from tailor_operator.validation import field_path, message_for
from tailor_trainer._base import error_path
from tailor_trainer.config import AdaptationMethod, Metric

ROOT = Path(__file__).resolve().parents[2]
ROWS = yaml.safe_load((ROOT / "tests/data/invalid_specs.yaml").read_text())


def _obj(row: dict) -> dict:
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": row["kind"],
        "metadata": {"name": "x"},
        "spec": row["spec"],
    }


def test_table_is_big_enough() -> None:
    assert len(ROWS) >= 25
    assert len({r["name"] for r in ROWS}) == len(ROWS), "row names must be unique"


@pytest.mark.parametrize("row", ROWS, ids=[r["name"] for r in ROWS])
def test_invalid_spec_is_rejected_naming_the_field(row: dict) -> None:
    with pytest.raises(ValidationError) as info:
        parse_object(_obj(row))
    errors = info.value.errors()
    rendered = [f"{field_path(error_path(e))}: {message_for(e)}" for e in errors]
    expected = row["field"]
    parent, _, leaf = expected.rpartition(".")
    leaf = leaf.split("[")[0]
    # The error's path is the field itself, or (for a cross-field check) a sibling field of
    # the same object whose message names the expected field too.
    assert any(
        r.startswith(expected + ":") or (r.startswith(expected + ".") and leaf in r)
        or (r.startswith(parent + ".") and leaf in r)
        for r in rendered
    ), f"no error names {expected}: {rendered}"


def _minimal_job() -> dict:
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "team"},
        "spec": {
            "baseModel": {"uri": "hf://org/model"},
            "datasetRef": {"name": "d"},
            "output": {"uri": "s3://bucket/out"},
        },
    }


def test_defaults_are_filled_as_documented() -> None:
    job = FineTuneJob.model_validate(_minimal_job())
    spec = job.spec
    assert spec.adaptation.method is AdaptationMethod.lora
    assert spec.adaptation.lora_or_default.r == 8
    assert spec.adaptation.lora_or_default.alpha == 16
    hp = spec.hyperparameters
    assert (hp.learning_rate, hp.batch_size, hp.gradient_accumulation_steps) == (2e-4, 8, 1)
    assert hp.epochs is None and hp.max_steps is None and hp.epochs_or_default == 1.0
    assert (hp.max_seq_length, hp.seed, hp.checkpoint_every_steps) == (512, 42, 100)
    assert spec.evaluation.metrics == [Metric.loss, Metric.perplexity, Metric.accuracy]
    assert spec.evaluation.compare_to_base is True
    assert spec.resources.workers == 1 and spec.resources.gpus_per_worker == 1
    assert spec.backend.value == "kuberay"
    assert spec.backoff_limit == 2 and spec.suspend is False
    ds = Dataset.model_validate({
        "apiVersion": "tailor.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "d"},
        "spec": {"source": {"uri": "s3://b/k.jsonl"}},
    })
    pre = ds.spec.preprocessing
    assert pre.dedupe.value == "exact" and pre.max_bad_fraction == 0.01 and pre.min_chars == 1
    assert (ds.spec.split.validation, ds.spec.split.test, ds.spec.split.seed) == (0.1, 0.1, 42)
    assert ds.spec.schema_.value == "text"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_round_trip_is_lossless(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or not str(doc.get("apiVersion", "")).startswith("tailor.dev/"):
            continue
        model = parse_object(doc)
        wire = model.model_dump(by_alias=True, mode="json")
        again = type(model).model_validate(wire)
        assert again == model
        assert again.model_dump(by_alias=True, mode="json") == wire
        # What the user wrote survives unchanged (nothing renamed or dropped).
        written = model.model_dump(by_alias=True, mode="json", exclude_unset=True)
        assert written["spec"] == doc["spec"]


def test_secret_values_cannot_be_written_anywhere() -> None:
    job = _minimal_job()
    job["spec"]["baseModel"]["secretRef"] = {"name": "hf", "token": "hf_abc"}
    with pytest.raises(ValidationError, match="secretRef.token|token"):
        FineTuneJob.model_validate(job)


def test_learning_rate_must_be_finite() -> None:
    spec = _minimal_job()["spec"]
    spec["hyperparameters"] = {"learningRate": float("inf")}
    with pytest.raises(ValidationError):
        FineTuneJobSpec.model_validate(spec)


def test_phase_knows_its_properties() -> None:
    assert Phase.succeeded.is_terminal and Phase.failed.is_terminal
    assert not Phase.running.is_terminal and Phase.running.is_active
    assert not Phase.suspended.is_active


def _undocumented(node: dict, path: str) -> list[str]:
    missing = []
    for name, prop in (node.get("properties") or {}).items():
        here = f"{path}.{name}"
        if not prop.get("description"):
            missing.append(here)
        missing += _undocumented(prop, here)
        if "items" in prop:
            missing += _undocumented(prop["items"], f"{here}[]")
    return missing


def test_every_status_field_has_a_description_for_kubectl_explain() -> None:
    from tailor_operator.crdgen import build_crds

    for name, crd in build_crds().items():
        status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert _undocumented(status, f"{name}.status") == []
