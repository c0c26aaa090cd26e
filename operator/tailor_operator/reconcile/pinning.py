"""Rollback and pinning: spec.continuousLearning.promotion.pinnedRun, level-based.

While the field names a recorded run (a Succeeded entry of status.history with a model, or the
champion itself), that run is the champion, so the promotion target points at its model
(finetunejob._promotion_target), and it stays so: runs still start, train and are compared with
it, but promotion.decide_run promotes none of them. Moving the champion to it appends a history
entry (reason Pinned) and a `Pinned` Event; removing the field appends one with reason Unpinned
(the champion stays until a later run beats it). A name that is not such a run moves nothing:
condition Pinned False (PinnedRunNotFound) and a Warning naming the field.

Condition `Pinned`: True while a pin holds, False (Unpinned / PinnedRunNotFound) otherwise; absent
for a job that was never pinned.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from tailor_operator.api.v1alpha1 import ChampionStatus, FineTuneJob, FineTuneJobStatus, HistoryEntry, Phase
from tailor_operator.reconcile.conditions import FALSE, TRUE, get_condition, set_condition
from tailor_operator.reconcile.plan import Event, JobPlan
from tailor_operator.reconcile.promotion import PINNED_FIELD
from tailor_operator.reconcile.rollout import set_champion

DEFAULT_HISTORY = 10


def _recorded(st: FineTuneJobStatus, run: str) -> Optional[HistoryEntry]:
    """The latest record of `run` that can be served: succeeded, with a model."""
    for h in reversed(st.history):
        if h.run == run and h.phase is Phase.succeeded and h.model:
            return h
    if st.champion is not None and st.champion.run == run and st.champion.model:
        c = st.champion
        return HistoryEntry(run=run, phase=Phase.succeeded, dataset_revision=c.dataset_revision, metrics=c.metrics,
                            model=c.model)
    return None


def _append(job: FineTuneJob, st: FineTuneJobStatus, entry: HistoryEntry) -> None:
    cl = job.spec.continuous_learning
    limit = cl.history_limit if cl is not None else DEFAULT_HISTORY
    st.history = (st.history + [entry])[-limit:]


def apply_pin(job: FineTuneJob, st: FineTuneJobStatus, plan: JobPlan, now: datetime) -> None:
    cl = job.spec.continuous_learning
    pinned = cl.promotion.pinned_run if cl is not None else None
    cond = get_condition(st.conditions, "Pinned")
    if pinned is None:
        if cond is not None and cond.status is TRUE:
            run = st.champion.run if st.champion else "none"
            message = (f"{PINNED_FIELD} removed: champion {run} stays until a later run beats it")
            st.conditions = set_condition(st.conditions, "Pinned", FALSE, "Unpinned", message, now)
            plan.events.append(Event("Normal", "Unpinned", message))
            if st.champion is not None:
                c = st.champion
                record = _recorded(st, c.run)
                _append(job, st, HistoryEntry(run=c.run, phase=Phase.succeeded, dataset_revision=c.dataset_revision,
                                              metrics=c.metrics, model=c.model, promoted=False, reason="Unpinned",
                                              completion_time=now,
                                              evaluated_on=record.evaluated_on if record else None,
                                              interval=record.interval if record else None))
        elif cond is not None and cond.reason == "PinnedRunNotFound":
            st.conditions = set_condition(st.conditions, "Pinned", FALSE, "Unpinned",
                                          f"{PINNED_FIELD} removed", now)
        return
    record = _recorded(st, pinned)
    if record is None:
        servable = sorted({h.run for h in st.history if h.phase is Phase.succeeded and h.model})
        message = (f'{PINNED_FIELD} "{pinned}" is not a Succeeded run with a model in status.history '
                   f"(runs that can be pinned: {', '.join(servable) or 'none'}); nothing was moved")
        if cond is None or cond.message != message:
            plan.events.append(Event("Warning", "PinnedRunNotFound", message))
        st.conditions = set_condition(st.conditions, "Pinned", FALSE, "PinnedRunNotFound", message, now,
                                      job.metadata.generation)
        return
    previous = st.champion.run if st.champion is not None else None
    moved = previous != pinned or (st.champion is not None and st.champion.model != record.model)
    message = f"{PINNED_FIELD}: run {pinned} is the champion and the target's model until the field is removed"
    if moved:
        set_champion(job, st, ChampionStatus(run=pinned, dataset_revision=record.dataset_revision,
                                             model=record.model, metrics=dict(record.metrics), promoted_at=now),
                     now, plan, staged=False)  # a rollback moves the target at once, no canary
        st.conditions = set_condition(st.conditions, "Promoted", TRUE, "Pinned", f"run {pinned} is the champion: "
                                      f"pinned by {PINNED_FIELD} (was {previous or 'none'})", now)
    if moved or cond is None or cond.status is not TRUE:
        what = f"champion moved from {previous or 'none'} to {pinned}" if moved else f"champion {pinned} held"
        plan.events.append(Event("Normal", "Pinned", f"{what} by {PINNED_FIELD}; new runs are trained and "
                                                     "evaluated against it but not promoted while it is set"))
        _append(job, st, HistoryEntry(run=pinned, phase=Phase.succeeded, dataset_revision=record.dataset_revision,
                                      metrics=dict(record.metrics), model=record.model, promoted=True,
                                      reason="Pinned", completion_time=now, evaluated_on=record.evaluated_on,
                                      interval=record.interval))
    st.conditions = set_condition(st.conditions, "Pinned", TRUE, "Pinned", message, now, job.metadata.generation)


__all__ = ["apply_pin"]
