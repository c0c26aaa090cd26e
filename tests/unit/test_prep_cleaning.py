"""Cleaning rules, malformed rows and Dataset-level verdicts, each with exact expected counts.

Runs the real engine (no tokenizer: validation only) on small files the tests write.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest

from tailor_trainer.config import DataSchema, Preprocessing, ResolvedDataset
from tailor_trainer.data.cleaning import Cleaner, content_id
from tailor_trainer.data.engine import PrepOptions, prepare
from tailor_trainer.data.split import assign_split

NO_SPLIT = {"validation": 0.0, "test": 0.0}


def write_lines(path: Path, lines: list) -> Path:
    """Lines as given: dicts become JSON, str are written raw, bytes verbatim."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            if isinstance(line, str):
                line = line.encode("utf-8")
            f.write(line + b"\n")
    return path


def dataset(uri, **spec) -> ResolvedDataset:
    spec.setdefault("preprocessing", {})
    spec["preprocessing"].setdefault("maxBadFraction", 1.0)
    spec.setdefault("split", NO_SPLIT)
    return ResolvedDataset.model_validate({"name": "t", "source": {"uri": str(uri)}, **spec})


def run(ds: ResolvedDataset):
    return prepare(ds, PrepOptions(seed=ds.split.seed))


def test_every_text_rule_counts_exactly(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [
        {"text": "Hello world"},                   # 1 kept
        {"text": "  Hello world  "},               # 2 duplicate after strip
        {"text": "Cafe\u0301 au lait"},            # 3 kept (NFC -> Café)
        {"text": "Caf\u00e9 au lait"},             # 4 duplicate after NFC
        {"text": ""},                              # 5 empty
        {"text": " \n\t "},                        # 6 empty
        {"text": None},                            # 7 missingField
        {"txt": "wrong column"},                   # 8 missingField
        {"text": 5},                               # 9 wrongType
        {"text": "short"},                         # 10 tooShort (minChars 6)
        {"text": "x" * 41},                        # 11 tooLong (maxChars 40)
        "{not json",                               # 12 badJson
        b'{"text": "caf\xe9"}',                    # 13 invalidUtf8 (latin-1 byte)
        {"text": "kept\n\n\n\nwith blank lines"},  # 14 kept
    ])
    r = run(dataset(f, preprocessing={"minChars": 6, "maxChars": 40}))
    assert r.error is None
    assert r.rows_read == 14
    assert dict(r.dropped) == {"duplicate": 2, "empty": 2, "missingField": 2, "wrongType": 1,
                               "tooShort": 1, "tooLong": 1, "badJson": 1, "invalidUtf8": 1}
    assert r.rows == 3 and r.splits == {"train": 3, "validation": 0, "test": 0}
    assert [(e["line"], e["reason"]) for e in r.first_errors] == [
        (7, "MissingField"), (8, "MissingField"), (9, "WrongType"), (12, "BadJSON"), (13, "InvalidUTF8")]
    assert "field 'text'" in r.first_errors[0]["message"]


def test_switching_rules_off_keeps_those_rows(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [
        {"text": "Hello world"}, {"text": "  Hello world  "}, {"text": "Hello world"},
        {"text": "Cafe\u0301"}, {"text": "Caf\u00e9"}, {"text": "   "},
    ])
    off = {"normalizeUnicode": False, "stripWhitespace": False, "dropEmpty": False,
           "dedupe": "none", "minChars": 0}
    r = run(dataset(f, preprocessing=off))
    assert r.rows == 6 and not r.dropped
    # Only exact dedupe on: the identical line 3 goes, the others differ byte-wise.
    r = run(dataset(f, preprocessing={**off, "dedupe": "exact"}))
    assert dict(r.dropped) == {"duplicate": 1}


def test_cleaner_transforms():
    pre = Preprocessing()
    c = Cleaner(DataSchema.text, pre)
    row = {"text": "  Cafe\u0301\r\n\r\n\r\n\r\nnext  \n"}
    assert c.clean(row) is None
    assert row["text"] == "Caf\u00e9\n\nnext" and unicodedata.is_normalized("NFC", row["text"])
    # The seam between prompt and completion keeps its whitespace; the outer ends are trimmed.
    c = Cleaner(DataSchema.completion, pre)
    row = {"prompt": "  Capital of France:", "completion": " Paris\n"}
    assert c.clean(row) is None
    assert row == {"prompt": "Capital of France:", "completion": " Paris"}
    c = Cleaner(DataSchema.instruction, pre)
    assert c.clean({"instruction": "Do it", "input": "", "output": "done"}) is None  # input optional
    assert c.clean({"instruction": "Do it", "input": "x", "output": "  "}) == "empty"


def test_chat_rules(tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    f = write_lines(tmp_path / "c.jsonl", [
        {"messages": good},                                                   # 1 kept
        {"messages": [{"role": "user", "content": "hi"}]},                    # 2 no assistant
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},  # 3 missing content
        {"messages": "not a list"},                                           # 4 wrongType
        {"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]},  # 5
        {"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": " "}]},  # 6 empty
        {"messages": []},                                                     # 7 empty
        {"conversations": [{"from": "human", "value": "yo"}, {"from": "gpt", "value": "sup"}]},  # 8 ShareGPT
    ])
    r = run(dataset(f, schema="chat"))
    assert dict(r.dropped) == {"missingField": 3, "wrongType": 2, "empty": 2}
    assert [(e["line"], e["reason"]) for e in r.first_errors] == [
        (2, "MissingField"), (3, "MissingField"), (4, "WrongType"), (5, "WrongType"), (8, "MissingField")]
    assert "no assistant turn" in r.first_errors[0]["message"]
    assert "messages[0].content" in r.first_errors[1]["message"]
    r = run(dataset(f, schema="chat", columnMap={"messages": "conversations"}))
    assert r.rows == 1  # only the ShareGPT row has that column; the rest are missing it


def test_near_duplicates(tmp_path):
    base = ("Our support team answers every ticket within one business day, including weekends "
            "and public holidays, and escalates outages to the on-call engineer immediately. ") * 2
    rows = [
        {"text": base},
        {"text": base.replace("weekends", "weekend")},  # one edit: Jaccard ~0.97
        {"text": base.upper().replace(",", ";")},       # case/punctuation only: Jaccard 1
        {"text": "Invoices are sent on the first day of each month by email to the billing contact."},
    ]
    f = write_lines(tmp_path / "n.jsonl", rows)
    r = run(dataset(f, preprocessing={"dedupe": "near", "nearDuplicateThreshold": 0.9}))
    assert dict(r.dropped) == {"nearDuplicate": 2} and r.rows == 2
    r = run(dataset(f, preprocessing={"dedupe": "near", "nearDuplicateThreshold": 1.0}))
    assert dict(r.dropped) == {"nearDuplicate": 1} and r.rows == 3
    r = run(dataset(f, preprocessing={"dedupe": "exact"}))
    assert not r.dropped and r.rows == 4


def _expected_overlap(rows: list[dict], split) -> int:
    groups: dict[str, list[str]] = {}
    for row in rows:
        key = " ".join(re.sub(r"[\W_]+", " ", row["prompt"].casefold()).split())
        groups.setdefault(key, []).append(assign_split(content_id(DataSchema.completion, dict(row)), split))
    return sum(sum(s != "train" for s in g) for g in groups.values() if "train" in g)


def test_eval_overlap_removed_and_counted(tmp_path):
    # Same question, different answers: different rows (ids), so they may land in different
    # splits; held-out copies of a question that is also in train leak and are removed.
    split = {"validation": 0.3, "test": 0.3, "seed": 7}
    rows = [{"prompt": f"Is {i} even?", "completion": f" {answer} ({i})"}
            for i in range(40) for answer in ("yes", "no")]
    f = write_lines(tmp_path / "o.jsonl", rows)
    ds = dataset(f, schema="completion", split=split)
    expected = _expected_overlap(rows, ds.split)
    assert expected > 0
    r = run(ds)
    assert r.dropped["evalOverlap"] == expected
    assert r.rows == 80 - expected
    # Case and punctuation do not hide a leak.
    more = rows + [{"prompt": "IS 3 EVEN", "completion": " maybe"}]
    r2 = run(dataset(write_lines(tmp_path / "o2.jsonl", more), schema="completion", split=split))
    assert r2.dropped["evalOverlap"] == _expected_overlap(more, ds.split)
    r = run(dataset(f, schema="completion", split=split, preprocessing={"removeEvalOverlap": False}))
    assert "evalOverlap" not in r.dropped and r.rows == 80


def test_mixed_file_line_numbers(tmp_path):
    f = write_lines(tmp_path / "mixed.jsonl", [
        {"text": "good one"},          # 1
        '{"text": "unterminated',      # 2 BadJSON
        "",                            # 3 blank: skipped, not a row
        {"text": "good two"},          # 4
        b"\xff\xfe garbage",           # 5 InvalidUTF8
        {"text": "good three"},        # 6
        "[1, 2]",                      # 7 WrongType (not an object)
        {"other": "x"},                # 8 MissingField
    ])
    r = run(dataset(f))
    assert r.rows_read == 7 and r.rows == 3
    assert [(e["file"], e["line"], e["reason"]) for e in r.first_errors] == [
        ("mixed.jsonl", 2, "BadJSON"), ("mixed.jsonl", 5, "InvalidUTF8"),
        ("mixed.jsonl", 7, "WrongType"), ("mixed.jsonl", 8, "MissingField")]
    assert r.first_errors[0]["message"].startswith("line 2:")


def test_csv_line_numbers_follow_multiline_fields(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(b'prompt,completion\n'
                  b'"two\nlines",ok\n'       # lines 2-3
                  b'a,b,c\n'                 # line 4: 3 fields
                  b'caf\xe9,x\n'             # line 5: invalid UTF-8
                  b'fine,row\n')             # line 6
    r = run(dataset(f, schema="completion"))
    assert r.rows == 2
    assert [(e["line"], e["reason"]) for e in r.first_errors] == [(4, "BadCSV"), (5, "InvalidUTF8")]
    assert r.first_errors[0]["message"] == "line 4: 3 fields, the header has 2"
    # The field by number; its header cell too because the spec names it (schema column).
    assert r.first_errors[1]["message"].startswith("line 5: invalid UTF-8 in field 1 ('prompt')")


def test_max_bad_fraction(tmp_path):
    lines = [{"text": f"row {i}"} for i in range(98)] + ["{bad", {"text": 1}]
    f = write_lines(tmp_path / "d.jsonl", lines)
    r = run(dataset(f, preprocessing={"maxBadFraction": 0.01}))
    assert r.error.reason == "TooManyBadRows"
    assert "2 of 100 rows" in r.error.message and "line 99" in r.error.message
    r = run(dataset(f, preprocessing={"maxBadFraction": 0.02}))
    assert r.error is None and r.rows == 98 and dict(r.dropped) == {"badJson": 1, "wrongType": 1}


def test_missing_column_is_specific(tmp_path):
    f = write_lines(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)])
    r = run(dataset(f, schema="completion"))
    assert r.error.reason == "MissingColumn"
    assert "'prompt'" in r.error.message and "5 parsed; 2 column names seen" in r.error.message
    # The file's own column names are content and never echoed (a JSON key may be a secret).
    assert "question" not in r.error.message and "answer" not in r.error.message
    assert "columnMap" in r.error.message
    r = run(dataset(f, schema="completion", columnMap={"prompt": "question", "completion": "answer"}))
    assert r.error is None and r.rows == 5
    # Headers are checked before any row is read.
    c = tmp_path / "qa.csv"
    c.write_text("question,answer\nq,a\n")
    r = run(dataset(c, schema="completion", columnMap={"prompt": "question"}))
    assert r.error.reason == "MissingColumn" and "'completion'" in r.error.message
    assert "the header has 2 columns" in r.error.message and "answer" not in r.error.message


def test_empty_source_and_all_dropped(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    for name in ("empty.jsonl", "blank.jsonl", "nothing-*.jsonl", "missing.jsonl"):
        r = run(dataset(tmp_path / name))
        assert r.error.reason == "EmptySource", name
    f = write_lines(tmp_path / "d.jsonl", [{"text": ""}, {"text": "  "}, {"text": "ok"}, {"text": "ok"}])
    r = run(dataset(f, preprocessing={"minChars": 3}))
    assert r.error.reason == "AllRowsDropped"
    assert r.error.message == "all 4 rows were dropped (empty 2, tooShort 2)"


def test_keyset_matches_a_python_set():
    from tailor_trainer.data.keyset import KeySet

    import random as rnd

    rng = rnd.Random(0)
    keys = [rng.getrandbits(64) for _ in range(3000)]
    ks, ref = KeySet(buffer=100), set()
    for k in keys + keys[:500]:
        assert ks.add(k) == (k not in ref)
        ref.add(k)
    assert len(ks) == len(ref) and all(k in ks for k in keys) and 2**64 - 1 not in ks
    other = KeySet(buffer=7)
    for k in keys[100:200] + [1, 2, 3]:
        other.add(k)
    assert set(ks.intersection(other).array().tolist()) == set(keys[100:200])
