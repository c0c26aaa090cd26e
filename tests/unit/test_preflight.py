"""preflight: the CPU model check the operator runs before any GPU is requested finds a model that
cannot be resolved, target modules it does not have, a maxSeqLength longer than its positions
and a tokenizer that does not load — without the weights. Real transformers + PEFT on the shipped
tiny Llama (examples/models/tailor-tiny-llama), real s3fs against moto for s3://."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tailor_trainer.config import TrainerConfig  # noqa: E402
from tailor_trainer.preflight import _classify, resolve_model_metadata, run_preflight  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "models" / "tailor-tiny-llama"
TINY_LAYERS, TINY_POSITIONS = 4, 512


def make_config(model_uri, **sections) -> TrainerConfig:
    body = {
        "run": {"job": "unit", "name": "unit-r1"}, "model": {"uri": str(model_uri)},
        "dataset": {"name": "words", "source": {"uri": "/nonexistent/data.jsonl"}, "schema": "completion"},
        "adaptation": {"method": "lora", "lora": {"r": 4}},
        "hyperparameters": {"maxSeqLength": 256},
        "outputUri": "/nonexistent/run",
    }
    for key, value in sections.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainerConfig.model_validate(body)


@pytest.fixture(scope="module")
def weightless(tmp_path_factory) -> Path:
    """The tiny model's config and tokenizer without model.safetensors."""
    out = tmp_path_factory.mktemp("weightless")
    for f in TINY.iterdir():
        if not f.name.endswith((".safetensors", ".bin")):
            shutil.copy(f, out / f.name)
    return out


def test_ok_reports_the_model_without_its_weights(weightless):
    from transformers import AutoModelForCausalLM

    doc = run_preflight(make_config(weightless))
    assert doc["ok"] is True and doc["reason"] is None and doc["field"] is None, doc
    real = AutoModelForCausalLM.from_pretrained(TINY)
    model = doc["model"]
    # the skeleton built on the meta device has exactly the real model's parameters
    assert model["parameters"] == sum(p.numel() for p in real.parameters())
    assert model["modelType"] == "llama" and model["maxPositionEmbeddings"] == TINY_POSITIONS
    assert model["targetModulesMatched"] == 2 * TINY_LAYERS  # default LoRA targets q_proj, v_proj
    assert doc["durationSeconds"] < 60


def test_full_fine_tuning_has_no_target_modules():
    doc = run_preflight(make_config(TINY, adaptation={"method": "full", "lora": None}))
    assert doc["ok"] is True, doc
    assert doc["model"]["targetModulesMatched"] is None


@pytest.mark.parametrize("adaptation, field", [
    ({"method": "lora", "lora": {"targetModules": ["q_proj", "query_key_value"]}},
     "spec.adaptation.lora.targetModules"),
    ({"method": "ia3", "lora": None, "ia3TargetModules": ["fc_in"]}, "spec.adaptation.ia3TargetModules"),
])
def test_unknown_target_modules_list_the_ones_that_exist(adaptation, field):
    doc = run_preflight(make_config(TINY, adaptation=adaptation))
    assert doc["ok"] is False and doc["reason"] == "UnknownTargetModules" and doc["field"] == field, doc
    assert doc["retryable"] is False
    missing = adaptation.get("ia3TargetModules") or ["query_key_value"]
    assert all(repr(m) in doc["message"] for m in missing)
    assert "q_proj" in doc["message"].split("modules with weights:")[1]  # what the model has


def test_other_adaptation_mistakes_keep_the_adapt_stage_reason():
    doc = run_preflight(make_config(TINY, adaptation={"method": "freeze", "lora": None,
                                                      "freeze": {"modules": ["*.no_such_module"]}}))
    assert (doc["ok"], doc["reason"], doc["field"]) == (False, "InvalidSpec", "spec.adaptation.freeze.modules"), doc


def test_max_seq_length_longer_than_the_model_positions():
    doc = run_preflight(make_config(TINY, hyperparameters={"maxSeqLength": 1024}))
    assert (doc["ok"], doc["reason"], doc["field"]) == (False, "SequenceTooLong", "spec.hyperparameters.maxSeqLength")
    assert "1024" in doc["message"] and str(TINY_POSITIONS) in doc["message"]
    assert doc["model"]["maxPositionEmbeddings"] == TINY_POSITIONS


def test_missing_model_directory(tmp_path):
    doc = run_preflight(make_config(tmp_path / "nope"))
    assert (doc["ok"], doc["reason"], doc["field"], doc["retryable"]) == (
        False, "ModelNotFound", "spec.baseModel.uri", False), doc
    doc = run_preflight(make_config(tmp_path))  # a directory, but no config.json in it
    assert (doc["reason"], doc["field"]) == ("ModelNotFound", "spec.baseModel.uri")
    assert "config.json" in doc["message"]


def test_tokenizer_that_does_not_load(weightless, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(weightless, broken)
    (broken / "tokenizer.json").write_text("{not json")
    doc = run_preflight(make_config(broken))
    assert (doc["ok"], doc["reason"], doc["field"]) == (False, "ModelInvalid", "spec.baseModel.uri"), doc


@pytest.mark.parametrize("err, reason, field", [
    (PermissionError("Access Denied"), "CredentialsError", "spec.baseModel.secretRef"),
    (FileNotFoundError("models/x"), "ModelNotFound", "spec.baseModel.uri"),
    (ConnectionError("reset"), "SourceUnreachable", "spec.baseModel.uri"),
])
def test_download_errors_become_verdicts(err, reason, field):
    wrapped = OSError("s3 failed")
    wrapped.__cause__ = err  # s3fs wraps botocore's error
    verdict = _classify(wrapped, "s3://bucket/models/x")
    assert (verdict.reason, verdict.field) == (reason, field)


def test_s3_fetches_config_and_tokenizer_only(aws_env, moto_endpoint, monkeypatch, tmp_path):
    for k, v in aws_env.items():
        monkeypatch.setenv(k, v)
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="models")
    for f in TINY.iterdir():
        s3.upload_file(str(f), "models", f"tiny/{f.name}")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    got = resolve_model_metadata("s3://models/tiny", None, str(scratch))
    names = set(os.listdir(got))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    doc = run_preflight(make_config("s3://models/tiny"))
    assert doc["ok"] is True, doc
    doc = run_preflight(make_config("s3://models/missing"))
    assert (doc["reason"], doc["field"]) == ("ModelNotFound", "spec.baseModel.uri"), doc


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tailor_trainer", "preflight", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_cli_prints_the_verdict_and_exits_0(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(make_config(TINY, hyperparameters={"maxSeqLength": 4096}).model_dump_json(by_alias=True))
    result = tmp_path / "status.json"
    proc = _cli("--config", str(config), "--result-file", str(result))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["ok"], doc["reason"]) == (False, "SequenceTooLong")
    assert json.loads(result.read_text()) == doc
    # an unreadable config is the command failing, not a verdict
    bad = _cli("--config", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and not bad.stdout and "cannot read config" in bad.stderr


@pytest.fixture()
def fake_hub():
    """A loopback HTTP server standing in for the Hugging Face hub: every request gets the status
    and X-Error-Code set in ``answer`` (the real huggingface_hub client talks to it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = {"status": 404, "code": None}

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            body = json.dumps({"error": "fake hub"}).encode()
            self.send_response(answer["status"])
            if answer["code"]:
                self.send_header("X-Error-Code", answer["code"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _reply

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answer
    server.shutdown()


@pytest.mark.parametrize("status, code, reason, field, retryable", [
    (401, "RepoNotFound", "ModelNotFound", "spec.baseModel.uri", False),
    (403, "GatedRepo", "CredentialsError", "spec.baseModel.secretRef", False),
    (403, None, "CredentialsError", "spec.baseModel.secretRef", False),
    (404, "RevisionNotFound", "ModelNotFound", "spec.baseModel.revision", False),
    (503, None, "SourceUnreachable", "spec.baseModel.uri", True),
])
def test_hf_answers_become_verdicts(fake_hub, tmp_path, status, code, reason, field, retryable):
    endpoint, answer = fake_hub
    answer.update(status=status, code=code)
    config = tmp_path / "config.json"
    config.write_text(make_config("hf://acme/tiny").model_dump_json(by_alias=True))
    # online against the local fake hub (`make` exports HF_HUB_OFFLINE=1 for everything else)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
           "HF_TOKEN": "hf_fake", "TAILOR_DOWNLOAD_TRIES": "2", "TAILOR_DOWNLOAD_BACKOFF_S": "0"}
    proc = subprocess.run([sys.executable, "-m", "tailor_trainer", "preflight", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["ok"], doc["reason"], doc["field"], doc["retryable"]) == (False, reason, field, retryable), doc
    assert "hf_fake" not in proc.stdout + proc.stderr
