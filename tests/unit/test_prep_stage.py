"""The prep stage end to end (files, manifest last, resume skip, failure) and ``inspect``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tailor_trainer import storage
from tailor_trainer.config import TrainerConfig
from tailor_trainer.stages import prep

REPO = Path(__file__).resolve().parents[2]
CHATS = [
    {"messages": [{"role": "user", "content": f"Question {i}?"},
                  {"role": "assistant", "content": f"Answer {i}."}]}
    for i in range(40)
]


def write(path: Path, rows) -> Path:
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
    return path


def config(tmp_path, model_dir, data: Path, **hp) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "run": {"job": "j", "name": "j-r1"},
        "model": {"uri": str(model_dir)},
        "dataset": {"name": "d", "source": {"uri": str(data)}, "schema": "chat",
                    "split": {"validation": 0.2, "test": 0.2}},
        "hyperparameters": {"maxSeqLength": 64, **hp},
        "evaluation": {"crossValidation": {"folds": 3}},
        "outputUri": str(tmp_path / "run"),
    })


def test_run_prep_writes_contract_files_and_skips_when_done(tmp_path, tiny_tokenizer_dir, monkeypatch):
    cfg = config(tmp_path, tiny_tokenizer_dir, write(tmp_path / "c.jsonl", CHATS + ["{bad"]),
                 packing=False)
    cfg.dataset.preprocessing.max_bad_fraction = 0.05
    manifest = prep.run_prep(cfg)
    out = tmp_path / "run" / "prep"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "status.json", "test.parquet", "train.parquet", "validation.parquet"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["configHash"] == cfg.config_hash() and manifest["rowsRead"] == 41
    assert manifest["rows"] == 40 == sum(manifest["splits"].values())
    assert manifest["dropped"] == {"badJson": 1}
    assert manifest["firstErrors"][0]["line"] == 41
    assert manifest["revision"] == manifest["fingerprint"]
    assert set(manifest["tokens"]) == {"mean", "p50", "p95", "max", "overLimit", "total"}
    train = pq.read_table(out / "train.parquet")
    assert train.column_names == ["id", "input_ids", "labels", "position_ids", "prompt", "reference", "fold"]
    assert train.num_rows == manifest["splits"]["train"]
    row = train.to_pylist()[0]
    assert row["reference"].startswith("Answer") and row["prompt"].endswith("assistant\n")
    assert row["position_ids"] is None and len(row["labels"]) == len(row["input_ids"])
    assert {r["fold"] for r in train.to_pylist()} <= {0, 1, 2}
    status = json.loads((out / "status.json").read_text())
    assert status["conditions"][0]["reason"] == "Validated"

    # Same config: skipped without touching the data.
    def boom(*a, **k):
        raise AssertionError("prep ran again")

    monkeypatch.setattr(prep, "prepare", boom)
    assert prep.run_prep(cfg) == manifest
    assert prep.is_done(str(tmp_path / "run"), cfg.config_hash()) == manifest
    # A missing output file or another config means not done.
    assert prep.is_done(str(tmp_path / "run"), "other") is None
    os.remove(out / "test.parquet")
    assert prep.is_done(str(tmp_path / "run"), cfg.config_hash()) is None


def test_run_prep_redoes_on_config_change_and_packs(tmp_path, tiny_tokenizer_dir):
    data = write(tmp_path / "c.jsonl", CHATS)
    first = prep.run_prep(config(tmp_path, tiny_tokenizer_dir, data))
    cfg = config(tmp_path, tiny_tokenizer_dir, data, packing=True)
    second = prep.run_prep(cfg)
    assert second["configHash"] != first["configHash"] and second["packed"] is True
    assert second["revision"] == first["revision"]  # same data, same revision
    assert second["sequences"]["train"] < second["splits"]["train"]
    t = pq.read_table(tmp_path / "run" / "prep" / "train.parquet").to_pylist()
    assert all(r["position_ids"] is not None and len(r["input_ids"]) <= 64 for r in t)


def test_run_prep_failure_writes_status_not_manifest(tmp_path, tiny_tokenizer_dir):
    cfg = config(tmp_path, tiny_tokenizer_dir, write(tmp_path / "c.jsonl", ["{bad"] * 3 + [CHATS[0]]))
    with pytest.raises(prep.PrepFailed) as e:
        prep.run_prep(cfg)
    assert e.value.reason == "DataInvalid" and e.value.data_reason == "TooManyBadRows"
    assert "line 1" in e.value.message
    out = tmp_path / "run" / "prep"
    assert not (out / "manifest.json").exists()
    status = json.loads((out / "status.json").read_text())
    assert status["conditions"][0]["status"] == "False"
    assert [x["line"] for x in status["firstErrors"]] == [1, 2, 3]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def _inspect(tmp_path, capsys, spec: dict, *args, **kw) -> tuple[int, str]:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"name": "d", **spec}))
    code = prep.main_inspect(str(path), *args, **kw)
    return code, capsys.readouterr().out


def test_inspect_ready_matches_operator_status_model(tmp_path, capsys, tiny_tokenizer_dir):
    from tailor_operator.api.v1alpha1 import DatasetStatus

    data = write(tmp_path / "c.jsonl", CHATS)
    spec = {"source": {"uri": str(data)}, "schema": "chat"}
    code, out = _inspect(tmp_path, capsys, spec, tokenizer=str(tiny_tokenizer_dir), max_seq_length=28,
                         result_file=str(tmp_path / "status.json"))
    assert code == 0
    status = json.loads(out)
    DatasetStatus.model_validate(status)  # the operator can store it as is
    assert status == json.loads((tmp_path / "status.json").read_text())
    assert status["rows"] == 40 and status["tokens"]["overLimit"] > 0
    code, out = _inspect(tmp_path, capsys, {**spec, "revision": "v7"}, output="text")
    assert code == 0 and "Ready (Validated)" in out and "revision   v7" in out


@pytest.mark.parametrize("spec, reason", [
    ({"source": {"uri": "/nonexistent/data.jsonl"}}, "EmptySource"),
    ({"source": {"uri": "DATA"}, "schema": "completion"}, "MissingColumn"),
])
def test_inspect_not_ready_is_specific(tmp_path, capsys, spec, reason):
    data = write(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    spec = json.loads(json.dumps(spec).replace("DATA", str(data)))
    code, out = _inspect(tmp_path, capsys, spec)
    status = json.loads(out)
    assert code == 1 and status["conditions"][0]["reason"] == reason
    code, out = _inspect(tmp_path, capsys, spec, output="text")
    assert code == 1 and "NOT Ready" in out and reason in out


def test_inspect_bad_spec_and_tokenizer(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"source": {"uri": "a.jsonl"}, "schema": "poetry"}))
    assert prep.main_inspect(str(path)) == 2
    assert "schema" in capsys.readouterr().err
    data = write(tmp_path / "t.jsonl", [{"text": "hello"}])
    code, out = _inspect(tmp_path, capsys, {"source": {"uri": str(data)}}, tokenizer=str(tmp_path / "nope"))
    assert code == 1 and json.loads(out)["conditions"][0]["reason"] == "TokenizerUnavailable"


def test_inspect_cli_never_prints_a_traceback(tmp_path):
    path = tmp_path / "ds.json"
    write(tmp_path / "bad.jsonl", ["{oops"] * 5)
    path.write_text(json.dumps({"name": "d", "source": {"uri": str(tmp_path / "bad.jsonl")}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])}
    proc = subprocess.run([sys.executable, "-m", "tailor_trainer", "inspect", "--dataset", str(path),
                           "--output", "text"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "TooManyBadRows" in proc.stdout and "bad.jsonl:1  BadJSON" in proc.stdout


# ---------------------------------------------------------------------------------------------
# storage helpers


def test_storage_resolve_and_atomic_json(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_PVC_ROOT", str(tmp_path))
    loc = storage.resolve("pvc://claim/runs/r1")
    assert loc.is_local and loc.path == str(tmp_path / "claim" / "runs" / "r1")
    assert storage.resolve(f"file://{tmp_path}/x").path == f"{tmp_path}/x"
    with pytest.raises(storage.StorageError):
        storage.resolve("pvc:///no-claim")
    with pytest.raises(storage.StorageError):
        storage.resolve("ftp://host/x")
    target = loc.join("prep", "manifest.json")
    storage.write_json_atomic(target, {"a": 1})
    storage.write_json_atomic(target, {"a": 2})
    assert storage.read_json(target) == {"a": 2}
    assert os.listdir(os.path.dirname(target.path)) == ["manifest.json"]
    assert storage.read_json(loc.join("missing.json")) is None
    opts = storage.s3_options({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                               "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1"})
    assert opts == {"key": "k", "secret": "s", "endpoint_url": "http://minio:9000",
                    "client_kwargs": {"region_name": "eu-west-1"}}


def test_resolve_model_dir_local_and_hf_seam(tmp_path, monkeypatch):
    assert storage.resolve_model_dir(str(tmp_path)) == str(tmp_path)
    assert storage.resolve_model_dir(f"file://{tmp_path}") == str(tmp_path)
    with pytest.raises(storage.StorageError):
        storage.resolve_model_dir(str(tmp_path / "missing"))
    calls = []
    monkeypatch.setenv("HF_TOKEN", "tok")
    monkeypatch.setattr(storage, "hf_snapshot_download",
                        lambda repo, rev, token: calls.append((repo, rev, token)) or str(tmp_path))
    assert storage.resolve_model_dir("hf://org/model", "main") == str(tmp_path)
    assert calls == [("org/model", "main", "tok")]
    with pytest.raises(storage.StorageError):
        storage.resolve_model_dir("hf://a/b/c")
