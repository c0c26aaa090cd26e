"""RunMirror: the local working copy of an s3:// run directory, against moto's S3 server.

Uploads only what changed, manifests last (a reader that sees a manifest sees everything it
describes), never partial writes or Ray scratch; deletes with manifests first; a fresh copy on
another machine pulls exactly what the bucket holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailor_trainer import storage


@pytest.fixture()
def bucket(moto_endpoint, aws_env, monkeypatch, tmp_path):
    for k, v in aws_env.items():
        monkeypatch.setenv(k, v)
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    name = f"runs-{tmp_path.name.lower().replace('_', '-')}"[:60]
    s3.create_bucket(Bucket=name)
    return s3, name


def _keys(s3, name: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])}


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_push_pull_and_delete(bucket, tmp_path, monkeypatch):
    s3, name = bucket
    monkeypatch.setenv("TAILOR_RUN_CACHE", str(tmp_path / "node-a"))
    a = storage.RunMirror(f"s3://{name}/job/job-r1")
    assert Path(a.local).parent == tmp_path / "node-a"
    local = Path(a.local)
    for rel in ("train/checkpoints/step-2/trainable.safetensors", "train/checkpoints/step-2/manifest.json",
                "train/checkpoints/step-4/trainable.safetensors", "train/checkpoints/step-4/manifest.json",
                "prep/train.parquet", "prep/manifest.json", "train/metrics.jsonl"):
        _write(local, rel, rel)
    _write(local, "train/checkpoints/.tmp-step-6-ab12/trainable.safetensors", "partial")
    _write(local, "train/ray/session/x.json", "ray scratch")
    _write(local, "prep/result.json.tmp-1234", "partial")

    uploaded: list[str] = []
    put = a.remote.fs.put_file
    monkeypatch.setattr(a.remote.fs, "put_file", lambda src, dst, **kw: (uploaded.append(dst), put(src, dst, **kw)))
    assert a.push() == 7
    assert _keys(s3, name) == {f"job/job-r1/{r}" for r in (
        "train/checkpoints/step-2/trainable.safetensors", "train/checkpoints/step-2/manifest.json",
        "train/checkpoints/step-4/trainable.safetensors", "train/checkpoints/step-4/manifest.json",
        "prep/train.parquet", "prep/manifest.json", "train/metrics.jsonl")}
    first_manifest = min(i for i, k in enumerate(uploaded) if k.endswith("manifest.json"))
    assert all(k.endswith("manifest.json") for k in uploaded[first_manifest:])

    assert a.push() == 0  # nothing changed
    _write(local, "train/metrics.jsonl", "train/metrics.jsonl + one more line")
    assert a.push("train") == 1

    # checkpoint rotation: step-2 is gone locally -> gone remotely, its manifest first
    removed: list[str] = []
    rm = a.remote.fs.rm_file
    monkeypatch.setattr(a.remote.fs, "rm_file", lambda p, **kw: (removed.append(p), rm(p, **kw)))
    for f in (local / "train/checkpoints/step-2").iterdir():
        f.unlink()
    (local / "train/checkpoints/step-2").rmdir()
    a.push("train/checkpoints", delete=True)
    assert removed[0].endswith("step-2/manifest.json") and len(removed) == 2
    assert not any("step-2" in k for k in _keys(s3, name))

    # another machine: an empty copy receives exactly what the bucket holds
    monkeypatch.setenv("TAILOR_RUN_CACHE", str(tmp_path / "node-b"))
    b = storage.RunMirror(f"s3://{name}/job/job-r1")
    assert b.pull("prep") == 2 and not (Path(b.local) / "train").exists()
    assert b.pull() == 3
    got = {str(p.relative_to(b.local)) for p in Path(b.local).rglob("*") if p.is_file()}
    assert got == {"prep/train.parquet", "prep/manifest.json", "train/metrics.jsonl",
                   "train/checkpoints/step-4/trainable.safetensors", "train/checkpoints/step-4/manifest.json"}
    assert (Path(b.local) / "train/metrics.jsonl").read_text() == "train/metrics.jsonl + one more line"
    assert b.pull() == 0 and b.push() == 0  # pulled files count as in sync


def test_local_output_needs_no_mirror(tmp_path):
    assert storage.RunMirror.for_output(str(tmp_path / "run")) is None
    assert storage.RunMirror.for_output(f"file://{tmp_path}/run") is None
    with pytest.raises(storage.StorageError):
        storage.RunMirror(str(tmp_path))
