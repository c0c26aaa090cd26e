"""Data preparation building blocks used by the prep stage and ``inspect``.

sources (where rows come from) -> formats (bytes to raw rows, with line numbers) -> rows
(schema mapping, type checks) -> cleaning (normalize, filter, dedupe) -> split (stable hash)
-> tokenize (labels, chat masking) -> pack; ``engine`` drives them in one streaming pass.
"""

from __future__ import annotations

from tailor_trainer.redact import redact


class DataError(Exception):
    """A data problem that makes the whole Dataset unusable (not one bad row).

    ``reason`` is the CamelCase reason of the Ready=False condition (EmptySource, MissingColumn,
    SourceUnreachable, AccessDenied, ...); ``message`` names the file, line or field at fault.

    The message ends up in the Dataset's status and Events, which people read who may not read
    the Secrets the validation pod mounts, and a source may be any file (a mounted Secret, too).
    So a message never quotes source content — no header cells, column names found in the file,
    values, line excerpts, or parser/client exception text that may carry them — only what the
    spec says (URI, schema columns, columnMap), line numbers, counts and exception type names.
    Credential-shaped text left in it (a signed URL in the spec) is masked by :func:`redact`.
    """

    def __init__(self, reason: str, message: str):
        message = redact(message)
        super().__init__(message)
        self.reason = reason
        self.message = message
