"""Streaming readers: a binary stream in, raw rows out, each with its 1-based line (or row) number.

Nothing here holds more than one line (JSONL, text, CSV) or one record batch (Parquet) at a
time, so memory does not grow with the file. A malformed line becomes a row carrying an issue
instead of an exception, so the caller can count it and go on.

Messages (row issues and :class:`DataError`) never quote the file: no header cells, values or
parser text that may echo bytes of it (see :class:`DataError`). They say where (file, line,
field number) and what kind of problem, which is enough to open the file and look.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Optional

from tailor_trainer.config import DataFormat
from tailor_trainer.data import DataError

# Malformed-row reasons (dropped-count key, firstErrors reason). All count against maxBadFraction.
BAD_JSON = ("badJson", "BadJSON")
BAD_CSV = ("badCsv", "BadCSV")
INVALID_UTF8 = ("invalidUtf8", "InvalidUTF8")
WRONG_TYPE = ("wrongType", "WrongType")
MISSING_FIELD = ("missingField", "MissingField")
MALFORMED_KEYS = frozenset(k for k, _ in (BAD_JSON, BAD_CSV, INVALID_UTF8, WRONG_TYPE, MISSING_FIELD))

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(slots=True)
class RawRow:
    """One row as read: a dict of source columns, or the reason it could not be read."""

    file: str
    line: int
    value: Optional[dict[str, Any]] = None
    issue: Optional[tuple[tuple[str, str], str]] = None  # ((dropKey, Reason), message)


_EXTENSIONS = {
    ".jsonl": DataFormat.jsonl,
    ".ndjson": DataFormat.jsonl,
    ".json": DataFormat.jsonl,
    ".csv": DataFormat.csv,
    ".parquet": DataFormat.parquet,
    ".pq": DataFormat.parquet,
    ".txt": DataFormat.text,
    ".text": DataFormat.text,
    ".md": DataFormat.text,
}


def infer_format(name: str, declared: Optional[DataFormat]) -> DataFormat:
    """The declared format, else the one the extension names (``.gz`` ignored), else jsonl."""
    if declared is not None:
        return declared
    base = name.lower().split("?", 1)[0]
    if base.endswith(".gz"):
        base = base[:-3]
    for ext, fmt in _EXTENSIONS.items():
        if base.endswith(ext):
            return fmt
    return DataFormat.jsonl


# Parser messages that carry no bytes of the input (CPython's json and csv). Anything else is
# reported by kind only: some parser messages quote the offending character or text.
_JSON_PROBLEMS = ("Expecting value", "Expecting ',' delimiter", "Expecting ':' delimiter",
                  "Expecting property name enclosed in double quotes", "Unterminated string starting at",
                  "Invalid control character", "Invalid \\uXXXX escape", "Invalid \\escape",
                  "Extra data")
_CSV_PROBLEM = re.compile(r"(?:field larger than field limit \(\d+\)|line contains NUL|unexpected end of "
                          r"data|new-line character seen in unquoted field|'.' expected after '\"')")


def json_problem(e: json.JSONDecodeError) -> str:
    """What is wrong with a JSON text, without quoting it."""
    return next((p for p in _JSON_PROBLEMS if e.msg.startswith(p)), "invalid JSON")


def csv_problem(e: csv.Error) -> str:
    """What is wrong with a CSV record, without quoting it."""
    m = _CSV_PROBLEM.match(str(e))
    return m.group(0) if m else "malformed CSV record"


def _decode(raw: bytes, lineno: int) -> tuple[Optional[str], Optional[str]]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"line {lineno}: invalid UTF-8 at byte {e.start + 1} (save the file as UTF-8)"


def read_jsonl(stream: BinaryIO, file: str) -> Iterator[RawRow]:
    """One JSON object per line; blank lines are skipped (not rows)."""
    first = True
    for lineno, raw in enumerate(stream, 1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw.strip():
            continue
        if first and raw.lstrip().startswith(b"[") and file.lower().endswith(".json"):
            raise DataError("UnsupportedFormat", f"{file} holds a JSON array; Tailor streams JSON Lines "
                            "(one object per line): convert it, e.g. jq -c '.[]' data.json > data.jsonl")
        first = False
        text, err = _decode(raw, lineno)
        if err:
            yield RawRow(file, lineno, issue=(INVALID_UTF8, err))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield RawRow(file, lineno, issue=(
                BAD_JSON, f"line {lineno}: {json_problem(e)} (column {e.colno})"))
            continue
        if not isinstance(value, dict):
            yield RawRow(file, lineno, issue=(
                WRONG_TYPE, f"line {lineno}: expected a JSON object, got {type(value).__name__}"))
            continue
        yield RawRow(file, lineno, value)


def read_text(stream: BinaryIO, file: str) -> Iterator[RawRow]:
    """Plain text: one row per non-blank line, in column ``text``."""
    for lineno, raw in enumerate(stream, 1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw.strip():
            continue
        text, err = _decode(raw, lineno)
        if err:
            yield RawRow(file, lineno, issue=(INVALID_UTF8, err))
            continue
        yield RawRow(file, lineno, {"text": text.rstrip("\r\n")})


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def read_csv(stream: BinaryIO, file: str, required: tuple[str, ...] = ()) -> Iterator[RawRow]:
    """CSV with a header row. Line numbers are those of the file (a quoted field may span lines)."""
    # surrogateescape keeps reading past invalid bytes; the field holding them is reported.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError("BadHeader", f"{file}: cannot read the CSV header: {csv_problem(e)}") from None
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError("MissingColumn", missing_column_message(file, missing[0], len(header), "header"))
    prev_end = reader.line_num
    while True:
        start = prev_end + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            prev_end = reader.line_num
            yield RawRow(file, start, issue=(BAD_CSV, f"line {start}: {csv_problem(e)}"))
            continue
        prev_end = reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != len(header):
            yield RawRow(file, start, issue=(
                BAD_CSV, f"line {start}: {len(fields)} fields, the header has {len(header)}"))
            continue
        bad = next((i for i, v in enumerate(fields) if _has_surrogates(v)), None)
        if bad is not None:
            # The field's number; its header cell only when the spec names it (else it is content).
            col = f" ({header[bad]!r})" if header[bad] in required else ""
            yield RawRow(file, start, issue=(INVALID_UTF8, f"line {start}: invalid UTF-8 in field "
                                                           f"{bad + 1}{col} (save the file as UTF-8)"))
            continue
        yield RawRow(file, start, dict(zip(header, fields)))


def _seekable(stream: BinaryIO) -> BinaryIO:
    try:
        if stream.seekable():
            return stream
    except (AttributeError, OSError):
        pass
    # Parquet needs random access (the footer comes last): spool a stream (http) to a temp file.
    spool = tempfile.TemporaryFile()
    shutil.copyfileobj(stream, spool, 1 << 20)
    spool.seek(0)
    return spool


def read_parquet(stream: BinaryIO, file: str, required: tuple[str, ...] = (),
                 batch_rows: int = 1024) -> Iterator[RawRow]:
    """Parquet, one record batch at a time; the row number is 1-based within the file."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(_seekable(stream))
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a file that is not Parquet
        # The type only: pyarrow's text may quote the file's schema (column names are content).
        raise DataError("BadParquet", f"{file}: not a readable Parquet file ({type(e).__name__})") from None
    names = pf.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError("MissingColumn", missing_column_message(file, missing[0], len(names), "schema"))
    row = 0
    batches = pf.iter_batches(batch_size=batch_rows)
    while True:
        try:
            batch = next(batches, None)
            values = batch.to_pylist() if batch is not None else None
        except Exception as e:  # a corrupt row group or an unsupported type, mid-file
            raise DataError("BadParquet", f"{file}: cannot read the rows after row {row} "
                            f"({type(e).__name__})") from None
        if values is None:
            return
        for value in values:
            row += 1
            yield RawRow(file, row, value)


def missing_column_message(file: str, column: str, count: int, where: str) -> str:
    """MissingColumn for a header (CSV) or schema (Parquet) that lacks ``column``. The file's own
    column names are not listed: they are content (a Secret's value, read as a CSV header)."""
    return (f"{file}: column {column!r} not found; the {where} has {count} "
            f"column{'s' if count != 1 else ''} (their names are file content, not shown here: "
            f"look at the file's {where}); rename it with columnMap, e.g. "
            f"columnMap: {{<schema column>: <source column>}}")


def read_rows(stream: BinaryIO, file: str, fmt: DataFormat, required: tuple[str, ...] = ()) -> Iterator[RawRow]:
    """Dispatch on the format. ``required`` lists source columns a header must contain."""
    if file.lower().split("?", 1)[0].endswith(".gz"):
        import gzip

        stream = gzip.GzipFile(fileobj=stream)
    if fmt is DataFormat.jsonl:
        return read_jsonl(stream, file)
    if fmt is DataFormat.text:
        return read_text(stream, file)
    if fmt is DataFormat.csv:
        return read_csv(stream, file, required)
    return read_parquet(stream, file, required)
