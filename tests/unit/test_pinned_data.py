"""Pinned data: a run trains on the rows its Dataset's validation saw, or fails with DatasetChanged.

The fingerprint comes from the real validation (``inspect_dataset``, what the operator folds into
Dataset.status.contentFingerprint), travels through the real builder into the TrainerConfig, and
the real pipeline (``main_run``, prep only) compares it with the rows it reads.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import yaml

from tailor_operator.api.v1alpha1 import Dataset, DatasetStatus, FineTuneJob
from tailor_operator.builders.preflight_job import preflight_key
from tailor_operator.builders.trainer_config import build_trainer_config
from tailor_operator.metrics import FAILURE_REASONS
from tailor_operator.reconcile.finetunejob import NON_RETRYABLE, JobObserved, reconcile_finetunejob
from tailor_operator.reconcile.observe import ValidationObservation
from tailor_operator.reconcile.plan import StartRun
from tailor_operator.reconcile.settings import OperatorSettings
from tailor_trainer import pipeline, render
from tailor_trainer.config import ResolvedDataset, TrainerConfig
from tailor_trainer.stages import prep

ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(30)]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dataset(data: Path, revision: str = "v1") -> dict:
    return {"name": "d", "source": {"uri": str(data)}, "schema": "completion", "revision": revision,
            "split": {"validation": 0.2, "test": 0.2}}


def _validate(data: Path) -> dict:
    """The Dataset.status the operator's validation would produce for this file."""
    return prep.inspect_dataset(ResolvedDataset.model_validate(_dataset(data)))


def _config_file(tmp_path: Path, model_dir: Path, data: Path, fingerprint: str | None) -> Path:
    cfg = TrainerConfig.model_validate({
        "run": {"job": "j", "name": "j-r1"},
        "model": {"uri": str(model_dir)},
        "dataset": {**_dataset(data), "contentFingerprint": fingerprint},
        "hyperparameters": {"maxSeqLength": 64, "packing": False},
        "outputUri": str(tmp_path / "run"),
        "progress": {"file": str(tmp_path / "progress.json")},
    })
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path


def test_validation_reports_the_content_fingerprint_even_with_a_user_revision(tmp_path):
    data = _write(tmp_path / "d.jsonl", ROWS)
    status = _validate(data)
    assert status["revision"] == "v1"  # the user's label says nothing about the rows...
    fp = status["contentFingerprint"]  # ...the fingerprint does
    assert fp and fp != "v1"
    _write(data, ROWS[:-1] + [{"prompt": "Question 29?", "completion": "Something else."}])
    assert _validate(data)["contentFingerprint"] != fp


def test_changed_data_fails_the_run_with_dataset_changed(tmp_path, tiny_tokenizer_dir):
    data = _write(tmp_path / "d.jsonl", ROWS)
    fp = _validate(data)["contentFingerprint"]
    # The file changes after validation, under the same user-set revision.
    _write(data, ROWS[:-1] + [{"prompt": "Question 29?", "completion": "Something else."}])

    code = pipeline.main_run(str(_config_file(tmp_path, tiny_tokenizer_dir, data, fp)), stages="prep")

    assert code == 1
    error = json.loads((tmp_path / "progress.json").read_text())["error"]
    assert error["reason"] == "DatasetChanged"
    assert error["field"] == "dataset"
    message = error["message"]
    assert str(data) in message and "revision v1" in message and fp in message
    assert "read 30 rows" in message and "new revision gets a new run" in message
    out = tmp_path / "run" / "prep"
    assert not (out / "manifest.json").exists() and not (out / "train.parquet").exists()


def test_unchanged_data_passes_and_the_manifest_records_what_was_trained_on(tmp_path, tiny_tokenizer_dir):
    data = _write(tmp_path / "d.jsonl", ROWS)
    fp = _validate(data)["contentFingerprint"]

    code = pipeline.main_run(str(_config_file(tmp_path, tiny_tokenizer_dir, data, fp)), stages="prep")

    assert code == 0, (tmp_path / "progress.json").read_text()
    manifest = json.loads((tmp_path / "run" / "prep" / "manifest.json").read_text())
    assert manifest["revision"] == "v1"
    assert manifest["fingerprint"] == manifest["expectedFingerprint"] == fp


def test_no_expected_fingerprint_means_no_check(tmp_path, tiny_tokenizer_dir):
    data = _write(tmp_path / "d.jsonl", ROWS)
    assert pipeline.main_run(str(_config_file(tmp_path, tiny_tokenizer_dir, data, None)), stages="prep") == 0


def _job_and_dataset(status: DatasetStatus) -> tuple[FineTuneJob, Dataset]:
    job = FineTuneJob.model_validate({
        "metadata": {"name": "j", "namespace": "ns"},
        "spec": {"baseModel": {"uri": "s3://models/m"}, "datasetRef": {"name": "d"},
                 "output": {"uri": "s3://out"}}})
    dataset = Dataset.model_validate({
        "metadata": {"name": "d", "namespace": "ns"},
        "spec": {"source": {"uri": "s3://data/d.jsonl"}, "schema": "completion"},
        "status": status.model_dump(by_alias=True, exclude_none=True)})
    return job, dataset


def test_run_config_carries_the_fingerprint_of_its_pinned_revision():
    job, dataset = _job_and_dataset(DatasetStatus(revision="r1", content_fingerprint="abc123"))
    cfg = build_trainer_config(job, dataset, "j-r1", dataset_revision="r1")
    assert cfg.dataset.content_fingerprint == "abc123"
    assert json.loads(cfg.model_dump_json(by_alias=True))["dataset"]["contentFingerprint"] == "abc123"
    # The status moved on to another revision: its fingerprint describes other rows.
    assert build_trainer_config(job, dataset, "j-r1", dataset_revision="r0").dataset.content_fingerprint is None


def test_a_retry_after_the_dataset_moved_on_still_checks_the_first_attempts_rows():
    """The run started on r1 (fingerprint abc123 recorded in the job's status); before its retry the
    Dataset was re-validated as r2. The retry is still pinned to r1, and its config carries r1's
    fingerprint, so prep fails with DatasetChanged instead of training on r2's rows."""
    doc = yaml.safe_load((Path(__file__).parents[1] / "data" / "ftj-retry-starts" / "input.yaml").read_text())
    doc["job"]["status"].update(datasetRevision="r1", datasetFingerprint="abc123")
    doc["dataset"]["status"].update(revision="r2", contentFingerprint="def456")
    job, dataset = FineTuneJob.model_validate(doc["job"]), Dataset.model_validate(doc["dataset"])
    settings = OperatorSettings()
    check = ValidationObservation(key=preflight_key(job, settings.trainer_image), exists=True, finished=True,
                                  result={"ok": True, "model": {}})
    now = datetime.fromisoformat(doc["now"].replace("Z", "+00:00"))
    plan = reconcile_finetunejob(job, JobObserved(dataset=dataset, runs={}, preflight=check), settings, now)
    start = next(a for a in plan.actions if isinstance(a, StartRun))
    assert (start.run, start.attempt) == ("support-r1", 2)
    assert (start.config.dataset.revision, start.config.dataset.content_fingerprint) == ("r1", "abc123")
    assert plan.status.dataset_fingerprint == "abc123"


def test_a_new_run_records_the_fingerprint_it_is_pinned_to():
    job, dataset = _job_and_dataset(DatasetStatus(revision="r1", content_fingerprint="abc123"))
    cfg = build_trainer_config(job, dataset, "j-r1", dataset_revision="r0", dataset_fingerprint="fff000")
    assert cfg.dataset.content_fingerprint == "fff000"  # what the job's status recorded wins


def test_dataset_changed_is_final_and_a_known_metrics_reason():
    assert "DatasetChanged" in NON_RETRYABLE
    assert "DatasetChanged" in FAILURE_REASONS


def test_model_card_records_revision_and_fingerprint(tmp_path):
    cfg = TrainerConfig.model_validate({
        "run": {"job": "j", "name": "j-r1"}, "model": {"uri": "/m"},
        "dataset": {**_dataset(tmp_path / "d.jsonl"), "contentFingerprint": "abc123"},
        "outputUri": str(tmp_path / "run")})
    card = render.model_card(cfg, {"run": "j-r1", "datasetRevision": "v1", "datasetFingerprint": "abc123",
                                   "metrics": {}, "artifacts": {}}, {})
    assert "revision `v1`, content fingerprint `abc123`" in card
