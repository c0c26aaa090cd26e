"""The trainer -> operator contract (tailor_trainer/contract.py): what the reporter writes is what
the operator reads, and a malformed document never breaks a reconcile."""

from __future__ import annotations

import json

from tailor_operator.reconcile.observe import RunState, observe_local_run, progress_for_attempt
from tailor_trainer.config import ProgressSink, RunInfo
from tailor_trainer.contract import PROGRESS_FILE, STAGE_ORDER, ProgressDoc, RunResult
from tailor_trainer.report import Reporter


def _reporter(tmp_path) -> Reporter:
    run = RunInfo(name="job-r1", job="job", namespace="default", attempt=2)
    return Reporter.from_config(run, ProgressSink(file=str(tmp_path / PROGRESS_FILE)))


def test_what_the_reporter_writes_reads_back_as_the_model(tmp_path) -> None:
    rep = _reporter(tmp_path)
    rep.update(stage="prep", rowsRead=120)
    rep.update(stage="train", step=7, totalSteps=20, epoch=0.35, loss=2.25, tokensPerSecond=812.5, etaSeconds=13)
    doc = ProgressDoc.read((tmp_path / PROGRESS_FILE).read_text())
    assert doc is not None
    assert (doc.run, doc.job, doc.attempt, doc.stage, doc.state) == ("job-r1", "job", 2, "train", "Running")
    assert (doc.step, doc.total_steps, doc.epoch, doc.loss, doc.eta_seconds) == (7, 20, 0.35, 2.25, 13.0)
    assert doc.known_stage == "train" and not doc.failed and not doc.finished_ok
    assert doc.updated_at and doc.started_at

    rep.succeed({"metrics": {"loss": 1.5, "exactMatch": None}, "artifacts": {"model": "/r/train/model"},
                 "champion": {"run": "job-r0", "metrics": {"loss": 1.7}}, "tokensTrained": 4096})
    doc = ProgressDoc.read((tmp_path / PROGRESS_FILE).read_text())
    assert doc.finished_ok and doc.result is not None
    assert doc.result.metrics == {"loss": 1.5}  # nulls dropped
    assert doc.result.champion.metrics == {"loss": 1.7} and doc.result.tokens_trained == 4096


def test_a_failure_carries_reason_message_and_field(tmp_path) -> None:
    rep = _reporter(tmp_path)
    rep.fail("InvalidSpec", "lora.targetModules: no module named qq", field="spec.adapter.lora.targetModules")
    doc = ProgressDoc.read((tmp_path / PROGRESS_FILE).read_text())
    assert doc.failed and doc.error.reason == "InvalidSpec"
    assert doc.error.field == "spec.adapter.lora.targetModules"


def test_wrong_types_read_as_absent_not_as_errors() -> None:
    doc = ProgressDoc.read({"stage": "train", "step": "7", "totalSteps": True, "loss": "low", "epoch": 4.0,
                            "result": {"metrics": "none", "gates": "x", "artifacts": 3}, "error": {},
                            "rowsRead": 5})
    assert doc.step is None and doc.total_steps is None and doc.loss is None and doc.epoch == 4.0
    assert doc.result.metrics == {} and doc.result.gates == [] and doc.result.artifacts == {}
    assert doc.error is None and doc.model_extra == {"rowsRead": 5}
    assert ProgressDoc.read("not json") is None and ProgressDoc.read("[1, 2]") is None
    assert ProgressDoc.read({"stage": "train", "step": 4.0}).step is None  # 4.0 is not a step count
    assert ProgressDoc.read({"stage": "unpack"}).known_stage is None


def test_stale_attempts_are_dropped_and_the_operator_reads_models() -> None:
    assert progress_for_attempt({"attempt": 1, "state": "Running"}, 2) is None
    raw = json.dumps({"attempt": 2, "state": "Succeeded", "stage": STAGE_ORDER[-1],
                      "result": {"metrics": {"loss": 1.25}}})
    obs = observe_local_run("job-r1", number=1, attempt=2, running=False, exit_code=0, progress=raw)
    assert obs.state is RunState.succeeded and isinstance(obs.result, RunResult)
    assert obs.result.metrics == {"loss": 1.25}


def test_exit_zero_without_a_result_is_not_success() -> None:
    obs = observe_local_run("job-r1", number=1, attempt=1, running=False, exit_code=0,
                            progress={"attempt": 1, "state": "Succeeded", "result": {}})
    assert obs.state is RunState.failed and obs.reason == "TrainerIncomplete"
