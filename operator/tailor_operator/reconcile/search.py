"""status.search and the search events, from the trainer's `SearchSummary` (pure).

The trainer writes the summary into its progress document while the search runs and into the
run result when it is over (trainer/tailor_trainer/contract.py); the operator only counts and
words it. The counts come from a pod in the tenant's namespace, so they are clamped and the
strings cut to what the status allows.
"""

from __future__ import annotations

from typing import Optional

from tailor_operator.api.v1alpha1 import SearchBest, SearchStatus
from tailor_trainer.config import Search, SearchSpace
from tailor_trainer.contract import SearchSummary

TRIAL_STATES = ("pending", "running", "completed", "stopped", "failed")
"""The states a trial can be in; the labels of `tailor_search_trials`."""


def search_status(summary: SearchSummary, spec: Optional[Search]) -> SearchStatus:
    """status.search from the trainer's summary (the planned count from the spec when the
    trainer does not say)."""
    counts = {s: max(0, getattr(summary, s)) for s in TRIAL_STATES}
    trials = summary.trials if summary.trials is not None else (spec.trials if spec is not None else None)
    done = counts["completed"] + counts["stopped"] + counts["failed"]
    best = None
    if summary.best is not None and summary.best.id:
        b = summary.best
        best = SearchBest(trial=b.id[:253], params=dict(b.params), objective=b.objective, steps=b.steps)
    return SearchStatus(summary=f"{done}/{trials}" if trials is not None else str(done), trials=trials,
                        objective=summary.objective[:253] if summary.objective else None, best=best, **counts)


def space_names(space: SearchSpace) -> list[str]:
    """The searched hyperparameters by spec name: learningRate, lora.r, ..."""
    names = []
    for key, value in space.model_dump(by_alias=True, exclude_none=True).items():
        names += [f"lora.{k}" for k in value] if key == "lora" else [key]
    return names


def params_text(params: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items())


def started_message(status: SearchStatus, spec: Optional[Search]) -> str:
    """`search of 6 trials (2 at a time, asha) started: learningRate, lora.r`."""
    how = f" ({spec.concurrent_trials} at a time, {spec.scheduler.value})" if spec is not None else ""
    what = f": {', '.join(space_names(spec.space))}" if spec is not None else ""
    return f"search of {status.trials if status.trials is not None else '?'} trials{how} started{what}"


def finished_message(status: SearchStatus) -> str:
    """`best trial t03: valLoss 1.234 with learningRate=0.003, lora.r=8; 4 completed, 2 stopped early`."""
    counts = [f"{status.completed} completed"]
    if status.stopped:
        counts.append(f"{status.stopped} stopped early")
    if status.failed:
        counts.append(f"{status.failed} failed")
    best = status.best
    if best is None:
        return "search finished with no best trial; " + ", ".join(counts)
    score = f"{status.objective or 'objective'} {best.objective:.4g}" if best.objective is not None else "no objective"
    with_params = f" with {params_text(best.params)}" if best.params else ""
    return f"best trial {best.trial}: {score}{with_params}; " + ", ".join(counts)
