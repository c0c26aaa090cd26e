"""The trainer -> operator half of the contract: the progress document and the run result.

`TrainerConfig` (config.py) is what the operator hands the trainer; these models are what comes
back (docs/stage-contracts.md, "Progress and result"). The trainer writes them as JSON — a file
`progress.json` (local backend) or the key `progress.json` of ConfigMap `<run>-progress`
(kuberay backend), and `evaluate/result.json` — and the operator reads them with
:meth:`ProgressDoc.read` / :meth:`RunResult.read`. File names and stage names are spelled here
and nowhere else.

Reading is lenient by design: the document comes from a pod in the tenant's namespace, and a
field of the wrong type (a string where a step count belongs) reads as absent instead of
failing the whole reconcile. Unknown fields are kept (stages add their own, e.g. prep's
``rowsRead``). Numbers are strict: ``true`` is not a step and ``4.0`` is not a step count.
Standard library and pydantic only, like config.py: the operator imports this module.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

from pydantic import (BaseModel, BeforeValidator, ConfigDict, ValidationError, ValidationInfo,
                      ValidatorFunctionWrapHandler, field_validator)
from pydantic.alias_generators import to_camel

STAGE_ORDER: tuple[str, ...] = ("prep", "adapt", "train", "evaluate")
"""The pipeline's stages, in the order they run."""

PROGRESS_FILE = "progress.json"
"""The progress document: a file in the run's work directory (local backend) and the key of the
run's progress ConfigMap (kuberay backend)."""

RESULT_FILE = "result.json"
"""The run result, in the evaluate stage's directory (`<run>/evaluate/result.json`)."""


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _Lenient(BaseModel):
    """camelCase on the wire; a field of the wrong type reads as None; unknown fields kept."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow", strict=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="wrap")
    @classmethod
    def _or_default(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        try:
            return handler(value)
        except ValidationError:
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)

    @classmethod
    def read(cls, raw: Any):  # -> Optional[Self]
        """The document from a dict or JSON text; None when it is not an object at all."""
        if isinstance(raw, (str, bytes)):
            try:
                raw = json.loads(raw)
            except ValueError:
                return None
        if not isinstance(raw, dict):
            return None
        return cls.model_validate(raw)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


class RunError(_Lenient):
    """Why the trainer failed: a reason (InvalidSpec, DataInvalid, Diverged, GateFailed, ...), a
    message and the spec field at fault when there is one."""

    reason: Optional[str] = None
    message: Optional[str] = None
    field: Optional[str] = None


Metrics = Annotated[dict[str, float],
                    BeforeValidator(lambda v: numeric_metrics(v) if isinstance(v, dict) else v)]
"""Metric name -> value; null and non-numeric entries are dropped on read."""


class ChampionResult(_Lenient):
    """The current champion re-scored by this run on the same rows."""

    run: Optional[str] = None
    metrics: Metrics = {}
    promoted_metrics: Optional[Metrics] = None


class Interval(_Lenient):
    """The candidate's improvement over another model on the same rows, with its paired-bootstrap
    interval (tailor_trainer.significance); positive is better in the metric's direction."""

    metric: Optional[str] = None
    against: Optional[str] = None
    """The champion's run, or "base"."""
    improvement: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None
    confidence: Optional[float] = None
    rows: Optional[int] = None
    resamples: Optional[int] = None
    seed: Optional[int] = None


class EvaluatedOn(_Lenient):
    """The rows every model was scored on: the fixed evaluation set (dataset, revision) or the
    run's own held-out split."""

    split: Optional[str] = None
    dataset: Optional[str] = None
    revision: Optional[str] = None
    fingerprint: Optional[str] = None
    rows: Optional[int] = None


class Gate(_Lenient):
    metric: Optional[str] = None
    min: Optional[float] = None
    max: Optional[float] = None
    value: Optional[float] = None
    passed: Optional[bool] = None


class Trial(_Lenient):
    """One trial of a hyperparameter search (spec.search)."""

    id: Optional[str] = None
    """Stable within the run, e.g. "t03"."""
    state: Optional[str] = None
    """pending, running, completed (trained to its end, or its own early stopping), stopped (ended
    early: by the scheduler, behind at a rung; by the maxGpuHours budget; or diverged), failed (an
    error)."""
    params: dict[str, float] = {}
    """The drawn values, by spec name (learningRate, batchSize, epochs, warmupRatio, weightDecay,
    lora.r, lora.alpha, lora.dropout)."""
    steps: Optional[int] = None
    """Optimizer steps trained."""
    total_steps: Optional[int] = None
    """Steps the trial would train if never stopped."""
    objective: Optional[float] = None
    """Best objective so far (lowest validation loss); null before the first validation and for a
    diverged trial."""
    history: list[list[float]] = []
    """[step, objective] at validations (at most 32, evenly spaced, the last one kept), for the
    report's trials plot."""
    diverged: Optional[bool] = None
    """True when the trial's loss became NaN/Inf (its state is stopped)."""


class SearchSummary(_Lenient):
    """Where a hyperparameter search stands: counts by state, the best trial, every trial."""

    trials: Optional[int] = None
    """Trials the search will run (spec.search.trials)."""
    pending: int = 0
    running: int = 0
    completed: int = 0
    stopped: int = 0
    failed: int = 0
    objective: Optional[str] = None
    """What the trials are ranked by (valLoss: lower is better)."""
    scheduler: Optional[str] = None
    """asha or fifo (spec.search.scheduler)."""
    best: Optional[Trial] = None
    """The best trial so far (finished: the one whose model goes on to evaluate)."""
    table: list[Trial] = []
    """Every trial, by id."""


class RunResult(_Lenient):
    """`evaluate/result.json`: the run's metrics, the champion's on the same rows, gates, artifacts."""

    run: Optional[str] = None
    job: Optional[str] = None
    attempt: Optional[int] = None
    dataset_revision: Optional[str] = None
    dataset_fingerprint: Optional[str] = None
    config_hash: Optional[str] = None
    base_model: Optional[str] = None
    method: Optional[str] = None
    metrics: Metrics = {}
    """Numeric metrics only (null and non-numeric entries are dropped on read)."""
    champion: Optional[ChampionResult] = None
    evaluated_on: Optional[EvaluatedOn] = None
    comparison: Optional[Interval] = None
    """Improvement over the champion (else the base model) with its interval."""
    gates: list[Gate] = []
    artifacts: dict[str, Optional[str]] = {}
    validation_loss: Optional[float] = None
    best_step: Optional[int] = None
    stopped_by: Optional[str] = None
    trainable_parameters: Optional[int] = None
    total_parameters: Optional[int] = None
    steps: Optional[int] = None
    tokens_trained: Optional[float] = None
    train_tokens_per_second: Optional[float] = None
    duration_seconds: Optional[float] = None
    search: Optional[SearchSummary] = None
    """The hyperparameter search, when the run had one."""


class ProgressDoc(_Lenient):
    """The progress document, replaced as a whole on every update by the trainer's reporter."""

    run: Optional[str] = None
    job: Optional[str] = None
    namespace: Optional[str] = None
    attempt: Optional[int] = None
    stage: Optional[str] = None
    state: Optional[str] = None
    """Running, Succeeded or Failed (anything else reads as given and counts as not finished)."""
    step: Optional[int] = None
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    loss: Optional[float] = None
    tokens_per_second: Optional[float] = None
    eta_seconds: Optional[float] = None
    message: Optional[str] = None
    started_at: Optional[str] = None
    updated_at: Optional[str] = None
    finished_at: Optional[str] = None
    search: Optional[SearchSummary] = None
    """While (and after) a hyperparameter search runs: its trials."""
    result: Optional[RunResult] = None
    error: Optional[RunError] = None

    @field_validator("result", "error", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == {} else value

    @property
    def known_stage(self) -> Optional[str]:
        """The stage when it is one of the pipeline's, else None."""
        return self.stage if self.stage in STAGE_ORDER else None

    @property
    def failed(self) -> bool:
        return self.state == "Failed" or bool(self.error and self.error.reason)

    @property
    def finished_ok(self) -> bool:
        """The trainer says the whole pipeline ran: state Succeeded with a result."""
        return self.state == "Succeeded" and self.result is not None


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric entries only (result.json may carry nulls)."""
    out = {}
    for k, v in metrics.items():
        n = _number(v)
        if n is not None and n == n and n not in (float("inf"), float("-inf")):
            out[str(k)] = n
    return out


__all__ = ["ChampionResult", "EvaluatedOn", "Gate", "Interval", "PROGRESS_FILE", "ProgressDoc", "RESULT_FILE", "RunError", "RunResult",
           "STAGE_ORDER", "SearchSummary", "Trial", "numeric_metrics"]
