"""Where a run executes: `kuberay` (RayJob, through tailor_operator.cluster) or `local` (subprocess).

Both offer the same operations to the handlers, written down here as protocols; the handlers'
Context picks the implementation for a spec's `backend` in one place (`Context.runs_for`,
`Context.validation_for`). What the operator reads from local paths itself, whichever backend
runs the job, is in `files`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

if TYPE_CHECKING:
    from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob
    from tailor_operator.reconcile.observe import RunObservation, ValidationObservation
    from tailor_operator.reconcile.plan import StartRun, StartValidation


class RunBackend(Protocol):
    """Runs of a FineTuneJob: one RayJob, or one trainer subprocess, per run attempt."""

    def observe(self, job: FineTuneJob, current: Optional[str] = None, following: Optional[str] = None,
                everything: bool = False) -> dict[str, RunObservation]:
        """The job's runs by name: `current` and the one after it, or all of them (`everything`)."""
        ...

    def start(self, job: FineTuneJob, action: StartRun) -> bool:
        """Start the attempt; False when it already existed (adopted)."""
        ...

    def stop(self, job: FineTuneJob, run: str) -> None: ...

    def delete(self, job: FineTuneJob, run: str) -> None: ...


class ValidationBackend(Protocol):
    """Dataset validations: an inspect Job with a result ConfigMap, or an inspect subprocess."""

    def observe(self, dataset: Dataset, key: str) -> tuple[ValidationObservation, tuple[str, ...]]:
        """This validation, and the keys of the Dataset's other (stale) validations."""
        ...

    def start(self, dataset: Dataset, action: StartValidation) -> None: ...

    def delete(self, dataset: Dataset, key: str) -> None: ...

    def cleanup(self, namespace: str, name: str) -> None: ...


__all__ = ["RunBackend", "ValidationBackend"]
