"""Sources and formats: local/file/pvc paths, globs, CSV/Parquet/text/gzip, ConfigMap inline data,
http(s) (a local http.server), s3 (moto's server on loopback, good and bad credentials) and hf://
(a local directory; the hub is unreachable here)."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tailor_trainer.config import ResolvedDataset
from tailor_trainer.data.engine import PrepOptions, prepare

ROWS = [{"prompt": f"question {i}?", "completion": f" answer {i}"} for i in range(6)]


def ds(uri=None, **spec) -> ResolvedDataset:
    spec.setdefault("split", {"validation": 0.0, "test": 0.0})
    spec.setdefault("schema", "completion")
    source = spec.pop("source", {"uri": str(uri)})
    return ResolvedDataset.model_validate({"name": "t", "source": source, **spec})


def run(d: ResolvedDataset):
    return prepare(d, PrepOptions())


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_local_path_file_uri_and_pvc(tmp_path, monkeypatch):
    (tmp_path / "claim" / "data").mkdir(parents=True)
    f = tmp_path / "claim" / "data" / "d.jsonl"
    f.write_text(jsonl(ROWS))
    assert run(ds(f)).rows == 6
    assert run(ds(f"file://{f}")).rows == 6
    monkeypatch.setenv("TAILOR_PVC_ROOT", str(tmp_path))
    assert run(ds("pvc://claim/data/d.jsonl")).rows == 6


def test_formats_and_globs(tmp_path):
    (tmp_path / "part-0.jsonl").write_text(jsonl(ROWS[:2]))
    with gzip.open(tmp_path / "part-1.jsonl.gz", "wt") as f:
        f.write(jsonl(ROWS[2:4]))
    (tmp_path / "part-2.csv").write_text("prompt,completion\n" + "".join(
        f'"{r["prompt"]}","{r["completion"]}"\n' for r in ROWS[4:]))
    pq.write_table(pa.Table.from_pylist(ROWS + [{"prompt": "q7", "completion": "a7"}]),
                   tmp_path / "all.parquet", row_group_size=2)
    (tmp_path / ".hidden.jsonl").write_text("garbage")
    r = run(ds(tmp_path / "part-*"))
    assert r.rows == 6 and not r.dropped  # format from each extension, .gz decompressed
    r = run(ds(tmp_path / "all.parquet"))
    assert r.rows == 7
    r = run(ds(tmp_path))  # a directory: all visible files, sorted; parquet duplicates the rest
    assert r.rows_read == 13 and r.dropped["duplicate"] == 6


def test_parquet_wrong_types_and_row_numbers(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "n": 1}, {"prompt": "c", "completion": None, "n": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    r = run(ds(tmp_path / "d.parquet", preprocessing={"maxBadFraction": 1.0}))
    assert [(e["line"], e["reason"]) for e in r.first_errors] == [(2, "MissingField")]
    pq.write_table(pa.table({"prompt": [1, 2], "completion": ["x", "y"]}), tmp_path / "t.parquet")
    r = run(ds(tmp_path / "t.parquet", preprocessing={"maxBadFraction": 1.0}))
    assert dict(r.dropped) == {"wrongType": 2}
    assert "must be a string, got number" in r.first_errors[0]["message"]


def test_json_array_file_is_a_clear_error(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=1))
    r = run(ds(tmp_path / "d.json"))
    assert r.error.reason == "UnsupportedFormat" and "JSON Lines" in r.error.message


def test_text_format_one_row_per_line(tmp_path):
    (tmp_path / "corpus.txt").write_text("first line\n\nsecond line\n  \nthird\n")
    r = run(ds(tmp_path / "corpus.txt", schema="text"))
    assert r.rows_read == 3 and r.rows == 3


def test_configmap_inline_data():
    d = ds(source={"configMapRef": {"name": "tiny", "key": "data.jsonl"}}, inlineData=jsonl(ROWS))
    assert run(d).rows == 6
    d = ds(source={"configMapRef": {"name": "tiny"}}, format="csv", inlineData="prompt,completion\nq,a\n")
    assert run(d).rows == 1
    d = ds(source={"configMapRef": {"name": "tiny"}})
    assert run(d).error.reason == "EmptySource"


@pytest.fixture()
def http_root(tmp_path, monkeypatch):
    # the server listens on loopback, which the trainer refuses unless the installation allows it
    monkeypatch.setenv("TAILOR_ALLOW_PRIVATE_ADDRESSES", "1")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_source(http_root):
    root, url = http_root
    (root / "d.jsonl").write_text(jsonl(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), root / "d.parquet")
    assert run(ds(f"{url}/d.jsonl")).rows == 6
    assert run(ds(f"{url}/d.parquet")).rows == 6  # spooled: parquet needs random access
    r = run(ds(f"{url}/missing.jsonl"))
    assert r.error.reason == "EmptySource" and "404" in r.error.message
    r = run(ds("http://127.0.0.1:1/d.jsonl"))
    assert r.error.reason == "SourceUnreachable"


def test_http_source_on_loopback_refused_by_default(http_root, monkeypatch):
    root, url = http_root
    (root / "d.jsonl").write_text(jsonl(ROWS))
    monkeypatch.delenv("TAILOR_ALLOW_PRIVATE_ADDRESSES")
    r = run(ds(f"{url}/d.jsonl?sv=1"))
    assert r.error.reason == "AddressNotAllowed"
    assert "127.0.0.1" in r.error.message and "sv=1" not in r.error.message


def test_hf_local_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    assert run(ds(f"hf://{saved}")).rows == 6
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text(jsonl(ROWS[:4]))
    assert run(ds(f"hf://{files}")).rows == 4
    r = run(ds(f"hf://{tmp_path}/nope"))
    assert r.error.reason == "EmptySource"


# ---------------------------------------------------------------------------------------------
# S3 against moto's server on loopback


@pytest.fixture()
def s3_env(moto_endpoint, monkeypatch, tmp_path):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_ENDPOINT_URL": moto_endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true",
                 "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                 "AWS_CONFIG_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(k, v)
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="sets/a.jsonl", Body=jsonl(ROWS[:3]).encode())
    s3.put_object(Bucket="data", Key="sets/b.jsonl", Body=jsonl(ROWS[3:]).encode())
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    s3.put_object(Bucket="data", Key="pq/d.parquet", Body=buf.getvalue().to_pybytes())
    yield s3


def test_s3_glob_prefix_and_parquet(s3_env):
    assert run(ds("s3://data/sets/*.jsonl")).rows == 6
    assert run(ds("s3://data/sets")).rows == 6
    assert run(ds("s3://data/sets/a.jsonl")).rows == 3
    assert run(ds("s3://data/pq/d.parquet")).rows == 6
    r = run(ds("s3://data/sets/a.jsonl", preprocessing={"maxBadFraction": 1.0}))
    assert r.first_errors == []
    r = run(ds("s3://data/nothing/*.jsonl"))
    assert r.error.reason == "EmptySource"


def test_s3_bad_credentials_are_access_denied(s3_env, monkeypatch):
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # enforce auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    r = run(ds("s3://data/sets/a.jsonl"))
    assert r.error.reason == "AccessDenied"
    assert "secretRef" in r.error.message and "Traceback" not in r.error.message


def test_s3_missing_credentials_are_access_denied(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    r = run(ds("s3://data/sets/a.jsonl"))
    assert r.error.reason == "AccessDenied"
    assert "AWS_ACCESS_KEY_ID" in r.error.message


def test_s3_model_dir_and_run_dir(s3_env, tmp_path, monkeypatch, tiny_tokenizer_dir):
    from tailor_trainer import storage
    from tailor_trainer.config import TrainerConfig
    from tailor_trainer.stages import prep

    for f in Path(tiny_tokenizer_dir).iterdir():
        s3_env.put_object(Bucket="data", Key=f"models/tiny/{f.name}", Body=f.read_bytes())
    monkeypatch.setenv("TAILOR_MODEL_CACHE", str(tmp_path / "cache"))
    local = storage.resolve_model_dir("s3://data/models/tiny")
    assert sorted(p.name for p in Path(local).iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in Path(tiny_tokenizer_dir).iterdir())
    assert storage.resolve_model_dir("s3://data/models/tiny") == local  # cached

    cfg = TrainerConfig.model_validate({
        "run": {"job": "j", "name": "j-r1"}, "model": {"uri": "s3://data/models/tiny"},
        "dataset": {"name": "d", "source": {"uri": "s3://data/sets/*.jsonl"}, "schema": "completion",
                    "split": {"validation": 0.0, "test": 0.0}},
        "outputUri": "s3://data/runs/j-r1"})
    manifest = prep.run_prep(cfg)
    keys = {o["Key"] for o in s3_env.list_objects_v2(Bucket="data", Prefix="runs/")["Contents"]}
    assert keys == {f"runs/j-r1/prep/{n}" for n in (
        "manifest.json", "status.json", "train.parquet", "validation.parquet", "test.parquet")}
    assert manifest["rows"] == 6
    assert prep.is_done("s3://data/runs/j-r1", cfg.config_hash()) == manifest
