"""The prep engine: one streaming pass over the source, then a short pass over held-out rows.

Pass 1 reads, maps, cleans, dedupes and splits each row, tokenizes rows in batches, and writes
train rows straight to ``train.parquet``. Validation/test rows are staged (a local Parquet file)
because whether one overlaps train is only known once every train row has been seen. Pass 2
drops staged rows whose prompt also appears in train (``evalOverlap``) and writes the rest.
Memory holds a batch of rows plus about 8 bytes per row for exact dedupe and 8 for the overlap
keys (``KeySet``); near dedupe adds a MinHash (~1 KiB) per row.

The revision is an order-independent fingerprint of the kept rows' content ids (sum mod 2^128,
with the count and schema), so it is the same on every machine and for any file order, and it
does not depend on the tokenizer (``inspect`` without a tokenizer gives the same revision).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tailor_trainer.config import Overlong, ResolvedDataset
from tailor_trainer.data import DataError
from tailor_trainer.data.cleaning import Cleaner, Deduper, content_id, loose_key
from tailor_trainer.data.formats import MALFORMED_KEYS
from tailor_trainer.data.keyset import KeySet
from tailor_trainer.data.pack import Packer
from tailor_trainer.data.rows import SchemaMapper, prompt_text, text_fields
from tailor_trainer.data.sources import iter_source
from tailor_trainer.data.split import SPLITS, assign_fold, assign_split
from tailor_trainer.data.tokenize import IGNORE_INDEX, Encoder
from tailor_trainer.data.writer import RowWriter
from tailor_trainer.redact import redact

MAX_ERRORS = 20


@dataclass
class PrepOptions:
    tokenizer: Any = None
    max_seq_length: Optional[int] = None
    overlong: Overlong = Overlong.truncate
    packing: bool = False
    folds: int = 0
    seed: int = 42
    out_dir: Optional[str] = None
    """Local directory for <split>.parquet; None validates only."""
    batch_rows: int = 512
    batch_chars: int = 1 << 20
    """Tokenize when either many rows or this much text is waiting (bounds memory on long rows)."""
    progress: Optional[Callable[[dict], None]] = None
    progress_every: int = 50_000

    def __post_init__(self) -> None:
        self.overlong = Overlong(self.overlong)


@dataclass
class PrepResult:
    rows_read: int = 0
    splits: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    sequences: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    dropped: Counter = field(default_factory=Counter)
    first_errors: list[dict] = field(default_factory=list)
    lengths: Counter = field(default_factory=Counter)
    over_limit: int = 0
    total_tokens: int = 0
    fingerprint: Optional[str] = None
    error: Optional[DataError] = None
    tokenized: bool = False

    @property
    def rows(self) -> int:
        return sum(self.splits.values())

    @property
    def bad(self) -> int:
        return sum(v for k, v in self.dropped.items() if k in MALFORMED_KEYS)

    def token_stats(self) -> dict[str, float]:
        if not self.tokenized or not self.lengths:
            return {}
        n = sum(self.lengths.values())
        ordered = sorted(self.lengths.items())

        def pct(q: float) -> int:  # nearest-rank percentile over the length histogram
            rank, seen = max(1, math.ceil(q * n)), 0
            for length, count in ordered:
                seen += count
                if seen >= rank:
                    return length
            return ordered[-1][0]

        mean = sum(k * v for k, v in ordered) / n
        return {"mean": round(mean, 2), "p50": pct(0.5), "p95": pct(0.95), "max": ordered[-1][0],
                "overLimit": self.over_limit, "total": self.total_tokens}


class _Fingerprint:
    def __init__(self, schema: str):
        self.schema, self.total, self.count = schema, 0, 0

    def add(self, row_id: str) -> None:
        self.total = (self.total + int(row_id, 16)) % (1 << 128)
        self.count += 1

    def hexdigest(self) -> str:
        body = f"tailor-v1:{self.schema}:{self.count}:{self.total:032x}"
        return hashlib.sha256(body.encode()).hexdigest()[:16]


class _Emitter:
    """Stats, overlong handling, packing and writing of rows that are kept (both passes)."""

    def __init__(self, result: PrepResult, opts: PrepOptions, fp: _Fingerprint):
        self.r, self.o, self.fp = result, opts, fp
        self.writers = {s: RowWriter(os.path.join(opts.out_dir, f"{s}.parquet"))
                        for s in SPLITS} if opts.out_dir else {}
        self.packers: dict[tuple[str, int], Packer] = {}

    def emit(self, split: str, row_id: str, fold: int, ids, labels, prompt, reference) -> None:
        r, o = self.r, self.o
        self.fp.add(row_id)
        if r.tokenized:
            n = len(ids)
            r.lengths[n] += 1
            limit = o.max_seq_length
            if limit and n > limit:
                r.over_limit += 1
                if o.overlong is Overlong.drop:
                    r.dropped["overlong"] += 1
                    return
                ids, labels = ids[:limit], labels[:limit]
                if all(x == IGNORE_INDEX for x in labels):  # prompt alone fills the window
                    r.dropped["overlong"] += 1
                    return
            r.total_tokens += len(ids)
        r.splits[split] += 1
        if not self.writers:
            return
        if o.packing:
            packer = self.packers.setdefault((split, fold), Packer(o.max_seq_length, fold))
            for packed in packer.add(row_id, list(ids), list(labels)):
                self._write(split, packed)
            return
        self._write(split, {"id": row_id, "input_ids": ids, "labels": labels, "position_ids": None,
                            "prompt": prompt, "reference": reference, "fold": fold})

    def _write(self, split: str, row: dict) -> None:
        self.writers[split].add(row)
        self.r.sequences[split] += 1

    def finish(self, split: str) -> None:
        """No more rows for ``split``: flush its packers and close its file (frees its buffers)."""
        for key in sorted(k for k in self.packers if k[0] == split):
            for row in self.packers.pop(key).flush():
                self._write(split, row)
        writer = self.writers.pop(split, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for split in SPLITS:
            self.finish(split)


def prepare(ds: ResolvedDataset, opts: PrepOptions) -> PrepResult:
    """Validate (and, with ``opts.out_dir``, write) a Dataset. Data problems end up in
    ``result.error``; this function raises only for bugs."""
    result = PrepResult()
    if opts.out_dir:
        os.makedirs(opts.out_dir, exist_ok=True)
    # Staged held-out rows live next to the outputs (pods often have a small /tmp).
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=opts.out_dir) as staging:
        try:
            _run(ds, opts, result, staging)
        except DataError as e:
            result.error = e
    return result


def _run(ds: ResolvedDataset, opts: PrepOptions, r: PrepResult, staging: str) -> None:
    schema, pre = ds.schema_, ds.preprocessing
    mapper = SchemaMapper(schema, ds.column_map)
    cleaner, deduper = Cleaner(schema, pre), Deduper(pre)
    encoder = Encoder(opts.tokenizer, schema) if opts.tokenizer is not None else None
    r.tokenized = encoder is not None
    if opts.packing and opts.out_dir and not opts.max_seq_length:
        raise DataError("InvalidSpec", "packing needs maxSeqLength")
    fp = _Fingerprint(schema.value)
    emitter = _Emitter(r, opts, fp)
    defer = pre.remove_eval_overlap
    held = {s: RowWriter(os.path.join(staging, f"{s}.parquet"), staging=True) for s in SPLITS[1:]}
    train_keys, eval_keys = KeySet(), KeySet()
    pending: list[tuple[str, str, int, int, dict]] = []
    pending_chars = 0

    def flush() -> None:
        nonlocal pending_chars
        encoded = encoder.encode([p[4] for p in pending]) if encoder else [([], [], None, None)] * len(pending)
        for (split, rid, okey, fold, _), (ids, labels, prompt, ref) in zip(pending, encoded):
            if split != "train" and defer:
                held[split].add({"id": rid, "okey": okey, "fold": fold, "input_ids": ids,
                                 "labels": labels, "prompt": prompt, "reference": ref})
            else:
                emitter.emit(split, rid, fold, ids, labels, prompt, ref)
        pending.clear()
        pending_chars = 0

    for raw in iter_source(ds, mapper.required_sources):
        r.rows_read += 1
        if opts.progress and r.rows_read % opts.progress_every == 0:
            opts.progress({"rowsRead": r.rows_read})
        if raw.issue is None:
            mapped = mapper.map(raw.value, raw.line)
            issue = mapped if isinstance(mapped, tuple) else None
        else:
            issue = raw.issue
        if issue is not None:
            (key, reason), message = issue
            r.dropped[key] += 1
            if len(r.first_errors) < MAX_ERRORS:
                r.first_errors.append({"line": raw.line, "file": redact(raw.file), "reason": reason,
                                       "message": redact(message)})
            continue
        drop = cleaner.clean(mapped)
        if drop is None:
            rid = content_id(schema, mapped)
            drop = deduper.check(rid, text_fields(schema, mapped))
        if drop is not None:
            r.dropped[drop] += 1
            continue
        split = assign_split(rid, ds.split)
        okey = 0
        if defer:
            okey = loose_key(prompt_text(schema, mapped))
            (train_keys if split == "train" else eval_keys).add(okey)
        pending.append((split, rid, okey, assign_fold(rid, opts.seed, opts.folds), mapped))
        pending_chars += sum(map(len, text_fields(schema, mapped)))
        if len(pending) >= opts.batch_rows or pending_chars >= opts.batch_chars:
            flush()
    flush()
    emitter.finish("train")
    for w in held.values():
        w.close()

    # Pass 2: held-out rows whose prompt also appears in train would leak; drop them.
    leaked = train_keys.intersection(eval_keys)
    del train_keys, eval_keys
    for split, w in held.items():
        for row in w.read():
            if row["okey"] in leaked:
                r.dropped["evalOverlap"] += 1
                continue
            emitter.emit(split, row["id"], row["fold"], row["input_ids"], row["labels"],
                         row["prompt"], row["reference"])
        emitter.finish(split)
    emitter.close()
    r.fingerprint = fp.hexdigest()
    _check(ds, r, mapper)


def _check(ds: ResolvedDataset, r: PrepResult, mapper: SchemaMapper) -> None:
    """Dataset-level verdicts, most specific first."""
    where = ds.source.uri or f"ConfigMap {ds.source.config_map_ref.name}"
    if r.rows_read == 0:
        raise DataError("EmptySource", f"{where}: no rows (the source is empty)")
    col = mapper.missing_column()
    if col is not None:
        src = mapper.source[col]
        # The columns the rows do have are file content (a JSON key can be a Secret's value):
        # only their number is reported.
        n = len(mapper.seen_keys)
        seen = f"{min(n, 64)}{'+' if n >= 64 else ''} column name{'s' if n != 1 else ''}"
        hint = f"column {col!r}" if src == col else f"column {src!r} (mapped to {col!r})"
        raise DataError("MissingColumn", f"{where}: {hint} is missing from every row ({mapper.mapped} "
                        f"parsed; {seen} seen, not shown: they are file content); check the "
                        f"source's column names, or map it with columnMap, e.g. "
                        f"columnMap: {{{col}: <source column>}}")
    limit = ds.preprocessing.max_bad_fraction
    if r.bad / r.rows_read > limit:
        first = r.first_errors[0] if r.first_errors else None
        lead = f"; first: {first['file']} line {first['line']}: {first['reason']}" if first else ""
        raise DataError("TooManyBadRows", f"{r.bad} of {r.rows_read} rows "
                        f"({100 * r.bad / r.rows_read:.1f}%) are malformed, above maxBadFraction "
                        f"{100 * limit:g}%{lead} (see firstErrors)")
    if r.rows == 0:
        why = ", ".join(f"{k} {v}" for k, v in r.dropped.most_common())
        raise DataError("AllRowsDropped", f"all {r.rows_read} rows were dropped ({why})")
    if r.splits["train"] == 0:
        raise DataError("EmptyTrainSplit", f"no row landed in the train split ({r.rows} rows: "
                        f"validation {r.splits['validation']}, test {r.splits['test']}); add rows "
                        "or lower split.validation/split.test")
