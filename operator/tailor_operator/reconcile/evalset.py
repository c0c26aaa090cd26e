"""The fixed evaluation set (spec.evaluation.datasetRef): may a run start with it?

A run starts only when the evaluation Dataset exists, is Ready and (when the ref pins one) is at
the pinned revision; the run's config then carries it at that revision and content fingerprint
(builders/trainer_config.py), and the trainer scores every model on it. Otherwise nothing starts:
the job waits (Pending) with an error naming the field, looked at again every activePollSeconds,
so a Dataset that becomes Ready (or returns to the pinned revision) lets the run start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob, FineTuneJobStatus, JobError, Phase
from tailor_operator.reconcile.conditions import TRUE, UNKNOWN, get_condition
from tailor_operator.reconcile.plan import Event, JobPlan, sooner

FIELD = "spec.evaluation.datasetRef"


@dataclass(frozen=True)
class EvalSetProblem:
    reason: str
    message: str
    field: str


def eval_set_problem(job: FineTuneJob, eval_dataset: Optional[Dataset],
                     dataset: Optional[Dataset]) -> Optional[EvalSetProblem]:
    """Why the job's evaluation Dataset cannot be used now; None when it can (or none is named)."""
    ref = job.spec.evaluation.dataset_ref
    if ref is None:
        return None
    ns = job.metadata.namespace or "default"
    if eval_dataset is None:
        return EvalSetProblem("EvalDatasetNotFound", f'Dataset "{ref.name}" named by {FIELD}.name not found in '
                                                     f"namespace {ns}", f"{FIELD}.name")
    st = eval_dataset.status
    ready = get_condition(st.conditions if st else [], "Ready")
    if ready is None or ready.status is UNKNOWN or st is None or (ready.status is TRUE and not st.revision):
        # its first validation is still running: the job waits, nothing for a user to fix yet
        return EvalSetProblem("EvalDatasetValidating", f'waiting for evaluation Dataset "{ref.name}" ({FIELD}) '
                                                       "to be validated", f"{FIELD}.name")
    if ready.status is not TRUE:
        why = f": {ready.message}" if ready.message else ""
        return EvalSetProblem("EvalDatasetNotReady", f'evaluation Dataset "{ref.name}" ({FIELD}) is not Ready{why}',
                              f"{FIELD}.name")
    if ref.revision is not None and st.revision != ref.revision:
        return EvalSetProblem(
            "EvalDatasetRevisionMismatch",
            f'{FIELD}.revision is "{ref.revision}" but Dataset "{ref.name}" is at revision "{st.revision}": the '
            "evaluation set changed; restore that revision of its data, or set the new revision to accept it",
            f"{FIELD}.revision")
    own = eval_dataset.spec.source.secret_ref
    train = dataset.spec.source.secret_ref if dataset is not None else None
    if own is not None and (train is None or own.name != train.name):
        # the trainer pods get the training Dataset's data credentials, and only those
        return EvalSetProblem(
            "EvalDatasetSecret",
            f'evaluation Dataset "{ref.name}" reads its source with Secret "{own.name}", but runs get only the '
            f"training Dataset's source.secretRef ({train.name if train else 'none'}): use the same Secret or none",
            f"{FIELD}.name")
    return None


def eval_set_blocks(job: FineTuneJob, st: FineTuneJobStatus, eval_dataset: Optional[Dataset],
                    dataset: Optional[Dataset], poll_seconds: float, plan: JobPlan) -> bool:
    """True (and the job Pending with an error naming the field) when a run may not start now."""
    problem = eval_set_problem(job, eval_dataset, dataset)
    if problem is None:
        return False
    if st.error is None or st.error.reason != problem.reason:
        plan.events.append(Event("Warning", problem.reason, problem.message))
    st.phase = Phase.pending
    st.error = JobError(reason=problem.reason, message=problem.message[:4096], field=problem.field)
    plan.requeue_after = sooner(plan.requeue_after, poll_seconds)
    return True


__all__ = ["EvalSetProblem", "FIELD", "eval_set_blocks", "eval_set_problem"]
