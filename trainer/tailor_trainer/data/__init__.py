"""Data preparation building blocks used by the prep stage and ``inspect``.

sources (where rows come from) -> formats (bytes to raw rows, with line numbers) -> rows
(schema mapping, type checks) -> cleaning (normalize, filter, dedupe) -> split (stable hash)
-> tokenize (labels, chat masking) -> pack; ``engine`` drives them in one streaming pass.
"""

from __future__ import annotations


class DataError(Exception):
    """A data problem that makes the whole Dataset unusable (not one bad row).

    ``reason`` is the CamelCase reason of the Ready=False condition (EmptySource, MissingColumn,
    SourceUnreachable, AccessDenied, ...); ``message`` names the file, line or field at fault.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message
