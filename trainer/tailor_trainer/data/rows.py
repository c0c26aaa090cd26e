"""Schema mapping: a raw row (source columns) -> the schema's canonical fields, type-checked.

Canonical fields per schema (``config.SCHEMA_COLUMNS``):
  text        {"text": str}
  completion  {"prompt": str, "completion": str}
  instruction {"instruction": str, "input": str ("" when absent), "output": str}
  chat        {"messages": [{"role": str, "content": str}, ...]}  (a JSON string is parsed;
              ShareGPT-style {"from": human|gpt|system, "value": ...} is accepted too)
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from tailor_trainer.config import SCHEMA_COLUMNS, DataSchema
from tailor_trainer.data.formats import MISSING_FIELD, WRONG_TYPE, json_problem

Fields = dict[str, Any]
Issue = tuple[tuple[str, str], str]  # ((dropKey, Reason), message)

OPTIONAL = {"input"}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                   "assistant": "assistant", "tool": "tool"}


class SchemaMapper:
    """Maps source columns to canonical fields; remembers which columns were never seen.

    ``seen_keys`` (up to 64 column names found in rows) is for counting only: the names are
    file content and never go into a message.
    """

    def __init__(self, schema: DataSchema, column_map: dict[str, str]):
        self.schema = schema
        self.columns = SCHEMA_COLUMNS[schema]
        self.source = {c: column_map.get(c, c) for c in self.columns}
        self.seen_keys: set[str] = set()
        self.absent: dict[str, int] = {c: 0 for c in self.columns}
        self.mapped = 0

    @property
    def required_sources(self) -> tuple[str, ...]:
        return tuple(self.source[c] for c in self.columns if c not in OPTIONAL)

    def _where(self, col: str) -> str:
        src = self.source[col]
        return f"field {col!r}" if src == col else f"field {col!r} (source column {src!r})"

    def map(self, value: dict[str, Any], line: int) -> Union[Fields, Issue]:
        self.mapped += 1
        if len(self.seen_keys) < 64:
            self.seen_keys.update(list(value)[:64])
        out: Fields = {}
        for col in self.columns:
            src = self.source[col]
            v = value.get(src)
            if v is None:
                if src not in value:
                    self.absent[col] += 1
                if col in OPTIONAL:
                    out[col] = ""
                    continue
                return MISSING_FIELD, f"line {line}: missing {self._where(col)}"
            if col == "messages":
                msgs = _messages(v, line, self.source[col])
                if isinstance(msgs, tuple):
                    return msgs
                out[col] = msgs
            elif isinstance(v, str):
                out[col] = v
            else:
                return WRONG_TYPE, f"line {line}: {self._where(col)} must be a string, got {_type(v)}"
        return out

    def missing_column(self) -> Optional[str]:
        """A required column absent from every row read (a mapping problem, not bad rows)."""
        if self.mapped == 0:
            return None
        for col in self.columns:
            if col not in OPTIONAL and self.absent[col] == self.mapped:
                return col
        return None


def _type(v: Any) -> str:
    return {dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}.get(
        type(v), type(v).__name__)


def _messages(v: Any, line: int, name: str) -> Union[list[dict[str, str]], Issue]:
    if isinstance(v, str):  # CSV cells and some exports hold the list as JSON text
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            return WRONG_TYPE, (f"line {line}: field '{name}' is a string but not a JSON list "
                                f"({json_problem(e)})")
    if not isinstance(v, list):
        return WRONG_TYPE, f"line {line}: field '{name}' must be a list of messages, got {_type(v)}"
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            return WRONG_TYPE, f"line {line}: field '{name}[{i}]' must be an object, got {_type(m)}"
        role, content = m.get("role"), m.get("content")
        if role is None and "from" in m:
            role, content = _SHAREGPT_ROLES.get(str(m.get("from")), m.get("from")), m.get("value")
        if role is None:
            return MISSING_FIELD, f"line {line}: missing field '{name}[{i}].role'"
        if content is None:
            return MISSING_FIELD, f"line {line}: missing field '{name}[{i}].content'"
        if not isinstance(role, str):
            return WRONG_TYPE, f"line {line}: field '{name}[{i}].role' must be a string, got {_type(role)}"
        if not isinstance(content, str):
            return WRONG_TYPE, f"line {line}: field '{name}[{i}].content' must be a string, got {_type(content)}"
        out.append({"role": role, "content": content})
    if out and not any(m["role"] == "assistant" for m in out):
        return MISSING_FIELD, f"line {line}: field '{name}' has no assistant turn (nothing to learn from)"
    return out


def text_fields(schema: DataSchema, fields: Fields) -> list[str]:
    """All text of a row, in a fixed order (for lengths, hashing, near-dedupe)."""
    if schema is DataSchema.chat:
        return [m["content"] for m in fields["messages"]]
    return [fields[c] for c in SCHEMA_COLUMNS[schema]]


def prompt_text(schema: DataSchema, fields: Fields) -> str:
    """The input side of a row (what a model is asked), for eval-overlap detection."""
    if schema is DataSchema.text:
        return fields["text"]
    if schema is DataSchema.completion:
        return fields["prompt"]
    if schema is DataSchema.instruction:
        return fields["instruction"] + "\n" + fields["input"]
    msgs = fields["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    return "\n".join(m["content"] for m in msgs[:last] if m["role"] != "assistant")
