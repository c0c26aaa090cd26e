"""Buffered Parquet writers for prepared rows (the prep -> train contract) and staged rows."""

from __future__ import annotations

import itertools
import os
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_TOKENS = pa.list_(pa.int32())

# docs/stage-contracts.md, "prep -> train/evaluate".
PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input_ids", _TOKENS),
    ("labels", _TOKENS),
    ("position_ids", _TOKENS),
    ("prompt", pa.string()),
    ("reference", pa.string()),
    ("fold", pa.int32()),
])

# Held-out rows waiting for the eval-overlap decision (engine pass 2).
STAGED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("okey", pa.uint64()),
    ("fold", pa.int32()),
    ("input_ids", _TOKENS),
    ("labels", _TOKENS),
    ("prompt", pa.string()),
    ("reference", pa.string()),
])


def _tokens_array(rows: list) -> pa.Array:
    """list<int32> from lists of ints (None allowed), via one flat numpy array: several times
    faster than pa.array on nested Python lists."""
    lengths = np.fromiter((len(r) if r is not None else 0 for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(r for r in rows if r is not None),
                         dtype=np.int32, count=int(offsets[-1]))
    mask = None
    if any(r is None for r in rows):
        mask = pa.array([r is None for r in rows])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)


class RowWriter:
    """Collects row dicts and writes them to Parquet; the file always exists once closed (an
    empty split is an empty table with the full schema, so readers need no special case).

    Rows wait as Python lists (~36 B a token) only until ``batch_tokens``; then they become
    Arrow arrays (4 B a token), which are written as one row group per ``group_tokens``: few,
    large row groups keep the file's footer (held in memory until close) small."""

    def __init__(self, path: str, staging: bool = False, batch_rows: int = 1024,
                 batch_tokens: int = 1 << 18, group_rows: int = 1 << 16, group_tokens: int = 1 << 21):
        self.path = path
        self.schema = STAGED_SCHEMA if staging else PREPARED_SCHEMA
        self.batch_rows, self.batch_tokens = batch_rows, batch_tokens
        self.group_rows, self.group_tokens = group_rows, group_tokens
        self._cols: dict[str, list] = {n: [] for n in self.schema.names}
        self._tokens = 0
        self._batches: list[pa.RecordBatch] = []
        self._group_rows = self._group_tokens = 0
        self._writer = None
        self.rows = 0

    def add(self, row: dict) -> None:
        for name, col in self._cols.items():
            col.append(row.get(name))
        self._tokens += len(row.get("input_ids") or ())
        if len(self._cols["id"]) >= self.batch_rows or self._tokens >= self.batch_tokens:
            self._to_arrow()

    def _to_arrow(self) -> None:
        n = len(self._cols["id"])
        if n:
            arrays = [_tokens_array(self._cols[f.name]) if f.type == _TOKENS
                      else pa.array(self._cols[f.name], type=f.type) for f in self.schema]
            self._batches.append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
            self._group_rows += n
            self._group_tokens += self._tokens
            self.rows += n
        self._cols = {k: [] for k in self._cols}
        self._tokens = 0
        if self._group_rows >= self.group_rows or self._group_tokens >= self.group_tokens:
            self._write_group()

    def _write_group(self) -> None:
        if self._writer is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, self.schema, compression="zstd",
                                            write_statistics=False)
        if self._batches:
            self._writer.write_table(pa.Table.from_batches(self._batches, schema=self.schema),
                                     row_group_size=max(1, self._group_rows))
        self._batches, self._group_rows, self._group_tokens = [], 0, 0

    def close(self) -> None:
        self._to_arrow()
        self._write_group()
        self._writer.close()

    def read(self, batch_rows: int = 128) -> Iterator[dict]:
        """Rows back, in order (for staged files)."""
        pf = pq.ParquetFile(self.path)
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()
