"""image-caption Datasets: what a diffusion run cannot honour is rejected up front naming the field;
LoRA target modules are checked against the UNet before any training; the example manifest is
valid; a Dataset folder with a bad image is reported by file name through `inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tailor_trainer._base import error_path
from tailor_trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
TINY_SD = ROOT / "examples" / "models" / "tailor-tiny-sd"


def _config(**over) -> dict:
    body = {
        "run": {"job": "j", "name": "j-r1"}, "model": {"uri": str(TINY_SD)},
        "dataset": {"source": {"uri": "examples/data/striped-shapes"}, "schema": "image-caption"},
        "evaluation": {"metrics": ["loss"]}, "outputUri": "/tmp/x",
    }
    for key, value in over.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return body


def test_a_minimal_image_config_is_valid():
    cfg = TrainerConfig.model_validate(_config())
    assert cfg.dataset.schema_.value == "image-caption"


@pytest.mark.parametrize("over, field", [
    ({"adaptation": {"method": "dora"}}, "adaptation.method"),
    ({"evaluation": {"metrics": ["loss", "perplexity"]}}, "evaluation.metrics"),
    ({"evaluation": {"crossValidation": {"folds": 3}}}, "evaluation.crossValidation"),
    ({"evaluation": {"gates": [{"metric": "accuracy", "min": 0.1}]}}, "evaluation.gates[0].metric"),
    ({"hyperparameters": {"packing": True}}, "hyperparameters.packing"),
    ({"mergedModel": True}, "mergedModel"),
    ({"dataset": {"preprocessing": {"dedupe": "near"}}}, "dataset.preprocessing.dedupe"),
])
def test_unsupported_settings_are_rejected_naming_the_field(over, field):
    with pytest.raises(ValidationError) as e:
        TrainerConfig.model_validate(_config(**over))
    first = e.value.errors()[0]
    assert ".".join(str(p) for p in error_path(first)) == field
    assert "image-caption" in str(e.value)


def test_example_manifest_is_valid_for_the_api_and_the_trainer():
    yaml = pytest.importorskip("yaml")
    from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob

    docs = list(yaml.safe_load_all((ROOT / "examples" / "image-quickstart.yaml").read_text()))
    ds = Dataset.model_validate(next(d for d in docs if d["kind"] == "Dataset"))
    job = FineTuneJob.model_validate(next(d for d in docs if d["kind"] == "FineTuneJob"))
    assert ds.spec.schema_.value == "image-caption"
    assert job.spec.adaptation.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.skipif(not (TINY_SD / "model_index.json").exists(), reason="tailor-tiny-sd not built")
def test_target_modules_are_checked_against_the_unet_up_front():
    pytest.importorskip("diffusers")
    from tailor_trainer.config import LoraConfig
    from tailor_trainer.diffusion.model import add_lora, load_parts
    from tailor_trainer.errors import InvalidSpec

    unet = load_parts(str(TINY_SD), meta=True).unet
    with pytest.raises(InvalidSpec) as e:
        add_lora(unet, LoraConfig(target_modules=["to_q", "q_proj"]))
    assert e.value.field == "spec.adaptation.lora.targetModules"
    assert "'q_proj'" in e.value.message and "to_k" in e.value.message  # lists what exists
    plan = add_lora(load_parts(str(TINY_SD), meta=True).unet, None)  # default: the attention projections
    assert plan["targetModules"] == ["to_q", "to_k", "to_v", "to_out.0"] and plan["adaptedModules"] > 0


def test_inspect_reports_a_bad_image_by_file_name(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from tailor_trainer.stages.prep import main_inspect

    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n....")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a"}) + "\n" + json.dumps({"file_name": "broken.png", "text": "b"}) + "\n")
    spec = tmp_path / "ds.json"
    spec.write_text(json.dumps({"source": {"uri": str(tmp_path)}, "schema": "image-caption",
                                "preprocessing": {"maxBadFraction": 0.5}}))
    out = tmp_path / "status.json"
    assert main_inspect(str(spec), result_file=str(out)) == 0
    status = json.loads(out.read_text())
    assert status["dropped"] == {"corruptImage": 1}
    assert status["firstErrors"][0]["file"] == "broken.png"


@pytest.mark.skipif(not (TINY_SD / "model_index.json").exists(), reason="tailor-tiny-sd not built")
def test_preflight_checks_a_diffusion_pipeline_without_weights():
    pytest.importorskip("diffusers")
    from tailor_trainer.preflight import run_preflight

    bad = run_preflight(TrainerConfig.model_validate(_config(adaptation={"lora": {"targetModules": ["q_proj"]}})))
    assert not bad["ok"] and bad["reason"] == "UnknownTargetModules"
    assert bad["field"] == "spec.adaptation.lora.targetModules"
    good = run_preflight(TrainerConfig.model_validate(_config()))
    assert good["ok"] and good["model"]["targetModulesMatched"] > 0, good
