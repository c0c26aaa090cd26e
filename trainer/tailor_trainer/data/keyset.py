"""A compact set of 64-bit keys: ~8 bytes per key instead of ~70 for a Python ``set`` of ints.

Exact dedupe and the eval-overlap check must remember one key per row, so this is what memory
grows with on a large dataset. New keys go to a small Python set; when it fills up it is merged
into one sorted numpy array, where lookups are a binary search.
"""

from __future__ import annotations

import numpy as np


class KeySet:
    def __init__(self, buffer: int = 1 << 16):
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._buffer = buffer

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, key: int) -> bool:
        if key in self._recent:
            return True
        arr = self._sorted
        if not len(arr):
            return False
        i = int(np.searchsorted(arr, np.uint64(key)))
        return i < len(arr) and int(arr[i]) == key

    def add(self, key: int) -> bool:
        """Add ``key``; True when it was not there before."""
        if key in self:
            return False
        self._recent.add(key)
        if len(self._recent) >= self._buffer:
            self._merge()
        return True

    def _merge(self) -> None:
        if self._recent:
            new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._sorted = np.union1d(self._sorted, new)
            self._recent = set()

    def array(self) -> np.ndarray:
        self._merge()
        return self._sorted

    def intersection(self, other: "KeySet") -> "KeySet":
        out = KeySet()
        out._sorted = np.intersect1d(self.array(), other.array(), assume_unique=True)
        return out
