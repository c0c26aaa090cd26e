"""Per-job series the alerts and the dashboard read (operator/tailor_operator/metrics.py): set from
the planned status, removed when no run is in flight or the object is gone, labels bounded to
namespace and name. Values are read back from the real prometheus_client registry."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from prometheus_client import CollectorRegistry

from tailor_operator.api.v1alpha1 import ChampionStatus, FineTuneJobStatus, HistoryEntry, Phase, Progress
from tailor_operator.handlers.finetunejob import sync_job
from tailor_operator.metrics import Metrics, rejected_streak

from test_handlers import NS, _dataset, _job, _seen, ctx  # noqa: F401  (ctx: the fixture)

LIVE = ("tailor_run_progress_ratio", "tailor_run_train_loss", "tailor_run_tokens_per_second",
        "tailor_run_eta_seconds", "tailor_run_last_progress_timestamp_seconds")
PER_JOB = LIVE + ("tailor_promotions_rejected_streak", "tailor_champion_promoted_timestamp_seconds",
                  "tailor_finetunejob_status_phase")


def value(reg: CollectorRegistry, name: str, **labels: str) -> Optional[float]:
    return reg.get_sample_value(name, {"namespace": "ns", "finetunejob": "job", **labels})


def series(reg: CollectorRegistry, name: str) -> list[dict[str, str]]:
    return [s.labels for m in reg.collect() for s in m.samples if s.name == name]


def running(step: int, stage: str = "train", run: str = "job-r1", **progress: Any) -> FineTuneJobStatus:
    return FineTuneJobStatus(phase=Phase.running, stage=stage, current_run=run,
                             progress=Progress(step=step, total_steps=200, percent=step * 100 // 200, **progress))


def test_live_series_follow_the_run_and_vanish_when_it_ends() -> None:
    m = Metrics()
    reg = m.registry
    m.job_status("ns", "job", running(50, loss=1.5, tokens_per_second=2048.0, eta_seconds=300), False, now=1000.0)
    assert value(reg, "tailor_run_progress_ratio") == 0.25
    assert value(reg, "tailor_run_train_loss") == 1.5
    assert value(reg, "tailor_run_tokens_per_second") == 2048.0
    assert value(reg, "tailor_run_eta_seconds") == 300
    assert value(reg, "tailor_run_last_progress_timestamp_seconds") == 1000.0
    assert value(reg, "tailor_finetunejob_status_phase", phase="Running") == 1
    assert value(reg, "tailor_finetunejob_status_phase", phase="Failed") == 0
    for name in PER_JOB:  # bounded: namespace, name (and the closed phase set)
        assert all(set(labels) <= {"namespace", "finetunejob", "phase"} for labels in series(reg, name)), name

    # the same position later: the last-progress time stays (this is what the stuck alert reads)
    m.job_status("ns", "job", running(50, loss=1.5), False, now=1600.0)
    assert value(reg, "tailor_run_last_progress_timestamp_seconds") == 1000.0
    assert value(reg, "tailor_run_eta_seconds") is None  # no longer reported: no stale ETA
    # a step forward, a new stage, a new run: each moves it
    m.job_status("ns", "job", running(51, loss=1.4), False, now=1700.0)
    assert value(reg, "tailor_run_last_progress_timestamp_seconds") == 1700.0
    m.job_status("ns", "job", running(51, stage="evaluate"), False, now=1800.0)
    assert value(reg, "tailor_run_last_progress_timestamp_seconds") == 1800.0

    # finished: every live series goes, the phase series stay
    m.job_status("ns", "job", FineTuneJobStatus(phase=Phase.succeeded, current_run="job-r1"), False, now=1900.0)
    for name in LIVE:
        assert series(reg, name) == [], name
    assert value(reg, "tailor_finetunejob_status_phase", phase="Succeeded") == 1
    assert value(reg, "tailor_finetunejob_status_phase", phase="Running") == 0

    # the next run starts afresh: its first sighting is its last progress
    m.job_status("ns", "job", running(0, run="job-r2"), False, now=5000.0)
    assert value(reg, "tailor_run_last_progress_timestamp_seconds") == 5000.0
    assert value(reg, "tailor_run_progress_ratio") == 0


def test_queued_and_pending_jobs_have_no_live_series() -> None:
    m = Metrics()
    for phase in (Phase.pending, Phase.validating, Phase.queued, Phase.failed, Phase.suspended):
        m.job_status("ns", "job", FineTuneJobStatus(phase=phase, progress=Progress(step=3, total_steps=10)), False)
        for name in LIVE:
            assert series(m.registry, name) == [], (phase, name)


def _entry(run: str, promoted: bool, phase: Phase = Phase.succeeded, reason: str = "") -> HistoryEntry:
    return HistoryEntry(run=run, phase=phase, promoted=promoted, reason=reason or None)


def test_rejected_streak_counts_successful_rejections_since_the_last_promotion() -> None:
    history = [_entry("r1", True), _entry("r2", False), _entry("r3", False, Phase.failed, "OOMKilled"),
               _entry("r4", False), _entry("r5", False, reason="Pinned"), _entry("r6", False)]
    assert rejected_streak(FineTuneJobStatus(history=history)) == 3  # r2, r4, r6
    assert rejected_streak(FineTuneJobStatus(history=history + [_entry("r7", True)])) == 0
    assert rejected_streak(FineTuneJobStatus()) == 0


def test_continuous_learning_series_and_forget() -> None:
    m = Metrics()
    promoted = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    st = FineTuneJobStatus(phase=Phase.succeeded, history=[_entry("r1", True), _entry("r2", False)],
                           champion=ChampionStatus(run="r1", promoted_at=promoted))
    m.job_status("ns", "job", st, True)
    assert value(m.registry, "tailor_promotions_rejected_streak") == 1
    assert value(m.registry, "tailor_champion_promoted_timestamp_seconds") == promoted.timestamp()
    m.job_status("ns", "job", running(5), False)  # continuous learning turned off, no champion in status
    assert series(m.registry, "tailor_promotions_rejected_streak") == []
    assert series(m.registry, "tailor_champion_promoted_timestamp_seconds") == []
    m.job_status("ns", "job", st, True)
    m.job_status("ns", "job", running(5), True)
    m.forget_job("uid", "ns", "job")
    for name in PER_JOB:
        assert series(m.registry, name) == [], name


def test_dataset_ready_series() -> None:
    m = Metrics()
    labels = {"namespace": "ns", "dataset": "support"}
    m.dataset_ready("uid", "Unknown", "ns", "support")
    assert m.registry.get_sample_value("tailor_dataset_ready", labels) == 0
    m.dataset_ready("uid", "True", "ns", "support")
    assert m.registry.get_sample_value("tailor_dataset_ready", labels) == 1
    assert m.registry.get_sample_value("tailor_datasets", {"ready": "True"}) == 1
    m.dataset_ready("uid", None, "ns", "support")
    assert m.registry.get_sample_value("tailor_dataset_ready", labels) is None
    assert m.registry.get_sample_value("tailor_datasets", {"ready": "True"}) == 0


def test_the_finetunejob_handler_feeds_the_series(ctx) -> None:  # noqa: F811
    """sync_job sets the job's series from the status it planned; the job's deletion removes them."""
    _seen(ctx, _dataset())
    _seen(ctx, _job())
    sync_job(ctx, NS, "support")
    reg = ctx.metrics.registry
    phases = {labels["phase"]: reg.get_sample_value("tailor_finetunejob_status_phase", labels)
              for labels in series(reg, "tailor_finetunejob_status_phase")}
    assert phases == {p.value: (1.0 if p is Phase.queued else 0.0) for p in Phase}
    assert all(labels["namespace"] == NS and labels["finetunejob"] == "support"
               for labels in series(reg, "tailor_finetunejob_status_phase"))
    ctx.job_gone(NS, "support", "support-uid")
    assert series(reg, "tailor_finetunejob_status_phase") == []
