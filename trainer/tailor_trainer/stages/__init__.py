"""The pipeline's stages: a closed registry behind a small Protocol.

Each stage reads the files the previous ones wrote (docs/stage-contracts.md) and returns its
manifest body; the pipeline writes ``<run>/<stage>/manifest.json`` last. The registry is a fixed
table of functions in this package: a stage name from a config only ever selects one of these
four, never a module path (anyone who can create a FineTuneJob would choose the code that runs).

Failures a user can act on are :class:`StageError` subclasses (``tailor_trainer.errors``)
carrying the ``reason``, message and spec ``field`` that end up in ``FineTuneJob.status.error``;
:class:`StageContext` and :class:`Stage` live in ``stages.base``. Both are re-exported here for
callers of the registry; stage and library modules import them from where they live.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

from tailor_trainer.contract import STAGE_ORDER
from tailor_trainer.errors import (  # noqa: F401 - re-exported for callers of the registry
    DataInvalid,
    Diverged,
    GateFailed,
    InvalidSpec,
    ModelInvalid,
    StageError,
    TrainingFailed,
)
from tailor_trainer.stages.base import Progress, Stage, StageContext  # noqa: F401 - re-exported

__all__ = ["STAGES", "STAGE_ORDER", "select", "Stage", "StageContext", "Progress", "StageError", "InvalidSpec",
           "ModelInvalid", "DataInvalid", "Diverged", "GateFailed", "TrainingFailed"]


@dataclass(frozen=True)
class _FunctionStage:
    name: str
    fn: Callable[[StageContext], dict[str, Any]]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        return self.fn(ctx)


# Imports live inside the functions: importing this registry must not import torch.


def _diffusion(ctx: StageContext) -> Any:
    """The diffusion stages (tailor_trainer.stages.diffusion) for a Dataset of schema image-caption."""
    from tailor_trainer.config import DataSchema

    if ctx.config.dataset.schema_ is not DataSchema.image_caption:
        return None
    from tailor_trainer.stages import diffusion

    return diffusion


def _prep(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.stages.prep import PrepFailed, run_prep

    if (d := _diffusion(ctx)) is not None:
        return d.run_prep(ctx)

    try:
        return run_prep(ctx.config, ctx.run_dir, progress=lambda d: ctx.progress(**d))
    except PrepFailed as e:
        raise DataInvalid(e.message, field="dataset") from e


def _adapt(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.stages.adapt import run_adapt

    if (d := _diffusion(ctx)) is not None:
        return d.run_adapt(ctx)
    return run_adapt(ctx)


def _train(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.stages.train import run_train

    if (d := _diffusion(ctx)) is not None:
        return d.run_train(ctx)
    return run_train(ctx)


def _evaluate(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.stages.evaluate import run_evaluate

    if (d := _diffusion(ctx)) is not None:
        return d.run_evaluate(ctx)
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
