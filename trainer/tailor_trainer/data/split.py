"""Deterministic splits and folds from a stable hash of the row's content id and the seed.

A row's split depends only on its own content and the seed, never on the other rows or their
order: appending rows never moves an old row, and every machine computes the same split.
"""

from __future__ import annotations

import hashlib

from tailor_trainer.config import Split

SPLITS = ("train", "validation", "test")


def _unit(row_id: str, seed: int, salt: str) -> float:
    """A number in [0, 1) from (seed, salt, id), uniform for practical purposes."""
    h = hashlib.blake2b(f"{seed}:{salt}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def assign_split(row_id: str, split: Split) -> str:
    u = _unit(row_id, split.seed, "split")
    if u < split.test:
        return "test"
    if u < split.test + split.validation:
        return "validation"
    return "train"


def assign_fold(row_id: str, seed: int, folds: int) -> int:
    """Fold in [0, folds) for k-fold cross-validation; 0 when folds <= 1."""
    if folds <= 1:
        return 0
    return int(_unit(row_id, seed, "fold") * folds)
