"""Check manifests against the models, with errors that name the field path (pure, no cluster)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import ValidationError

from tailor_operator.api.v1alpha1 import API_VERSION, CRON_PATTERN, KINDS
from tailor_trainer._base import PATTERN_HELP, error_path

_HELP = {**PATTERN_HELP, CRON_PATTERN: "must be a 5-field cron schedule such as \"0 3 * * 1\""}


@dataclass(frozen=True)
class Problem:
    """One finding: where (file, document, object) and which field."""

    source: str
    document: int
    obj: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:doc {self.document} ({self.obj})"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


def field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def message_for(error: dict[str, Any]) -> str:
    """pydantic's message, with regular expressions replaced by words."""
    if error.get("type") == "string_pattern_mismatch":
        pattern = (error.get("ctx") or {}).get("pattern")
        if pattern in _HELP:
            return f"{error.get('input')!r} {_HELP[pattern]}"
    if error.get("type") == "extra_forbidden":
        return "unknown field (check the spelling; fields are camelCase)"
    return _clean(error["msg"])


def _clean(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def problems_for(obj: Any, source: str = "<input>", document: int = 1) -> list[Problem]:
    """Validate one parsed YAML document. Non-Tailor kinds are not this tool's business."""
    if not isinstance(obj, dict):
        return [Problem(source, document, "?", "", "document is not a mapping")]
    kind = obj.get("kind", "?")
    name = (obj.get("metadata") or {}).get("name", "?")
    label = f"{kind}/{name}"
    if obj.get("apiVersion") != API_VERSION:
        if str(obj.get("apiVersion", "")).startswith("tailor.dev/"):
            return [Problem(source, document, label, "apiVersion",
                            f"unsupported version {obj.get('apiVersion')!r}; use {API_VERSION}")]
        return []
    if kind not in KINDS:
        return [Problem(source, document, label, "kind",
                        f"unknown kind {kind!r}; expected one of {', '.join(sorted(KINDS))}")]
    try:
        KINDS[kind].model_validate(obj)
    except ValidationError as err:
        return [
            Problem(source, document, label, field_path(error_path(e)), message_for(e))
            for e in err.errors()
        ]
    return []


def iter_documents(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open() as fh:
        for index, doc in enumerate(yaml.safe_load_all(fh), start=1):
            if doc is not None:
                yield index, doc


def validate_file(path: Path) -> tuple[int, list[Problem]]:
    """(number of Tailor objects checked, problems)."""
    checked = 0
    problems: list[Problem] = []
    try:
        docs = list(iter_documents(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        return 0, [Problem(str(path), 0, where, "", f"not valid YAML: {err}")]
    for index, doc in docs:
        if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("tailor.dev/"):
            checked += 1
        problems.extend(problems_for(doc, str(path), index))
    return checked, problems
