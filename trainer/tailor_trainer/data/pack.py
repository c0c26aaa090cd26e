"""Sequence packing: several short examples per row, without attention across them.

Examples are gathered into a window (``window_tokens``, a bounded amount of memory whatever the
dataset's size) and placed best-fit decreasing: longest first, each into the open sequence it
fills most tightly, a new sequence when none has room. Sequences at least ``FULL`` full are
emitted; the examples of the emptier ones (the last few that BFD opens) go back to the window to
fill gaps next time, up to a bounded share, so on skewed length distributions the rows come out
≥ 97% full (tests/unit/test_train_speed.py). ``flush`` packs what is left.

``position_ids`` restart at 0 at each example, which is how the train stage tells the examples
apart (it builds block-diagonal attention, or passes them to a varlen kernel), and the first
label of every example after the first is -100 so no loss is taken on predicting one example's
first token from the previous one.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Iterator

from tailor_trainer.data.tokenize import IGNORE_INDEX

PackedRow = dict

FULL = 0.97
"""A packed sequence at least this full (of max_len) is emitted when its window is packed."""
CARRY_SHARE = 0.125
"""At most this share of a window's tokens is carried to the next window in emptier sequences."""


class Packer:
    def __init__(self, max_len: int, fold: int = 0, window_tokens: int = 0):
        self.max_len = max_len
        self.fold = fold
        # 256 sequences' worth (at least 16), at most ~2M tokens of Python lists
        self.window_tokens = window_tokens or min(max(256 * max_len, 1 << 18), max(16 * max_len, 1 << 21))
        self._items: list[tuple[int, str, list[int], list[int]]] = []  # (arrival, id, ids, labels)
        self._tokens = 0
        self._arrival = 0

    def add(self, row_id: str, ids: list[int], labels: list[int]) -> list[PackedRow]:
        """Add one example (already at most max_len long); returns the sequences that closed."""
        self._items.append((self._arrival, row_id, ids, labels))
        self._arrival += 1
        self._tokens += len(ids)
        if self._tokens < self.window_tokens:
            return []
        return self._pack(final=False)

    def flush(self) -> Iterator[PackedRow]:
        yield from self._pack(final=True)

    def _pack(self, final: bool) -> list[PackedRow]:
        bins = best_fit_decreasing(self._items, self.max_len)
        self._items, self._tokens = [], 0
        out = []
        carry_limit = CARRY_SHARE * self.window_tokens
        # emptiest first: those are the ones worth carrying over
        for used, members in sorted(bins, key=lambda b: (b[0], b[1][0][0])):
            if not final and used < FULL * self.max_len and self._tokens + used <= carry_limit:
                self._items.extend(members)
                self._tokens += used
            else:
                out.append((members[0][0], members))
        self._items.sort(key=lambda m: m[0])
        return [self._emit(members) for _, members in sorted(out, key=lambda b: b[0])]

    def _emit(self, members: list[tuple[int, str, list[int], list[int]]]) -> PackedRow:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for k, (_, _, m_ids, m_labels) in enumerate(members):
            ids.extend(m_ids)
            labels.extend(m_labels if k == 0 else [IGNORE_INDEX] + list(m_labels[1:]))
            pos.extend(range(len(m_ids)))
        h = hashlib.blake2b("+".join(m[1] for m in members).encode(), digest_size=16).hexdigest()
        return {"id": h, "input_ids": ids, "labels": labels, "position_ids": pos,
                "prompt": None, "reference": None, "fold": self.fold}


def best_fit_decreasing(items: list, capacity: int) -> list[tuple[int, list]]:
    """Bins of ``items`` (tuples whose [0] is an arrival order and [2] the tokens): longest first
    (ties in arrival order), each into the bin with the least room that still fits it. Returns
    (tokens used, members in placement order) per bin, in the order the bins were opened."""
    order = sorted(items, key=lambda m: (-len(m[2]), m[0]))
    bins: list[tuple[int, list]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for item in order:
        n = len(item[2])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
            used, members = bins[b]
            members.append(item)
            bins[b] = (used + n, members)
            room -= n
        else:
            b = len(bins)
            bins.append((n, [item]))
            room = capacity - n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins
