"""Training checkpoints: ``<train>/checkpoints/step-N/`` written under a temporary name and
renamed into place, so a ``step-N`` directory with a ``manifest.json`` is always complete.

Files: manifest.json, trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt, state.json
(and scaler.pt with fp16 loss scaling); the writer callables are the train recipe's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from typing import Any, Callable, Optional

CHECKPOINTS = "checkpoints"


def list_checkpoints(root: str, config_hash: Optional[str] = None) -> list[tuple[int, str]]:
    """Complete checkpoints (step, path), oldest first; only this config's when a hash is given."""
    out = []
    if not os.path.isdir(root):
        return out
    for name in os.listdir(root):
        if not name.startswith("step-"):
            continue
        path = os.path.join(root, name)
        try:
            with open(os.path.join(path, "manifest.json")) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if config_hash is None or manifest.get("configHash") == config_hash:
            out.append((int(manifest["step"]), path))
    return sorted(out)


def write_checkpoint(root: str, step: int, files: dict[str, Callable[[str], None]],
                     manifest: dict[str, Any], keep: int) -> str:
    """Write a checkpoint under a temporary name and rename it into place; keep the newest."""
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-step-{step}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    for name, writer in files.items():
        writer(os.path.join(tmp, name))
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({**manifest, "step": step, "files": sorted(files)}, f, indent=2, sort_keys=True)
    final = os.path.join(root, f"step-{step}")
    if os.path.exists(final):  # left by an earlier config: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old_step, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def clean_partial(root: str) -> None:
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
