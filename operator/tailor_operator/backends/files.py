"""What the operator reads itself from a spec's local paths (plain path or file://), whichever
backend runs the job: a Dataset's content fingerprint and a base model's config.json. Every
path is checked against the allowed roots (reconcile.policy.path_allowed) before it gets here."""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import logging
import stat
import time
from pathlib import Path
from typing import Any, Optional

from tailor_operator.reconcile.policy import local_path as _local_path

logger = logging.getLogger("tailor.files")


def local_path(uri: Optional[str]) -> Optional[Path]:
    """A path the operator can read itself (plain path or file://), else None."""
    path = _local_path(uri)
    return Path(path) if path is not None else None


FINGERPRINT_SECONDS = 60.0
"""Time budget of one fingerprint: past it the operator gives up (None) rather than tie up a
reconcile worker (the validation still reads the data and pins its revision)."""


def fingerprint_path(uri: Optional[str], budget_seconds: float = FINGERPRINT_SECONDS) -> Optional[str]:
    """`sha256:<16 hex>` over the content of every regular file the URI (or glob) names; None if
    unreadable or over the time budget. Reads at most the size `stat` reports for each file, so a
    file that streams without end (/proc, a FIFO, a device) cannot hold the operator."""
    path = local_path(uri)
    if path is None:
        return None
    files = sorted(Path(p) for p in _glob.glob(str(path))) if any(c in str(path) for c in "*?[") else [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    deadline = time.monotonic() + budget_seconds
    digest = hashlib.sha256()
    found = False
    for f in files:
        try:
            info = f.stat()
            if not stat.S_ISREG(info.st_mode):
                continue
            found = True
            digest.update(f.name.encode() + b"\0")
            left = info.st_size
            with f.open("rb") as handle:
                while left > 0:
                    block = handle.read(min(left, 1 << 20))
                    if not block:
                        break
                    digest.update(block)
                    left -= len(block)
                    if time.monotonic() > deadline:
                        logger.warning("fingerprint of %s took longer than %.0fs; skipped", uri, budget_seconds)
                        return None
        except OSError:
            return None
    return f"sha256:{digest.hexdigest()[:16]}" if found else None


def read_model_config(uri: Optional[str]) -> Optional[dict[str, Any]]:
    """The base model's config.json when it is a local directory (for the target-module check)."""
    path = local_path(uri)
    if path is None:
        return None
    try:
        doc = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
