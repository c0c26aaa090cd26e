"""The small pieces under the reconcile and around it: cron, promotion policy, status rate limit,
pod-problem folding, settings from the environment, the work queue, the local backend (with a
stand-in trainer), and metric bookkeeping."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tailor_operator.api.v1alpha1 import Backend, ChampionStatus, Promotion, PromotionMode
from tailor_operator.reconcile.cron import next_fire
from tailor_operator.reconcile.observe import RunState, observe_rayjob, pod_problem
from tailor_operator.reconcile.promotion import decide
from tailor_operator.reconcile.settings import OperatorSettings
from tailor_operator.reconcile.status import write_decision
from tailor_trainer.config import Metric

UTC = timezone.utc


# ------------------------------------------------------------------------------------ cron

@pytest.mark.parametrize("schedule,after,expected", [
    ("0 3 * * 1", "2026-03-02T10:00", "2026-03-09T03:00"),   # Monday 03:00, after Monday 10:00
    ("0 3 * * 1", "2026-03-01T10:00", "2026-03-02T03:00"),
    ("*/15 * * * *", "2026-03-02T10:07", "2026-03-02T10:15"),
    ("30 2 1 * *", "2026-03-02T00:00", "2026-04-01T02:30"),
    ("0 0 * * 0", "2026-03-02T00:00", "2026-03-08T00:00"),     # Sunday as 0
    ("0 0 * * 7", "2026-03-02T00:00", "2026-03-08T00:00"),     # ... and as 7
    ("0 12 1 * 1", "2026-03-02T13:00", "2026-03-09T12:00"),    # day-of-month OR day-of-week
    ("0 0 29 2 *", "2026-03-01T00:00", "2028-02-29T00:00"),
])
def test_next_fire(schedule: str, after: str, expected: str) -> None:
    got = next_fire(schedule, datetime.fromisoformat(after).replace(tzinfo=UTC))
    assert got == datetime.fromisoformat(expected).replace(tzinfo=UTC)


# ------------------------------------------------------------------------------- promotion

def _champion(loss: float = 1.0) -> ChampionStatus:
    return ChampionStatus(run="j-r1", metrics={"loss": loss, "accuracy": 0.5})


def test_first_successful_run_becomes_champion() -> None:
    d = decide(Promotion(), {"loss": 2.0}, None)
    assert d.promote and d.reason == "FirstChampion"


def test_lower_loss_promotes_only_beyond_min_improvement() -> None:
    policy = Promotion(metric=Metric.loss, min_improvement=0.05)
    assert decide(policy, {"loss": 0.9}, _champion()).promote
    assert not decide(policy, {"loss": 0.97}, _champion()).promote
    assert not decide(Promotion(), {"loss": 1.0}, _champion()).promote  # equal is not better


def test_accuracy_is_higher_is_better_by_default_and_mode_overrides() -> None:
    assert decide(Promotion(metric=Metric.accuracy), {"accuracy": 0.6}, _champion()).promote
    assert not decide(Promotion(metric=Metric.accuracy, mode=PromotionMode.min), {"accuracy": 0.6},
                      _champion()).promote


def test_champion_rescored_on_the_same_data_wins_over_recorded_metrics() -> None:
    # recorded 1.0, but on this run's held-out data the champion scores 1.3: 1.2 is better
    d = decide(Promotion(), {"loss": 1.2}, _champion(1.0), champion_rescored={"loss": 1.3})
    assert d.promote and "1.3" in d.message


def test_missing_metric_never_promotes() -> None:
    d = decide(Promotion(metric=Metric.exact_match), {"loss": 0.1}, _champion())
    assert not d.promote and d.reason == "MetricMissing"


# -------------------------------------------------------------------------- status writes

def test_progress_only_changes_are_rate_limited() -> None:
    old = {"phase": "Running", "progress": {"step": 1}}
    new = {"phase": "Running", "progress": {"step": 2}}
    assert write_decision(old, old, 100.0, 101.0, 5.0) == (False, None)
    assert write_decision(old, new, None, 101.0, 5.0) == (True, None)
    assert write_decision(old, new, 100.0, 101.0, 5.0) == (False, 4.0)
    assert write_decision(old, new, 100.0, 105.0, 5.0) == (True, None)
    assert write_decision(old, {**new, "phase": "Succeeded"}, 100.0, 100.5, 5.0) == (True, None)


def test_search_counts_are_rate_limited_like_progress_but_its_first_appearance_is_not() -> None:
    old = {"phase": "Running", "progress": {"step": 1}}
    started = {**old, "search": {"summary": "0/6", "running": 2}}
    later = {**old, "search": {"summary": "1/6", "running": 2, "completed": 1}}
    assert write_decision(old, started, 100.0, 100.5, 5.0) == (True, None)  # goes with SearchStarted
    assert write_decision(started, later, 100.0, 101.0, 5.0) == (False, 4.0)
    assert write_decision(started, {**later, "phase": "Evaluating"}, 100.0, 101.0, 5.0) == (True, None)


# ------------------------------------------------------------------------ observe folding

def _pod(name: str, **status: object) -> dict:
    return {"metadata": {"name": name}, "status": status}


def test_pod_problem_prefers_oomkilled_over_unschedulable() -> None:
    pods = [
        _pod("a", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                               "message": "0/3 nodes"}]),
        _pod("b", containerStatuses=[{"name": "ray-worker", "state": {"running": {}},
                                      "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]),
        _pod("c", containerStatuses=[{"name": "ray-worker", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                                  "message": "not found"}}}]),
    ]
    assert pod_problem(pods).reason == "OOMKilled"
    assert pod_problem(pods[:1]).reason == "Unschedulable"
    assert pod_problem(pods[2:]).reason == "ImagePullBackOff"
    assert pod_problem([]) is None


def test_progress_of_an_earlier_attempt_is_ignored() -> None:
    rayjob = {"metadata": {"name": "j-r1", "annotations": {"tailor.dev/attempt": "2"}},
              "status": {"jobDeploymentStatus": "Initializing"}}
    stale = {"attempt": 1, "state": "Failed", "error": {"reason": "Diverged", "message": "nan"}}
    obs = observe_rayjob(rayjob, stale)
    assert obs.state is RunState.pending and obs.progress is None


def test_raycluster_replica_failure_is_named_while_initializing() -> None:
    rayjob = {"metadata": {"name": "j-r1"}, "status": {
        "jobDeploymentStatus": "Initializing",
        "rayClusterStatus": {"conditions": [{
            "type": "ReplicaFailure", "status": "True", "reason": "FailedCreateWorkerPod",
            "message": "exceeded quota: gpu-quota"}]}}}
    obs = observe_rayjob(rayjob)
    assert (obs.state, obs.reason) == (RunState.pending, "ReplicaFailure")
    assert "exceeded quota" in obs.message


def test_trainer_error_reason_wins_for_a_failed_rayjob() -> None:
    rayjob = {"metadata": {"name": "j-r1"}, "status": {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                                                        "reason": "AppFailed"}}
    obs = observe_rayjob(rayjob, {"attempt": 1, "error": {"reason": "Diverged", "message": "loss is NaN at step 7"}})
    assert (obs.state, obs.reason) == (RunState.failed, "Diverged")


def test_succeeded_is_checked_against_the_trainers_own_document() -> None:
    """KubeRay's SUCCEEDED (or a local exit code 0) says only that the entrypoint exited 0."""
    from tailor_operator.reconcile.observe import observe_local_run

    done = {"metadata": {"name": "j-r1"}, "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}
    result = {"attempt": 1, "state": "Succeeded", "stage": "evaluate", "result": {"metrics": {"loss": 1.0}}}
    assert observe_rayjob(done, result).state is RunState.succeeded
    unfinished = {"attempt": 1, "state": "Running", "stage": "train", "step": 40, "totalSteps": 300}
    obs = observe_rayjob(done, unfinished)
    assert (obs.state, obs.reason) == (RunState.failed, "TrainerIncomplete") and "train step 40/300" in obs.message
    obs = observe_rayjob(done, None)
    assert (obs.state, obs.reason) == (RunState.failed, "TrainerIncomplete") and "no progress document" in obs.message
    failed = {"attempt": 1, "state": "Failed", "error": {"reason": "DataInvalid", "message": "no rows"}}
    assert (observe_rayjob(done, failed).reason, observe_rayjob(done, failed).message) == ("DataInvalid", "no rows")
    # a finished run listed only for its TTL: its document was not read, nothing to check
    assert observe_rayjob(done, None, progress_read=False).state is RunState.succeeded
    local = observe_local_run("r", number=1, attempt=1, running=False, exit_code=0, progress=unfinished)
    assert (local.state, local.reason) == (RunState.failed, "TrainerIncomplete")
    assert local.message.startswith("the trainer process exited 0, but"), local.message


def test_a_missing_secret_is_a_credentials_problem_since_the_pods_creation() -> None:
    pod = {"metadata": {"name": "j-r1-head-x", "creationTimestamp": "2026-03-02T10:00:00Z"},
           "status": {"containerStatuses": [{"name": "ray-head", "state": {"waiting": {
               "reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'}}}]}}
    problem = pod_problem([pod])
    assert problem.reason == "CredentialsError" and 'secret "s3-creds" not found' in problem.message
    assert problem.since == datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
    other = json.loads(json.dumps(pod))
    other["status"]["containerStatuses"][0]["state"]["waiting"]["message"] = 'configmap "x" not found'
    assert pod_problem([other]).reason == "CreateContainerConfigError"


def _running_rayjob(started: str | None = "2026-03-02T10:05:00Z") -> dict:
    status = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    if started:
        status["rayJobInfo"] = {"startTime": started}
    return {"metadata": {"name": "j-r1", "annotations": {"tailor.dev/attempt": "1"}}, "status": status}


def _head(name: str = "j-r1-head-a", created: str = "2026-03-02T10:00:00Z", **extra) -> dict:
    meta = {"name": name, "creationTimestamp": created, "labels": {"ray.io/node-type": "head"}}
    meta.update(extra.pop("meta", {}))
    return {"metadata": meta, "status": extra}


def _worker() -> dict:
    return {"metadata": {"name": "j-r1-workers-worker-x", "creationTimestamp": "2026-03-02T10:00:00Z",
                         "labels": {"ray.io/node-type": "worker"}}, "status": {}}


@pytest.mark.parametrize("pods,why", [
    ([_head(meta={"deletionTimestamp": "2026-03-02T10:06:00Z"}), _worker()], "is being deleted"),
    ([_worker()], "is gone"),
    ([_head("j-r1-head-b", created="2026-03-02T10:06:30Z"), _worker()], "was replaced"),
    ([_head(containerStatuses=[{"name": "ray-head", "restartCount": 1}]), _worker()], "restarted"),
])
def test_a_lost_ray_head_fails_the_attempt_while_kuberay_still_says_running(pods, why) -> None:
    """KubeRay keeps a RayJob RUNNING after its head pod was deleted or replaced (seen on a real
    node); the Ray job and its driver died with the head, so the attempt is over (and retried)."""
    obs = observe_rayjob(_running_rayjob(), None, pods)
    assert (obs.state, obs.reason) == (RunState.failed, "RayHeadLost")
    assert why in obs.message


def test_a_healthy_or_still_starting_head_is_not_lost() -> None:
    healthy = [_head(containerStatuses=[{"name": "ray-head", "restartCount": 0}]), _worker()]
    assert observe_rayjob(_running_rayjob(), None, healthy).state is RunState.running
    # the Ray job has not started yet: a missing or new head is the cluster coming up
    assert observe_rayjob(_running_rayjob(started=None), None, [_worker()]).reason != "RayHeadLost"
    # pods not read (None): no judgement
    assert observe_rayjob(_running_rayjob(), None, None).state is RunState.running


# ---------------------------------------------------------------------------- settings

def test_settings_from_env() -> None:
    from tailor_operator.runner import settings_from_env

    s = settings_from_env({"TAILOR_TRAINER_IMAGE": "x/y:1", "TAILOR_DATASET_BACKEND": "local",
                           "TAILOR_LOCAL_MAX_CONCURRENT": "3", "TAILOR_BACKOFF_BASE_SECONDS": "0.5",
                           "TAILOR_TRAINER_IMAGE_PULL_POLICY": "Always", "TAILOR_VALIDATION_CPU": "250m",
                           "TAILOR_VALIDATION_MEMORY": "1Gi", "TAILOR_UNRELATED": "1"})
    assert s.trainer_image == "x/y:1" and s.dataset_backend is Backend.local
    assert s.rayjob_options().image_pull_policy == s.inspect_options().image_pull_policy == "Always"
    assert (s.inspect_options().cpu, s.inspect_options().memory) == ("250m", "1Gi")
    assert s.local_max_concurrent == 3 and s.backoff_base_seconds == 0.5
    assert s.backoff_seconds(1) == 0.5 and s.backoff_seconds(3) == 2.0
    assert OperatorSettings(backoff_max_seconds=30).backoff_seconds(10) == 30


# --------------------------------------------------------------------------- work queue

def test_work_queue_deduplicates_and_never_runs_a_key_twice_at_once() -> None:
    from tailor_operator.handlers.context import WorkQueue

    running: dict[tuple, int] = {}
    calls: list[tuple] = []
    overlap = []
    lock = threading.Lock()

    def process(key: tuple) -> None:
        with lock:
            running[key] = running.get(key, 0) + 1
            if running[key] > 1:
                overlap.append(key)
            calls.append(key)
        time.sleep(0.05)
        with lock:
            running[key] -= 1

    q = WorkQueue(process, workers=4)
    q.start()
    try:
        a, b = ("FineTuneJob", "ns", "a"), ("FineTuneJob", "ns", "b")
        for _ in range(20):
            q.add(a)
            q.add(b)
        time.sleep(0.02)
        for _ in range(5):
            q.add(a)  # while a is processing: coalesced into one more pass
        q.add_after(b, 0.2)
        q.add_after(b, 0.1)  # the earlier wins, no duplicate
        time.sleep(0.6)
    finally:
        q.stop()
    assert not overlap
    assert 2 <= calls.count(a) <= 3
    assert 2 <= calls.count(b) <= 3


def test_work_queue_retries_failures_with_backoff() -> None:
    from tailor_operator.handlers.context import WorkQueue

    attempts = []

    def process(key: tuple) -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 2:
            raise RuntimeError("boom")

    q = WorkQueue(process, workers=1)
    q.start()
    try:
        q.add(("Dataset", "ns", "d"))
        time.sleep(1.6)
    finally:
        q.stop()
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 0.9


# ------------------------------------------------------------------ local backend (stand-in)

FAKE_TRAINER = r'''#!/bin/sh
# Stand-in for `python -m tailor_trainer run --config F`: writes progress next to F, then exits
# with $FAKE_EXIT after $FAKE_SLEEP seconds.
config="$5"
dir=$(dirname "$config")
printf '{"attempt": 1, "stage": "train", "state": "Running", "step": 1, "totalSteps": 4}' > "$dir/progress.json"
sleep "${FAKE_SLEEP:-0.2}"
if [ "${FAKE_EXIT:-0}" = 0 ]; then
  printf '{"attempt": 1, "stage": "evaluate", "state": "Succeeded", "step": 4, "totalSteps": 4, ' > "$dir/p.tmp"
  printf '"result": {"metrics": {"loss": 1.5}}}' >> "$dir/p.tmp"
  mv "$dir/p.tmp" "$dir/progress.json"
fi
echo "fake trainer done" >&2
exit "${FAKE_EXIT:-0}"
'''


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(FAKE_TRAINER)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _job(name: str = "demo", uid: str = "uid-1"):
    from tailor_operator.api.v1alpha1 import FineTuneJob

    return FineTuneJob.model_validate({
        "apiVersion": "tailor.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ns", "uid": uid, "generation": 1},
        "spec": {"backend": "local", "baseModel": {"uri": "/models/m"}, "datasetRef": {"name": "d"},
                 "output": {"uri": "/tmp/out"}, "resources": {"gpusPerWorker": 0}}})


def _start_action(job, run: str = "demo-r1", attempt: int = 1):
    from tailor_operator.api.v1alpha1 import Dataset
    from tailor_operator.builders.trainer_config import build_trainer_config
    from tailor_operator.reconcile.plan import StartRun

    ds = Dataset.model_validate({"apiVersion": "tailor.dev/v1alpha1", "kind": "Dataset",
                                 "metadata": {"name": "d", "namespace": "ns"}, "spec": {"source": {"uri": "/x.jsonl"}}})
    return StartRun(run=run, attempt=attempt, number=1, config=build_trainer_config(job, ds, run, attempt=attempt))


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_local_backend_runs_observes_and_limits_concurrency(tmp_path: Path, fake_python: Path) -> None:
    from tailor_operator.backends.local import LocalBackend, NoCapacity

    backend = LocalBackend(tmp_path / "work", max_concurrent=1, python=str(fake_python))
    job = _job()
    os.environ["FAKE_SLEEP"] = "0.5"
    try:
        assert backend.start(job, _start_action(job)) is True
        assert backend.start(job, _start_action(job)) is False  # same attempt already running: adopt
        assert backend.free_slots() == 0
        other = _job("other", "uid-2")
        with pytest.raises(NoCapacity):
            backend.start(other, _start_action(other, "other-r1"))
        _wait(lambda: backend.observe(job)["demo-r1"].state is RunState.succeeded)
        obs = backend.observe(job)["demo-r1"]
        assert obs.result is not None and obs.result.metrics == {"loss": 1.5} and obs.number == 1
        assert backend.free_slots() == 1
        assert backend.observe(_job(uid="someone-else")) == {}  # a same-named job never adopts it
    finally:
        os.environ.pop("FAKE_SLEEP", None)


def test_local_backend_failure_stop_and_adoption_after_restart(tmp_path: Path, fake_python: Path) -> None:
    from tailor_operator.backends.local import LocalBackend

    job = _job()
    os.environ.update(FAKE_SLEEP="5", FAKE_EXIT="3")
    try:
        first = LocalBackend(tmp_path / "work", python=str(fake_python))
        first.start(job, _start_action(job))
        # a new operator process (same work dir) finds the running trainer and adopts it
        second = LocalBackend(tmp_path / "work", python=str(fake_python))
        # judged at once: a trainer still inside exec must not look gone (see the test below)
        assert second.observe(job)["demo-r1"].state is RunState.running
        assert second.free_slots() == 0
        second.stop(job, "demo-r1")
        assert "demo-r1" not in second.observe(job)  # stopped runs look deleted, like a RayJob
    finally:
        os.environ.pop("FAKE_SLEEP", None)
        os.environ.pop("FAKE_EXIT", None)
    os.environ["FAKE_EXIT"] = "3"
    try:
        backend = LocalBackend(tmp_path / "work2", python=str(fake_python))
        backend.start(job, _start_action(job))
        _wait(lambda: backend.observe(job)["demo-r1"].state is RunState.failed)
        obs = backend.observe(job)["demo-r1"]
        assert obs.reason == "TrainerExited" and "fake trainer done" in obs.message
        backend.cleanup("ns", "demo")
        assert not (tmp_path / "work2" / "ns" / "demo").exists()
    finally:
        os.environ.pop("FAKE_EXIT", None)


def test_fingerprint_and_model_config(tmp_path: Path) -> None:
    from tailor_operator.backends.files import fingerprint_path, read_model_config

    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    one = fingerprint_path(str(tmp_path / "*.jsonl"))
    assert one and one.startswith("sha256:") and one == fingerprint_path(f"file://{tmp_path}/*.jsonl")
    (tmp_path / "b.jsonl").write_text('{"text": "z"}\n')
    assert fingerprint_path(str(tmp_path / "*.jsonl")) != one
    assert fingerprint_path("s3://bucket/x.jsonl") is None
    assert fingerprint_path(str(tmp_path / "missing.jsonl")) is None
    # what streams without end is not read: a FIFO (no writer: opening it would block), a device,
    # /proc's size-0 files; a budget bounds the rest
    os.mkfifo(tmp_path / "pipe.jsonl")
    assert fingerprint_path(str(tmp_path / "pipe.jsonl")) is None
    assert fingerprint_path("/dev/zero") is None
    assert fingerprint_path("/proc/self/status") == fingerprint_path("/proc/self/status")
    assert fingerprint_path(str(tmp_path / "a.jsonl"), budget_seconds=-1) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_model_config(str(tmp_path)) == {"model_type": "llama"}
    assert read_model_config("hf://org/model") is None


def test_metrics_track_phases_without_double_counting() -> None:
    from tailor_operator.metrics import Metrics

    m = Metrics()
    m.job_phase("u1", "Running")
    m.job_phase("u1", "Running")
    m.job_phase("u2", "Running")
    m.job_phase("u1", "Succeeded")
    value = m.registry.get_sample_value
    assert value("tailor_finetunejobs", {"phase": "Running"}) == 1
    assert value("tailor_finetunejobs", {"phase": "Succeeded"}) == 1
    m.eval_metrics("ns", "j", {"loss": 1.25, "other": 3})
    assert value("tailor_eval_metric", {"namespace": "ns", "finetunejob": "j", "metric": "loss"}) == 1.25
    m.forget_job("u1", "ns", "j")
    assert value("tailor_finetunejobs", {"phase": "Succeeded"}) == 0
    assert value("tailor_eval_metric", {"namespace": "ns", "finetunejob": "j", "metric": "loss"}) is None
    assert sys.modules["prometheus_client"].REGISTRY.get_sample_value("tailor_finetunejobs", {"phase": "Running"}) \
        is None  # nothing registered globally at import


def test_search_trials_follow_the_current_search_and_go_with_the_job() -> None:
    from prometheus_client import generate_latest

    from tailor_operator.metrics import Metrics

    m = Metrics()
    value = m.registry.get_sample_value
    labels = lambda state: {"namespace": "ns", "finetunejob": "j", "state": state}  # noqa: E731
    m.search("ns", "j", {"pending": 2, "running": 2, "completed": 1, "stopped": 1, "failed": 0})
    assert [value("tailor_search_trials", labels(s)) for s in ("pending", "running", "completed", "stopped",
                                                                "failed")] == [2, 2, 1, 1, 0]
    m.search("ns", "j", None)  # a new run without a search
    assert value("tailor_search_trials", labels("running")) is None
    m.search("ns", "j", {"running": 1})
    m.forget_job("u1", "ns", "j")
    assert value("tailor_search_trials", labels("running")) is None
    assert "# TYPE tailor_search_trials gauge" in generate_latest(m.registry).decode()  # documented, no samples


def _load_testenv():
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    path = Path(__file__).resolve().parents[2] / "scripts" / "testenv"
    spec = spec_from_loader("testenv_script", SourceFileLoader("testenv_script", str(path)))
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_process_still_inside_exec_is_alive() -> None:
    """Right after Popen returns, Linux can show an empty /proc/<pid>/cmdline: the child is still
    inside exec. Measured on the 2-core dev machine for Popen(start_new_session=True, output
    redirected), as the operator and testenv start processes: 2 in 100 starts when idle, 96 in 100
    with two busy loops running. Both liveness checks must call that alive; before, it failed an
    adopted local run and made `scripts/testenv up` give up on a kube-apiserver that was starting.
    Two busy loops run here too, so without the fix this fails nearly every time."""
    import subprocess

    from tailor_operator.backends import local

    testenv = _load_testenv()
    sleep = "/bin/sleep" if Path("/bin/sleep").exists() else "sleep"
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    seen_empty = 0
    try:
        for _ in range(30):
            p = subprocess.Popen([sleep, "30"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            try:
                seen_empty += not Path(f"/proc/{p.pid}/cmdline").read_bytes()
                assert local._pid_alive(p.pid, "30")
                assert testenv.pid_alive(p.pid, sleep)
            finally:
                p.kill()
                p.wait()
            assert not local._pid_alive(p.pid, "30") and not testenv.pid_alive(p.pid, sleep)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    print(f"empty cmdline seen in {seen_empty} of 30 starts")


def test_pid_alive_rules(monkeypatch) -> None:
    from tailor_operator.backends import local

    cases = {(b"", "S"): True, (b"", "Z"): False, (b"python\0-m\0tailor_trainer\0/w/config.json\0", "R"): True,
             (b"python\0other\0", "S"): False}
    for (raw, state), alive in cases.items():
        monkeypatch.setattr(local, "_read_proc", lambda pid, r=raw, s=state: (r, s))
        assert local._pid_alive(1, "/w/config.json") is alive, (raw, state)

    def gone(pid):
        raise FileNotFoundError(pid)

    monkeypatch.setattr(local, "_read_proc", gone)
    assert local._pid_alive(1, "x") is False


def test_a_crashed_local_trainers_last_line_is_masked() -> None:
    from tailor_operator.reconcile.observe import observe_local_run

    line = "botocore.exceptions.ClientError: https://b.s3.amazonaws.com/x?X-Amz-Signature=abc123def AKIAABCDEFGHIJKLMNOP"
    obs = observe_local_run("r", number=1, attempt=1, running=False, exit_code=1, progress=None,
                            log_tail=f"Traceback ...\n{line}\n")
    assert obs.reason == "TrainerExited" and "ClientError" in obs.message
    assert "abc123def" not in obs.message and "AKIAABCDEFGHIJKLMNOP" not in obs.message, obs.message


def test_a_validation_job_without_a_running_pod_says_what_is_there() -> None:
    from tailor_operator.reconcile.observe import observe_inspect

    job = {"metadata": {"name": "ds-v1", "creationTimestamp": "2026-03-02T09:57:00Z"}, "status": {}}
    none = observe_inspect("ds-v1", config_map=None, job=job, pods=[])
    assert none.not_started == "its Job has created no pod" and none.created_at is not None
    bound = {"metadata": {"name": "ds-v1-a"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Pending"}}
    assert "Pending on node n1" in observe_inspect("ds-v1", config_map=None, job=job, pods=[bound]).not_started
    running = {"metadata": {"name": "ds-v1-b"}, "status": {"phase": "Running"}}
    assert observe_inspect("ds-v1", config_map=None, job=job, pods=[bound, running]).not_started is None
