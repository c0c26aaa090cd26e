"""Deterministic splits (appending rows never moves old ones), folds, and the revision fingerprint."""

from __future__ import annotations

import json
import random
from collections import Counter

import pyarrow.parquet as pq

from tailor_trainer.config import ResolvedDataset, Split
from tailor_trainer.data.engine import PrepOptions, prepare
from tailor_trainer.data.split import assign_fold, assign_split


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset(uri, **spec) -> ResolvedDataset:
    return ResolvedDataset.model_validate({"name": "t", "source": {"uri": str(uri)}, **spec})


def rows(start, stop):
    return [{"text": f"document number {i} about topic {i % 7}"} for i in range(start, stop)]


def split_of(out_dir) -> dict[str, str]:
    where = {}
    for s in ("train", "validation", "test"):
        for rid in pq.read_table(out_dir / f"{s}.parquet", columns=["id"]).column("id").to_pylist():
            where[rid] = s
    return where


def test_appending_rows_never_moves_old_rows(tmp_path):
    f = write(tmp_path / "d.jsonl", rows(0, 300))
    prepare(dataset(f), PrepOptions(out_dir=str(tmp_path / "v1")))
    before = split_of(tmp_path / "v1")
    counts = Counter(before.values())
    assert counts["validation"] > 10 and counts["test"] > 10 and counts["train"] > 200
    # New rows appended and the file reshuffled: every old row stays where it was.
    grown = rows(0, 450)
    random.Random(1).shuffle(grown)
    write(f, grown)
    prepare(dataset(f), PrepOptions(out_dir=str(tmp_path / "v2")))
    after = split_of(tmp_path / "v2")
    assert len(after) == 450
    assert all(after[rid] == s for rid, s in before.items())
    # A different seed gives a different (but again stable) assignment.
    prepare(dataset(f, split={"seed": 1}), PrepOptions(out_dir=str(tmp_path / "v3")))
    assert split_of(tmp_path / "v3") != after


def test_split_fractions_and_folds():
    ids = [f"{i:032x}" for i in range(20000)]
    counts = Counter(assign_split(i, Split(validation=0.1, test=0.2)) for i in ids)
    assert abs(counts["validation"] / 20000 - 0.1) < 0.01 and abs(counts["test"] / 20000 - 0.2) < 0.01
    folds = Counter(assign_fold(i, 42, 5) for i in ids)
    assert sorted(folds) == [0, 1, 2, 3, 4] and min(folds.values()) > 3700
    assert all(assign_fold(i, 42, 0) == 0 for i in ids[:10])


def test_fold_column_written(tmp_path):
    f = write(tmp_path / "d.jsonl", rows(0, 100))
    prepare(dataset(f), PrepOptions(out_dir=str(tmp_path / "o"), folds=4))
    t = pq.read_table(tmp_path / "o" / "train.parquet").to_pylist()
    assert {r["fold"] for r in t} == {0, 1, 2, 3}
    assert all(r["fold"] == assign_fold(r["id"], 42, 4) for r in t)


def test_revision_is_deterministic_and_content_only(tmp_path):
    data = rows(0, 50)
    a = prepare(dataset(write(tmp_path / "a.jsonl", data)), PrepOptions()).fingerprint
    # Golden value: the fingerprint is part of the contract (stable across machines/versions).
    assert a == GOLDEN_REVISION
    assert prepare(dataset(write(tmp_path / "a.jsonl", data)), PrepOptions()).fingerprint == a
    shuffled = list(data)
    random.Random(3).shuffle(shuffled)
    (tmp_path / "parts").mkdir()
    write(tmp_path / "parts" / "1.jsonl", shuffled[:20])
    write(tmp_path / "parts" / "2.jsonl", shuffled[20:] + [{"text": "  " + data[0]["text"]}])
    # Other order, other files, a duplicate that cleaning removes: same cleaned data, same revision.
    assert prepare(dataset(tmp_path / "parts"), PrepOptions()).fingerprint == a
    changed = data[:-1] + [{"text": "something else"}]
    assert prepare(dataset(write(tmp_path / "c.jsonl", changed)), PrepOptions()).fingerprint != a
    fewer = data[:-1]
    assert prepare(dataset(write(tmp_path / "f.jsonl", fewer)), PrepOptions()).fingerprint != a


GOLDEN_REVISION = "21168f4c64b80a0d"
