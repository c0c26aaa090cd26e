"""The pipeline's stages: a closed registry behind a small Protocol.

Each stage reads the files the previous ones wrote (docs/stage-contracts.md) and returns its
manifest body; the pipeline writes ``<run>/<stage>/manifest.json`` last. The registry is a fixed
table of functions in this package: a stage name from a config only ever selects one of these
four, never a module path (anyone who can create a FineTuneJob would choose the code that runs).

Failures a user can act on are :class:`StageError` subclasses carrying the ``reason``, message
and spec ``field`` that end up in ``FineTuneJob.status.error``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Protocol

from tailor_trainer.config import TrainerConfig
from tailor_trainer.redact import redact

STAGE_ORDER: tuple[str, ...] = ("prep", "adapt", "train", "evaluate")


# ---------------------------------------------------------------------------------------------
# Errors (reason -> FineTuneJob.status.error.reason)


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


# ---------------------------------------------------------------------------------------------
# What a stage gets and what it is


Progress = Callable[..., None]


@dataclass
class StageContext:
    """Everything a stage may use: the config, the local run directory and the progress callback."""

    config: TrainerConfig
    run_dir: str
    """Local path of the run directory (TrainerConfig.outputUri resolved)."""
    config_hash: str
    progress: Progress = field(default=lambda **_: None)
    """``progress(stage=..., step=..., loss=..., ...)``: fields of the progress document."""
    model_dir: Optional[str] = None
    """Local directory of the base model (resolved once by the pipeline)."""
    mirror: Optional[Any] = None
    """``storage.RunMirror`` when the output is remote (s3): ``run_dir`` is then its local copy."""

    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.run_dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def base_model_dir(self) -> str:
        if self.model_dir is None:
            from tailor_trainer import storage

            try:
                self.model_dir = storage.resolve_model_dir(self.config.model.uri, self.config.model.revision)
            except storage.StorageError as e:
                raise ModelInvalid(str(e), field="spec.baseModel.uri") from e
        return self.model_dir


class Stage(Protocol):
    name: str

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Do the stage's work; return the manifest body (the pipeline adds stage/configHash)."""
        ...


@dataclass(frozen=True)
class _FunctionStage:
    name: str
    fn: Callable[[StageContext], dict[str, Any]]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        return self.fn(ctx)


# Imports live inside the functions: importing this registry must not import torch.


def _prep(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.stages.prep import PrepFailed, run_prep

    try:
        return run_prep(ctx.config, ctx.run_dir, progress=lambda d: ctx.progress(**d))
    except PrepFailed as e:
        raise DataInvalid(e.message, field="dataset") from e


def _adapt(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.stages.adapt import run_adapt

    return run_adapt(ctx)


def _train(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.stages.train import run_train

    return run_train(ctx)


def _evaluate(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.stages.evaluate import run_evaluate

    return run_evaluate(ctx)


STAGES: Mapping[str, Stage] = MappingProxyType({
    "prep": _FunctionStage("prep", _prep),
    "adapt": _FunctionStage("adapt", _adapt),
    "train": _FunctionStage("train", _train),
    "evaluate": _FunctionStage("evaluate", _evaluate),
})


def select(names: Optional[str]) -> list[str]:
    """The stages to run, in pipeline order: all, or a comma-separated subset."""
    if not names:
        return list(STAGE_ORDER)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in STAGES]
    if unknown:
        raise InvalidSpec(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGE_ORDER)}",
                          field="--stages")
    return [n for n in STAGE_ORDER if n in wanted]
