"""Training checkpoints: ``<train>/checkpoints/step-N/`` written under a temporary name and
renamed into place, so a ``step-N`` directory with a ``manifest.json`` is always complete.

Files: manifest.json, trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt, state.json
(and scaler.pt with fp16 loss scaling, best.safetensors with early stopping); the writer
callables are the train recipe's. The manifest records each file's size and sha256; every file,
the temporary directory and (after the rename) the parent are fsynced, so a checkpoint that was
reported complete survives a power loss.

Before a resume :func:`find_resumable` verifies the newest checkpoint (manifest parses, config
hash, sizes, checksums) and falls back to the one before when it fails, naming the reason;
with several ranks :func:`choose_checkpoint` makes them agree on one verified step. The
``.pt`` files are read with :func:`load_torch` (``torch.load(weights_only=True)``): tensors and
plain containers only, never arbitrary pickled objects — a run directory is writable by whoever
can write the output path, so its contents must not be able to run code in the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import uuid
from typing import Any, Callable, NamedTuple, Optional

from tailor_trainer.errors import TrainingFailed

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_CHUNK = 1 << 20
log = logging.getLogger("tailor_trainer")


class CheckpointUnsafe(TrainingFailed):
    """A checkpoint file that passed its checksums holds objects a weights-only load refuses: our
    writer never produces one, so the file and its manifest were written by someone else."""

    reason = "CheckpointUnsafe"


class Resumable(NamedTuple):
    step: int
    path: str
    files: frozenset[str]
    """The files its manifest lists (and that were verified): load only these."""


def list_checkpoints(root: str, config_hash: Optional[str] = None) -> list[tuple[int, str]]:
    """Complete checkpoints (step, path), oldest first; only this config's when a hash is given.
    Not verified (see :func:`find_resumable`): this is for listing and rotation."""
    out = []
    if not os.path.isdir(root):
        return out
    for name in os.listdir(root):
        if not name.startswith("step-"):
            continue
        path = os.path.join(root, name)
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                manifest = json.load(f)
            step = int(manifest["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if config_hash is None or manifest.get("configHash") == config_hash:
            out.append((step, path))
    return sorted(out)


def _digest(path: str) -> tuple[int, str]:
    """(size, sha256) of a file, read once."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _fsync_path(path: str) -> None:
    """fsync a file or a directory by name (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: str, step: int, files: dict[str, Callable[[str], None]],
                     manifest: dict[str, Any], keep: int) -> str:
    """Write a checkpoint under a temporary name and rename it into place; keep the newest.

    Durable in this order: each file written and fsynced (its size and sha256 go into the
    manifest), the manifest written and fsynced, the temporary directory fsynced, renamed, the
    parent fsynced — a crash at any point leaves either no ``step-N`` or a complete one.
    """
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-step-{step}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    recorded = {}
    for name, writer in sorted(files.items()):
        path = os.path.join(tmp, name)
        writer(path)
        _fsync_path(path)
        size, sha = _digest(path)
        recorded[name] = {"size": size, "sha256": sha}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({**manifest, "step": step, "files": recorded}, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp)
    final = os.path.join(root, f"step-{step}")
    if os.path.exists(final):  # left by an earlier config (or a corrupt one skipped on resume)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(root)
    for old_step, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def verify_checkpoint(path: str, manifest: dict[str, Any]) -> Optional[str]:
    """What is wrong with the checkpoint at ``path`` (``step-N/optimizer.pt size 1 != 2``), or
    None when every file its manifest lists is there with the recorded size and sha256."""
    name = os.path.basename(path)
    files = manifest.get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        # Written before checksums were recorded: verify what can be (every listed file exists)
        # and trust the contents. Refusing them would throw away the progress of runs that were
        # in flight across an upgrade; a bad file still cannot run code (weights-only loads) and
        # fails its load loudly. Checksums guard against corruption, not an attacker — whoever can
        # write a file can rewrite its manifest — that is what the weights-only load is for.
        for f in files:
            if not os.path.isfile(os.path.join(path, f)):
                return f"{name}/{f} is missing"
        log.warning("checkpoint %s was written without checksums: only its file list is verified", name)
        return None
    if not isinstance(files, dict) or not files:
        return f"{name}/{MANIFEST} lists no files"
    for f, want in sorted(files.items()):
        if os.path.basename(f) != f or f in ("", ".", ".."):
            return f"{name}/{MANIFEST} lists a file outside the checkpoint: {f!r}"
        if not (isinstance(want, dict) and isinstance(want.get("size"), int)
                and isinstance(want.get("sha256"), str)):
            return f"{name}/{MANIFEST} has no size and sha256 for {f}"
        p = os.path.join(path, f)
        if not os.path.isfile(p):
            return f"{name}/{f} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return f"{name}/{f} size {size} != {want['size']}"
        if _digest(p)[1] != want["sha256"]:
            return f"{name}/{f} checksum mismatch (sha256 differs from the manifest)"
    return None


def find_resumable(root: str, config_hash: str, at_most: Optional[int] = None
                   ) -> tuple[Optional[Resumable], list[dict[str, Any]]]:
    """The newest checkpoint of this config (at most step ``at_most``) that passes verification,
    and the newer ones skipped on the way as ``{"step", "reason"}`` (each also logged).

    A ``step-N`` directory without a manifest is not a checkpoint (a delete that removed the
    manifest first); one whose manifest does not parse, names another step, or whose files fail
    :func:`verify_checkpoint` is corrupt and skipped; another config's checkpoints are ignored.
    """
    skipped: list[dict[str, Any]] = []
    if not os.path.isdir(root):
        return None, skipped
    candidates = []
    for name in os.listdir(root):
        if name.startswith("step-") and name[5:].isdigit():
            candidates.append((int(name[5:]), name))
    for step, name in sorted(candidates, reverse=True):
        if at_most is not None and step > at_most:
            continue
        path = os.path.join(root, name)
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest_path):
            continue
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
            if not isinstance(manifest, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as e:
            problem = f"{name}/{MANIFEST} does not parse ({e})"
        else:
            if manifest.get("configHash") != config_hash:
                continue
            if manifest.get("step") != step:
                problem = f"{name}/{MANIFEST} says step {manifest.get('step')!r}"
            else:
                problem = verify_checkpoint(path, manifest)
            if problem is None:
                listed = manifest["files"]
                return Resumable(step, path, frozenset(listed)), skipped
        reason = f"CheckpointCorrupt: {problem}"
        log.warning("skipping checkpoint %s: %s", name, reason)
        skipped.append({"step": step, "reason": reason})
    return None, skipped


def choose_checkpoint(root: str, config_hash: str, world: int
                      ) -> tuple[Optional[Resumable], list[dict[str, Any]]]:
    """The checkpoint every rank resumes from: each rank verifies its own copy (on another node it
    is a separate download); while they disagree, all retry at or below the oldest choice, so
    every rank loads the same verified step (or none)."""
    import torch.distributed as dist

    found, skipped = find_resumable(root, config_hash)
    if world == 1:
        return found, skipped
    while True:
        choices: list[Any] = [None] * world
        dist.all_gather_object(choices, found.step if found else -1)
        if len(set(choices)) == 1:
            return found, skipped
        limit = min(choices)
        for step in sorted({c for c in choices if c > limit}, reverse=True):
            if not any(s["step"] == step for s in skipped):
                skipped.append({"step": step, "reason": f"CheckpointCorrupt: step-{step} failed "
                                                        "verification on another rank"})
        found, more = find_resumable(root, config_hash, at_most=limit) if limit >= 0 else (None, [])
        skipped += [s for s in more if not any(s["step"] == k["step"] for k in skipped)]


def load_torch(path: str, map_location: Any = None) -> Any:
    """``torch.load`` of a checkpoint file, weights only: tensors, numbers, strings and plain
    containers; anything else (a pickled object, a function) is refused, never constructed."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        where = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
        raise CheckpointUnsafe(
            f"{where} holds objects a weights-only load refuses ({str(e).splitlines()[0][:300]}); "
            f"its checksums match its manifest, so something other than the trainer wrote both. "
            f"Check who can write the output path, then delete {where.split('/')[0]} (or the run's "
            f"output) to train without it") from None


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def clean_partial(root: str) -> None:
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's RNG state as tensors and plain lists (loadable weights-only)."""
    import torch

    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
