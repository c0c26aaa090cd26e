"""GPU checks of the train stage (skipped without CUDA): bf16 LoRA and full training on one GPU,
QLoRA's 4-bit base, and two-GPU DDP over NCCL when two GPUs are visible. Tiny models, seconds."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)"),
]


def _ctx(tmp_path, model_dir, adaptation: dict, resources: dict, precision: str = "bf16"):
    from tailor_trainer.config import TrainerConfig
    from tailor_trainer.stages import StageContext

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w} {i}:", "completion": f" {w}"}) + "\n"
                            for i, w in enumerate(["red", "blue", "green", "gold"] * 10)))
    cfg = TrainerConfig.model_validate({
        "run": {"job": "gpu", "name": "gpu-r1"}, "model": {"uri": str(model_dir)},
        "dataset": {"source": {"uri": str(data)}, "schema": "completion"},
        "adaptation": adaptation, "resources": resources,
        "hyperparameters": {"learningRate": 1e-3, "batchSize": 4, "maxSteps": 4, "maxSeqLength": 64,
                            "precision": precision, "checkpointEverySteps": 2},
        "outputUri": str(tmp_path / "run")})
    return StageContext(config=cfg, run_dir=str(tmp_path / "run"), config_hash=cfg.config_hash(),
                        model_dir=str(model_dir))


def _train(ctx):
    from tailor_trainer.stages.prep import run_prep
    from tailor_trainer.stages.train import run_train

    run_prep(ctx.config, ctx.run_dir)
    return run_train(ctx)


@pytest.mark.parametrize("adaptation", [{"method": "lora"}, {"method": "full"}])
def test_bf16_training_on_one_gpu(tmp_path, tiny_model_dir, adaptation, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = _train(_ctx(tmp_path, tiny_model_dir, adaptation, {"workers": 1, "gpusPerWorker": 1}))
    assert out["device"].startswith("cuda") and out["status"] == "completed" and out["steps"] == 4
    assert out["trainLoss"] is not None and out["trainLoss"] == out["trainLoss"]  # finite, not NaN


def test_qlora_trains_lora_on_a_4bit_base(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = _train(_ctx(tmp_path, tiny_model_dir, {"method": "qlora"}, {"workers": 1, "gpusPerWorker": 1}))
    assert out["status"] == "completed" and out["trainableParameters"] < out["totalParameters"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_workers_ddp_over_nccl(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = _train(_ctx(tmp_path, tiny_model_dir, {"method": "lora"}, {"workers": 2, "gpusPerWorker": 1}))
    assert out["mode"] == "workers" and out["worldSize"] == 2 and out["steps"] == 4
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_whole_pipeline_on_one_gpu(tmp_path, tiny_model_dir, monkeypatch, method):
    """prep -> adapt -> train -> evaluate through the RayJob's entrypoint, on the GPU in bf16:
    evaluation (losses, greedy generation for exact match and samples) runs there too; with
    QLoRA the base is loaded in 4 bits for training and evaluation."""
    from tailor_trainer.pipeline import main_run

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ctx = _ctx(tmp_path, tiny_model_dir, {"method": method}, {"workers": 1, "gpusPerWorker": 1})
    body = ctx.config.model_dump(mode="json", by_alias=True)
    body["evaluation"] = {"metrics": ["loss", "perplexity", "accuracy", "exactMatch"], "maxNewTokens": 4,
                          "samplePrompts": ["say red 1:"]}
    body["progress"] = {"file": str(tmp_path / "progress.json")}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(body))
    assert main_run(str(config)) == 0
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["state"] == "Succeeded"
    result = progress["result"]
    assert result["metrics"]["loss"] == result["metrics"]["loss"] and "exactMatch" in result["metrics"]
    train = json.loads((tmp_path / "run" / "train" / "manifest.json").read_text())
    assert train["device"].startswith("cuda")


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
    return [d["loss"] for d in map(json.loads, lines) if "loss" in d]


@pytest.mark.parametrize("levers", [
    pytest.param({"fusedLoss": "chunked"}, id="chunked"),
    pytest.param({"fusedLoss": "liger"}, id="liger"),  # skipped below without liger-kernel
    pytest.param({"compile": True}, id="compile"),
    pytest.param({"attention": "flash_attention_2", "packing": True}, id="flash-padding-free"),
    pytest.param({"attention": "flex_attention", "packing": True}, id="flex-padding-free"),
])
def test_speed_levers_keep_the_bf16_losses(tmp_path, tiny_model_dir, monkeypatch, levers):
    """Each issue-14 lever alone gives the plain path's losses within bf16 tolerance on the GPU
    (the CPU tests in tests/unit/test_train_speed.py cover chunked, compile and packing in fp32;
    Liger's Triton kernels and flash-attn run only here)."""
    if levers.get("fusedLoss") == "liger":
        pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    if levers.get("attention") == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    plain = {"fusedLoss": "none", "compile": False, "attention": "sdpa", "packing": levers.get("packing", False)}
    runs = {}
    for name, hp in (("plain", plain), ("lever", {**plain, **levers})):
        (tmp_path / name).mkdir()
        ctx = _ctx(tmp_path / name, tiny_model_dir, {"method": "lora"}, {"workers": 1, "gpusPerWorker": 1})
        body = ctx.config.model_dump(mode="json", by_alias=True)
        body["hyperparameters"].update(hp)
        from tailor_trainer.config import TrainerConfig
        from tailor_trainer.stages import StageContext

        cfg = TrainerConfig.model_validate(body)
        out = _train(StageContext(config=cfg, run_dir=ctx.run_dir, config_hash=cfg.config_hash(),
                                  model_dir=ctx.model_dir))
        runs[name] = (out, _losses(tmp_path / name / "run"))
    speed = runs["lever"][0]["speed"]
    for key, value in levers.items():
        if key != "packing":
            assert speed[key] == value, speed
    assert runs["lever"][1] == pytest.approx(runs["plain"][1], rel=2e-2)
