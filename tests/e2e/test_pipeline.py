"""End to end: ``python -m tailor_trainer run --config F`` in a subprocess, exactly as the RayJob
and the local backend start it, on a quickstart-like config (the shipped tiny Llama, a slice of
the shipped support instructions).

The first run is killed right after its step-4 checkpoint; the rerun skips the finished stages,
resumes training at step 4 (not from zero), evaluates, and leaves an adapter that plain PEFT
reloads and generates with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "models" / "tailor-tiny-llama"
DATA = ROOT / "examples" / "data" / "support-instructions.jsonl"


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "TAILOR_RAY_LOCAL_MODE": "1"}
    env.pop("TAILOR_FAULT_EXIT_AFTER_CHECKPOINT", None)
    env.update(extra)
    return env


def _run(config: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tailor_trainer", "run", "--config", str(config)],
                          env=_env(**env), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _config(tmp_path: Path, rows: int = 300) -> Path:
    data = tmp_path / "support.jsonl"
    with open(DATA) as src, open(data, "w") as dst:
        for i, line in enumerate(src):
            if i >= rows:
                break
            dst.write(line)
    body = {
        "run": {"job": "support-assistant", "name": "support-assistant-r1"},
        "model": {"uri": str(MODEL)},
        "dataset": {"name": "support", "revision": "e2e", "source": {"uri": str(data)},
                    "schema": "instruction", "split": {"validation": 0.1, "test": 0.1, "seed": 7}},
        "adaptation": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                  "targetModules": ["q_proj", "v_proj", "up_proj", "down_proj"]}},
        "hyperparameters": {"learningRate": 3e-3, "batchSize": 8, "maxSteps": 8, "warmupRatio": 0.1,
                            "scheduler": "cosine", "maxSeqLength": 128, "checkpointEverySteps": 4,
                            "seed": 7},
        "evaluation": {"metrics": ["loss", "perplexity", "accuracy", "exactMatch"], "maxEvalRows": 12,
                       "maxNewTokens": 8, "samplePrompts": ["How do I cancel my subscription?"],
                       "gates": [{"metric": "loss", "max": 10.0}]},
        "outputUri": str(tmp_path / "run"),
        "progress": {"file": str(tmp_path / "progress.json")},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(body, indent=2))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="quickstart model not built")
def test_killed_run_resumes_and_finishes(tmp_path):
    pytest.importorskip("ray.train")
    config = _config(tmp_path)
    run = tmp_path / "run"

    crashed = _run(config, TAILOR_FAULT_EXIT_AFTER_CHECKPOINT="4")
    assert crashed.returncode == 137, crashed.stderr[-3000:]
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["state"] == "Running" and progress["stage"] == "train" and progress["step"] == 4
    assert (run / "train" / "checkpoints" / "step-4" / "manifest.json").exists()
    assert not (run / "train" / "manifest.json").exists()
    prep_done = json.loads((run / "prep" / "manifest.json").read_text())["finishedAt"]

    done = _run(config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage prep: finished earlier" in done.stderr
    assert json.loads((run / "prep" / "manifest.json").read_text())["finishedAt"] == prep_done
    train = json.loads((run / "train" / "manifest.json").read_text())
    assert train["resumedFrom"] == 4 and train["steps"] == 8 and train["status"] == "completed"
    steps = [json.loads(line)["step"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))

    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["state"] == "Succeeded" and progress["error"] is None
    result = progress["result"]
    assert result == json.loads((run / "evaluate" / "result.json").read_text())
    assert result["metrics"]["loss"] < result["metrics"]["baseLoss"]
    assert result["gates"] == [{"metric": "loss", "max": 10.0, "value": result["metrics"]["loss"],
                                "passed": True}]
    assert result["artifacts"]["report"].endswith("/evaluate/report.html")
    for name in ("report.html", "loss.png", "README.md", "samples.json", "manifest.json"):
        assert (run / "evaluate" / name).exists(), name

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = run / "train" / "model"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(MODEL)), str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(str(adapter))
    ids = tok("### Instruction:\nHow do I cancel?\n\n### Response:\n", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_invalid_config_exits_2_without_a_traceback(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"run": {"job": "x", "name": "x-r1"}, "model": {"uri": "m"},
                                  "dataset": {"source": {"uri": "d.jsonl"}}, "outputUri": str(tmp_path),
                                  "hyperparameters": {"learningRate": -1}}))
    done = _run(config, timeout=120)
    assert done.returncode == 2
    assert "InvalidSpec" in done.stderr and "learningRate" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="quickstart model not built")
def test_s3_output_survives_losing_the_pod(tmp_path, aws_env):
    """Output to s3:// (moto's server): the first run is killed after its step-4 checkpoint and its
    local copy is thrown away, as when a pod is lost; the rerun on an empty disk takes the finished
    prep and the checkpoint from the bucket, resumes at step 4, and leaves the adapter, report and
    result.json in the bucket, with artifact URIs that point there."""
    pytest.importorskip("ray.train")
    import boto3

    s3 = boto3.client("s3", endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="models")
    config = _config(tmp_path)
    body = json.loads(config.read_text())
    body["outputUri"] = "s3://models/support-assistant/support-assistant-r1"
    config.write_text(json.dumps(body))

    def keys(prefix: str = "support-assistant/support-assistant-r1/") -> set[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket="models", Prefix=prefix)
        return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}

    crashed = _run(config, TAILOR_FAULT_EXIT_AFTER_CHECKPOINT="4", TAILOR_RUN_CACHE=str(tmp_path / "pod-1"),
                   **aws_env)
    assert crashed.returncode == 137, crashed.stderr[-3000:]
    stored = keys()
    assert {"prep/manifest.json", "prep/train.parquet", "adapt/manifest.json",
            "train/checkpoints/step-4/manifest.json", "train/checkpoints/step-4/trainable.safetensors",
            "train/checkpoints/step-4/optimizer.pt"} <= stored
    assert "train/manifest.json" not in stored

    done = _run(config, TAILOR_RUN_CACHE=str(tmp_path / "pod-2"), **aws_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage prep: finished earlier" in done.stderr and "stage adapt: finished earlier" in done.stderr
    stored = keys()
    train = json.loads(s3.get_object(Bucket="models", Key="support-assistant/support-assistant-r1/"
                                     "train/manifest.json")["Body"].read())
    assert train["resumedFrom"] == 4 and train["steps"] == 8 and train["status"] == "completed"
    assert {"train/model/adapter_model.safetensors", "train/model/adapter_config.json",
            "train/metrics.jsonl", "evaluate/result.json", "evaluate/report.html", "evaluate/loss.png",
            "evaluate/manifest.json"} <= stored
    assert not any("/ray/" in k or ".tmp-" in k for k in stored)
    result = json.loads(s3.get_object(Bucket="models", Key="support-assistant/support-assistant-r1/"
                                      "evaluate/result.json")["Body"].read())
    assert result["artifacts"]["model"] == "s3://models/support-assistant/support-assistant-r1/train/model"
    assert result["metrics"]["loss"] < result["metrics"]["baseLoss"]
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["state"] == "Succeeded" and progress["result"] == result
