"""Sequence packing: several short examples per row, without attention across them.

Examples are appended in order to the current sequence until the next one would not fit in
``max_len`` tokens; then the sequence is emitted. ``position_ids`` restart at 0 at each
example, which is how the train stage tells the examples apart (it builds block-diagonal
attention, or passes them to a varlen kernel), and the first label of every example after the
first is -100 so no loss is taken on predicting one example's first token from the previous one.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Optional

from tailor_trainer.data.tokenize import IGNORE_INDEX

PackedRow = dict


class Packer:
    def __init__(self, max_len: int, fold: int = 0):
        self.max_len = max_len
        self.fold = fold
        self._ids: list[int] = []
        self._labels: list[int] = []
        self._pos: list[int] = []
        self._members: list[str] = []

    def add(self, row_id: str, ids: list[int], labels: list[int]) -> Optional[PackedRow]:
        """Add one example (already at most max_len long); returns a full sequence if one closed."""
        out = None
        if self._ids and len(self._ids) + len(ids) > self.max_len:
            out = self._emit()
        if self._ids:
            labels = [IGNORE_INDEX] + labels[1:]
        self._ids.extend(ids)
        self._labels.extend(labels)
        self._pos.extend(range(len(ids)))
        self._members.append(row_id)
        return out

    def flush(self) -> Iterator[PackedRow]:
        if self._ids:
            yield self._emit()

    def _emit(self) -> PackedRow:
        h = hashlib.blake2b("+".join(self._members).encode(), digest_size=16).hexdigest()
        row = {"id": h, "input_ids": self._ids, "labels": self._labels, "position_ids": self._pos,
               "prompt": None, "reference": None, "fold": self.fold}
        self._ids, self._labels, self._pos, self._members = [], [], [], []
        return row
