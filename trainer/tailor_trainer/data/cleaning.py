"""Cleaning: normalize and filter one row at a time; each rule that drops a row names a reason.

Drop reasons (keys of ``Dataset.status.dropped``), in the order the rules run:
  empty          a required field is empty after cleanup (dropEmpty), or a chat has no messages
  tooShort       fewer than minChars characters, all text fields together
  tooLong        more than maxChars characters
  duplicate      same cleaned content as an earlier row (dedupe exact or near)
  nearDuplicate  MinHash Jaccard similarity >= nearDuplicateThreshold with an earlier row
                 (dedupe near)
(``evalOverlap`` is decided after the split, in the engine.)
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
from typing import Optional

from tailor_trainer.config import DataSchema, Dedupe, Preprocessing
from tailor_trainer.data.keyset import KeySet
from tailor_trainer.data.rows import Fields, text_fields

_BLANK_RUNS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def _tidy(s: str, normalize: bool, strip: str) -> str:
    if normalize and not s.isascii():
        s = unicodedata.normalize("NFC", s)
    if strip:
        if "\r" in s:
            s = s.replace("\r\n", "\n").replace("\r", "\n")
        if "\n" in s:
            s = _BLANK_RUNS.sub("\n\n", s)
        s = s.strip() if strip == "both" else (s.lstrip() if strip == "left" else s.rstrip())
    return s


# Whitespace at the seam between prompt and completion is part of the data (" Paris" after
# "Capital of France:"), so only the outer ends are trimmed there.
_STRIP_SIDE = {
    DataSchema.completion: {"prompt": "left", "completion": "right"},
}


def content_id(schema: DataSchema, fields: Fields) -> str:
    """Stable content hash of a cleaned row (hex, 128 bits): the row's id and split key."""
    body = json.dumps([schema.value, fields], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(body.encode("utf-8"), digest_size=16).hexdigest()


_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def loose_key(text: str) -> int:
    """64-bit key of text with case, (ASCII) punctuation and spacing ignored (eval-overlap)."""
    folded = " ".join(text.casefold().translate(_PUNCT).split())
    return int.from_bytes(hashlib.blake2b(folded.encode("utf-8"), digest_size=8).digest(), "big")


class Cleaner:
    """Normalizes a row in place and returns the reason it must be dropped, if any."""

    def __init__(self, schema: DataSchema, pre: Preprocessing):
        self.schema = schema
        self.pre = pre
        self.sides = _STRIP_SIDE.get(schema, {})

    def clean(self, fields: Fields) -> Optional[str]:
        pre, norm = self.pre, self.pre.normalize_unicode
        strip = "both" if pre.strip_whitespace else ""
        if self.schema is DataSchema.chat:
            for m in fields["messages"]:
                m["content"] = _tidy(m["content"], norm, strip)
                m["role"] = m["role"].strip()
            if not fields["messages"]:
                return "empty"
            if pre.drop_empty and any(not m["content"].strip() for m in fields["messages"]
                                      if m["role"] == "assistant"):
                return "empty"
        else:
            for col, value in fields.items():
                fields[col] = _tidy(value, norm, strip and self.sides.get(col, strip))
            if pre.drop_empty and any(not v.strip() for c, v in fields.items() if c != "input"):
                return "empty"
        chars = sum(len(t) for t in text_fields(self.schema, fields))
        if chars < pre.min_chars:
            return "tooShort"
        if pre.max_chars is not None and chars > pre.max_chars:
            return "tooLong"
        return None


class Deduper:
    """Exact dedupe by content id (8 bytes kept per row); near dedupe with MinHash LSH on top."""

    def __init__(self, pre: Preprocessing, num_perm: int = 128, shingle: int = 5):
        self.mode = pre.dedupe
        self.seen = KeySet()
        self.lsh = None
        if self.mode is Dedupe.near:
            from datasketch import MinHashLSH

            self.threshold = pre.near_duplicate_threshold
            self.num_perm, self.shingle = num_perm, shingle
            # LSH only proposes candidates; a lower bar there means fewer missed pairs.
            self.lsh = MinHashLSH(threshold=min(0.9, 0.9 * self.threshold), num_perm=num_perm)
            self._store: dict[int, object] = {}  # LSH finds candidates; these confirm them

    def check(self, row_id: str, texts: list[str]) -> Optional[str]:
        if self.mode is Dedupe.none:
            return None
        if not self.seen.add(int(row_id[:16], 16)):
            return "duplicate"
        if self.lsh is None:
            return None
        mh = self._minhash(" ".join(texts))
        for cand in self.lsh.query(mh):
            if mh.jaccard(self._store[cand]) >= self.threshold:
                return "nearDuplicate"
        n = len(self._store)
        self.lsh.insert(n, mh)
        self._store[n] = mh
        return None

    def _minhash(self, text: str):
        from datasketch import MinHash

        folded = " ".join(_NON_WORD.sub(" ", text.casefold()).split())
        k = self.shingle
        grams = {folded[i:i + k].encode("utf-8") for i in range(max(1, len(folded) - k + 1))}
        mh = MinHash(num_perm=self.num_perm, seed=1)
        mh.update_batch(list(grams))
        return mh
