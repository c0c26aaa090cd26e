"""Failures a user can act on: :class:`StageError` and its reasons.

Each carries the ``reason``, message and spec ``field`` that end up in
``FineTuneJob.status.error`` (reason -> ``status.error.reason``). A module of its own, below
every library module and stage, so that raising one never imports the stage registry.
"""

from __future__ import annotations

from typing import Optional

from tailor_trainer.redact import redact


class StageError(Exception):
    """A failure with a reason the operator shows as is; ``exit_code`` 1 unless said otherwise.

    The message goes to the status, Events and the log: credential-shaped text is masked."""

    reason = "StageFailed"
    exit_code = 1

    def __init__(self, message: str, *, field: Optional[str] = None, reason: Optional[str] = None):
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.field = field
        if reason:
            self.reason = reason


class InvalidSpec(StageError):
    """The spec cannot work with this model or data (retrying will not help)."""

    reason = "InvalidSpec"
    exit_code = 2


class ModelInvalid(StageError):
    reason = "ModelInvalid"


class DataInvalid(StageError):
    reason = "DataInvalid"


class Diverged(StageError):
    """The training loss became NaN or infinite."""

    reason = "Diverged"


class GateFailed(StageError):
    """An evaluation gate was missed; the message names the metric, value and threshold."""

    reason = "GateFailed"


class TrainingFailed(StageError):
    reason = "TrainingFailed"
