"""Checkpoints are verified before a resume and cannot run code.

The manifest records each file's size and sha256; a resume verifies the newest checkpoint and
falls back to the one before when a file is truncated or altered, recording why in the train
manifest (``skippedCheckpoints``). Every ``.pt`` file is read weights-only, so a pickle placed in
a run directory is refused, not executed — and because its checksums matched, that is tampering,
not corruption: the run fails as ``CheckpointUnsafe`` instead of quietly training on from a
directory someone else writes to. Writes are fsynced file, directory, rename, parent.

That a resume from a verified checkpoint repeats the uninterrupted run exactly is
``test_train.py::test_resume_continues_from_the_last_complete_checkpoint`` (every resume is now
verified); the fallback tests below check the same against their own uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.train")

from tailor_trainer.checkpoints import (  # noqa: E402
    CheckpointUnsafe,
    find_resumable,
    load_torch,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from tailor_trainer.stages.train import run_train  # noqa: E402
from test_train import losses, new_run, prepared  # noqa: E402,F401 - prepared is a fixture

HP = {"maxSteps": 6, "checkpointEverySteps": 2, "checkpointsToKeep": 3}


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):  # noqa: F811
    """One uninterrupted 6-step run with checkpoints at 2, 4 and 6; tests work on copies."""
    run = tmp_path_factory.mktemp("trained") / "run"
    ctx, _ = new_run(prepared, run, hyperparameters=HP)
    out = run_train(ctx)
    assert out["skippedCheckpoints"] == [] and out["resumedFrom"] is None
    return {"run": run, "losses": losses(run)}


def crashed_copy(prepared, trained, tmp_path):
    """A copy of the run as if it died after writing checkpoint 6 (the final model is lost)."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    shutil.rmtree(run / "train" / "model")
    (run / "train" / "manifest.json").unlink(missing_ok=True)
    ctx, _ = new_run(prepared, run, hyperparameters=HP)
    return ctx, run, run / "train" / "checkpoints"


def rewrite_checksums(ckpt) -> None:
    """What an attacker with write access does: make the manifest match the files again."""
    import hashlib

    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------
# Pieces (no training)


def test_manifest_records_size_and_sha256_and_writes_are_fsynced(tmp_path, monkeypatch):
    import hashlib

    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b))[1])
    root = tmp_path / "ckpt"
    final = write_checkpoint(str(root), 2, {"a.bin": lambda p: open(p, "wb").write(b"abc"),
                                            "b.json": lambda p: open(p, "w").write("{}")},
                             {"configHash": "h"}, keep=2)
    manifest = json.loads((root / "step-2" / "manifest.json").read_text())
    assert manifest["files"] == {"a.bin": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
                                 "b.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}}
    synced = [os.path.basename(p) for e, p in events if e == "fsync"]
    tmp = synced[3]
    assert synced[:3] == ["a.bin", "b.json", "manifest.json"] and tmp.startswith(".tmp-step-2-")
    # every file, then the temporary directory, then the rename, then the parent directory
    assert [e for e, _ in events] == ["fsync"] * 4 + ["rename", "fsync"]
    assert events[4] == ("rename", final)
    assert os.path.realpath(events[5][1]) == os.path.realpath(root)


def test_find_resumable_verifies_and_names_what_is_wrong(tmp_path):
    root = tmp_path / "ckpt"
    for step in (2, 4, 6, 8, 10):
        write_checkpoint(str(root), step, {"x.pt": lambda p: torch.save({"w": torch.ones(4)}, p)},
                         {"configHash": "h"}, keep=10)
    write_checkpoint(str(root), 12, {"x.pt": lambda p: torch.save({}, p)}, {"configHash": "other"}, keep=10)
    (root / "step-10" / "manifest.json").write_text("{not json")
    (root / "step-8" / "x.pt").unlink()
    manifest = json.loads((root / "step-6" / "manifest.json").read_text())
    manifest["step"] = 7
    (root / "step-6" / "manifest.json").write_text(json.dumps(manifest))
    (root / "step-14").mkdir()  # no manifest: not a checkpoint (half deleted, manifest first)
    found, skipped = find_resumable(str(root), "h")
    assert found.step == 4 and found.files == {"x.pt"}
    assert [s["step"] for s in skipped] == [10, 8, 6]  # another config's step-12 is ignored
    assert skipped[0]["reason"].startswith("CheckpointCorrupt: step-10/manifest.json does not parse")
    assert skipped[1]["reason"] == "CheckpointCorrupt: step-8/x.pt is missing"
    assert skipped[2]["reason"] == "CheckpointCorrupt: step-6/manifest.json says step 7"
    assert find_resumable(str(root), "h", at_most=3)[0].step == 2
    assert find_resumable(str(tmp_path / "none"), "h") == (None, [])


def test_checkpoints_from_before_checksums_are_checked_for_their_files(tmp_path):
    """An old manifest (``files`` a list): the files must exist; contents are trusted (loads are
    weights-only either way)."""
    for step in (2, 4):
        d = tmp_path / f"step-{step}"
        d.mkdir()
        torch.save({"w": torch.ones(2)}, d / "x.pt")
        (d / "manifest.json").write_text(json.dumps({"configHash": "h", "step": step, "files": ["x.pt"]}))
    (tmp_path / "step-4" / "x.pt").unlink()
    found, skipped = find_resumable(str(tmp_path), "h")
    assert found.step == 2 and skipped == [{"step": 4, "reason": "CheckpointCorrupt: step-4/x.pt is missing"}]


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    torch.manual_seed(3)
    random.seed(3)
    torch.save([rng_state()], tmp_path / "rng.pt")
    want = (torch.rand(3), random.random())
    set_rng_state(load_torch(str(tmp_path / "rng.pt"))[0])
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1]


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_is_refused_not_run(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe))))
    assert probe.exists(), "the payload must really run code when unpickled"
    marker = tmp_path / "marker"
    (tmp_path / "step-6").mkdir()
    torch.save({"state": _Payload(str(marker))}, tmp_path / "step-6" / "optimizer.pt")
    with pytest.raises(CheckpointUnsafe, match=r"step-6/optimizer.pt holds objects a weights-only load refuses"):
        load_torch(str(tmp_path / "step-6" / "optimizer.pt"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Resume (real training, Ray Train local mode)


@pytest.mark.slow
def test_truncated_file_falls_back_to_the_previous_checkpoint(prepared, trained, tmp_path):
    ctx, run, ckpts = crashed_copy(prepared, trained, tmp_path)
    opt = ckpts / "step-6" / "optimizer.pt"
    full = opt.stat().st_size
    with open(opt, "r+b") as f:
        f.truncate(full // 2)
    out = run_train(ctx)
    assert out["resumedFrom"] == 4 and out["steps"] == 6
    assert out["skippedCheckpoints"] == [
        {"step": 6, "reason": f"CheckpointCorrupt: step-6/optimizer.pt size {full // 2} != {full}"}]
    # a resume from the verified step 4 ends exactly where the uninterrupted run ended
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in losses(run)] == pytest.approx([v for _, v in trained["losses"]], rel=1e-6)
    # step 6 was written again, whole
    found, skipped = find_resumable(str(ckpts), ctx.config_hash)
    assert found.step == 6 and skipped == []


@pytest.mark.slow
def test_altered_byte_is_a_checksum_mismatch(prepared, trained, tmp_path):
    ctx, run, ckpts = crashed_copy(prepared, trained, tmp_path)
    weights = ckpts / "step-6" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside a tensor: still a valid file of the same size
    weights.write_bytes(bytes(data))
    out = run_train(ctx)
    assert out["resumedFrom"] == 4 and out["steps"] == 6
    [skip] = out["skippedCheckpoints"]
    assert skip["step"] == 6
    assert skip["reason"].startswith("CheckpointCorrupt: step-6/trainable.safetensors checksum mismatch")
    assert [v for _, v in losses(run)] == pytest.approx([v for _, v in trained["losses"]], rel=1e-6)


@pytest.mark.slow
def test_pickle_with_matching_checksums_fails_the_run_without_running(prepared, trained, tmp_path):
    """Checksums that match a file our writer could never have produced mean someone rewrote the
    checkpoint and its manifest: nothing in that directory can be trusted, so the run stops with
    a named reason rather than training on from an older checkpoint there."""
    ctx, run, ckpts = crashed_copy(prepared, trained, tmp_path)
    marker = tmp_path / "pwned"
    real = torch.load(ckpts / "step-6" / "optimizer.pt", weights_only=True)
    torch.save({**real, "extra": _Payload(str(marker))}, ckpts / "step-6" / "optimizer.pt")
    rewrite_checksums(ckpts / "step-6")
    assert find_resumable(str(ckpts), ctx.config_hash)[0].step == 6  # it verifies; the load refuses
    with pytest.raises(CheckpointUnsafe, match=r"step-6/optimizer.pt holds objects a weights-only load refuses") as err:
        run_train(ctx)
    assert err.value.reason == "CheckpointUnsafe"
    assert not marker.exists()
    assert not (run / "train" / "model").exists()
