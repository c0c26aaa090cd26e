"""Diffusion LoRA end to end on the shipped tiny SD pipeline: ``python -m tailor_trainer run`` (as the
RayJob starts it) killed after a checkpoint resumes there, the step count continues, and the adapter
equals an uninterrupted run's; the adapter is a standard diffusers LoRA that ``load_lora_weights``
puts on the base pipeline, which then generates; evaluate scores base and fine-tuned on the same
rows and noise (and a champion, loaded from its adapter) and embeds before/after grids in the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("ray.train")

ROOT = Path(__file__).resolve().parents[2]
TINY_SD = ROOT / "examples" / "models" / "tailor-tiny-sd"
DATA = ROOT / "examples" / "data" / "striped-shapes"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (TINY_SD / "model_index.json").exists(), reason="tailor-tiny-sd not built")]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "TAILOR_RAY_LOCAL_MODE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TAILOR_FAULT_EXIT_AFTER_CHECKPOINT", None)
    env.update(extra)
    return env


def _body(tmp: Path, rows: int = 48) -> dict:
    data = tmp / "data"
    data.mkdir()
    with open(DATA / "metadata.jsonl") as src, open(data / "metadata.jsonl", "w") as dst:
        for line in list(src)[:rows]:
            shutil.copy(DATA / json.loads(line)["file_name"], data)
            dst.write(line)
    return {
        "run": {"job": "striped", "name": "striped-r1"}, "model": {"uri": str(TINY_SD)},
        "dataset": {"name": "striped", "source": {"uri": str(data)}, "schema": "image-caption",
                    "split": {"validation": 0.1, "test": 0.2, "seed": 7}},
        "adaptation": {"method": "lora", "lora": {"r": 4, "alpha": 4, "dropout": 0.0}},
        "hyperparameters": {"learningRate": 2e-3, "batchSize": 4, "maxSteps": 6, "checkpointEverySteps": 2,
                            "seed": 7},
        "evaluation": {"metrics": ["loss"], "samplePrompts": ["a red circle on blue and white stripes"]},
        "resources": {"cpusPerWorker": 1},
        "outputUri": str(tmp / "run"), "progress": {"file": str(tmp / "progress.json")},
    }


def _run(config: Path, stages: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tailor_trainer", "run", "--config", str(config), "--stages", stages],
                          env=_env(**env), capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image-run")
    body = _body(tmp)
    config = tmp / "config.json"
    config.write_text(json.dumps(body))
    crashed = _run(config, "prep,adapt,train", TAILOR_FAULT_EXIT_AFTER_CHECKPOINT="4")
    assert crashed.returncode != 0, crashed.stderr[-3000:]
    assert (tmp / "run" / "train" / "checkpoints" / "step-4" / "manifest.json").exists()
    assert not (tmp / "run" / "train" / "manifest.json").exists()
    resumed = _run(config, "prep,adapt,train")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return tmp, body


def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_one(resumed_run, tmp_path):
    from safetensors.torch import load_file

    from tailor_trainer.config import TrainerConfig
    from tailor_trainer.data.images import load_split
    from tailor_trainer.diffusion.recipe import fit_diffusion

    tmp, body = resumed_run
    manifest = json.loads((tmp / "run" / "train" / "manifest.json").read_text())
    assert manifest["resumedFrom"] == 4 and manifest["steps"] == 6 and manifest["status"] == "completed"
    steps = [json.loads(ln)["step"] for ln in (tmp / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the step count continued; nothing logged twice
    prep = str(tmp / "run" / "prep")
    cfg = TrainerConfig.model_validate(body)
    fit_diffusion(cfg, str(TINY_SD), load_split(prep, "train"), load_split(prep, "validation"),
                  config_hash=cfg.config_hash(), train_dir=str(tmp_path), threads=1)
    name = "pytorch_lora_weights.safetensors"
    resumed = load_file(str(tmp / "run" / "train" / "model" / name))
    straight = load_file(str(tmp_path / "model" / name))
    assert resumed.keys() == straight.keys() and all(k.startswith("unet.") for k in resumed)
    for k in resumed:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


def test_adapter_loads_onto_the_base_pipeline_with_diffusers_and_generates(resumed_run):
    from diffusers import StableDiffusionPipeline

    tmp, _ = resumed_run
    adapter = tmp / "run" / "train" / "model"
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_SD), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a red circle on blue and white stripes", num_inference_steps=3, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    before = generate()
    pipe.load_lora_weights(str(adapter))
    after = generate()
    assert after.shape == (32, 32, 3) and (after >= 0).all() and (after <= 1).all()
    assert abs(after - before).max() > 1e-4  # the LoRA is active in the UNet


def test_evaluate_scores_base_tuned_and_champion_on_the_same_noise_and_embeds_grids(resumed_run):
    tmp, body = resumed_run
    config = tmp / "config-with-champion.json"
    # the champion is this run's own adapter: on the same rows and noise it must score the same
    champion = {"run": "striped-r0", "modelUri": str(tmp / "run" / "train" / "model"), "metrics": {"loss": 1.0}}
    config.write_text(json.dumps({**body, "champion": champion}))
    done = _run(config, "evaluate")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp / "run" / "evaluate" / "result.json").read_text())
    m = result["metrics"]
    assert 0 < m["loss"] < m["baseLoss"]  # lower denoising loss on held-out striped images
    assert result["champion"]["metrics"]["loss"] == pytest.approx(m["loss"], rel=1e-6)
    assert result["comparison"]["against"] == "striped-r0" and result["evaluatedOn"]["rows"] > 0
    report = (tmp / "run" / "evaluate" / "report.html").read_text()
    assert "a red circle on blue and white stripes" in report and report.count("data:image/png;base64,") >= 2
    assert (tmp / "run" / "evaluate" / "grid-0.png").stat().st_size > 0
    progress = json.loads((tmp / "progress.json").read_text())
    assert progress["result"]["metrics"]["baseLoss"] == m["baseLoss"]
