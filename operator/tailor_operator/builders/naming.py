"""Deterministic, length-safe names for child objects (never random: a restarted operator must
find what it created, not duplicate it)."""

from __future__ import annotations

import hashlib

MAX_NAME = 63  # DNS-1123 label: RayJob/Service-derived names must stay within it


def safe_name(base: str, suffix: str = "", limit: int = MAX_NAME) -> str:
    """`<base><suffix>`, or a truncated base plus a short hash of the full name when too long."""
    full = f"{base}{suffix}"
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-.')}-{digest}{suffix}"


def run_name(job: str, number: int) -> str:
    """Run `<job>-r<N>`. KubeRay derives RayCluster/Service names from the RayJob name, so keep
    headroom below 63 characters."""
    return safe_name(job, f"-r{number}", limit=47)


def config_map_name(run: str) -> str:
    return safe_name(run, "-config")


def progress_config_map_name(run: str) -> str:
    return safe_name(run, "-progress")


def validation_name(dataset: str, digest: str) -> str:
    """`<dataset>-v<digest8>`: one validation (Job + ConfigMap) per Dataset spec and revision."""
    return safe_name(dataset, f"-v{digest[:8]}")
