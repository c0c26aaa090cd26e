"""When to write status: at once for anything that matters, at most every few seconds for progress."""

from __future__ import annotations

from typing import Any, Optional


def status_body(status: Any) -> dict[str, Any]:
    """A status model as it goes on the wire (camelCase, unset fields left out)."""
    return status.model_dump(by_alias=True, mode="json", exclude_none=True)


def write_decision(old: dict[str, Any], new: dict[str, Any], last_write: Optional[float], now: float,
                   min_interval: float) -> tuple[bool, Optional[float]]:
    """(write now?, retry in seconds). Progress-only changes are rate-limited per object; phase,
    conditions, errors and everything else are written immediately (and reset the clock). A
    search's counts are progress too once the status shows the search (its first appearance
    goes with the SearchStarted event, so it is written at once)."""
    if old == new:
        return False, None
    volatile = {"progress"} | ({"search"} if "search" in old and "search" in new else set())
    significant = {k: v for k, v in old.items() if k not in volatile} != {
        k: v for k, v in new.items() if k not in volatile}
    if significant or last_write is None:
        return True, None
    elapsed = now - last_write
    if elapsed >= min_interval:
        return True, None
    return False, min_interval - elapsed
