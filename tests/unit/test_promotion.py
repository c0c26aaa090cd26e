"""promotion.decide / decide_run: the point estimate, the significance rule (confidence), the
interval that must be about the current champion, and pinning that promotes nothing."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tailor_operator.api.v1alpha1 import ChampionStatus, HistoryEntry, Phase, Promotion
from tailor_operator.reconcile.promotion import decide, decide_run, record_evaluation
from tailor_trainer.contract import Interval, RunResult

CHAMP = ChampionStatus(run="job-r1", model="file:///m/r1", metrics={"loss": 1.30},
                       promoted_at=datetime(2026, 1, 1, tzinfo=timezone.utc))


def _iv(low: float, high: float, improvement: float = 0.05, against: str = "job-r1", metric: str = "loss",
        confidence: float = 0.95) -> Interval:
    return Interval(metric=metric, against=against, improvement=improvement, low=low, high=high,
                    confidence=confidence, rows=80)


@pytest.mark.parametrize("policy, interval, promote, reason", [
    (Promotion(), None, True, "Improved"),                                   # point estimate only
    (Promotion(), _iv(-0.02, 0.12), True, "Improved"),                       # interval reported, not required
    (Promotion(confidence=0.95), _iv(0.01, 0.09), True, "Improved"),         # significant
    (Promotion(confidence=0.95), _iv(-0.02, 0.12), False, "NotSignificant"),  # may be noise
    (Promotion(confidence=0.95, minImprovement=0.02), _iv(0.01, 0.09), False, "NotSignificant"),
    (Promotion(confidence=0.95, minImprovement=0.02), _iv(0.03, 0.09), True, "Improved"),
    (Promotion(confidence=0.95), None, False, "NotSignificant"),             # no interval: not proven
    (Promotion(confidence=0.95), _iv(0.01, 0.09, against="job-r0"), False, "NotSignificant"),  # another champion
    (Promotion(confidence=0.95), _iv(0.01, 0.09, metric="accuracy"), False, "NotSignificant"),
    (Promotion(confidence=0.99), _iv(0.01, 0.09, confidence=0.9), False, "NotSignificant"),  # too loose
])
def test_decide_with_confidence(policy, interval, promote, reason) -> None:
    d = decide(policy, {"loss": 1.25}, CHAMP, {"loss": 1.30}, interval, "evaluation Dataset eval@r1 (80 rows)")
    assert (d.promote, d.reason) == (promote, reason), d.message
    assert "evaluation Dataset eval@r1" in d.message
    if interval is not None and interval.against == "job-r1" and interval.metric == "loss":
        assert f"interval [{interval.low:.4g}, {interval.high:.4g}]" in d.message


def test_a_worse_candidate_is_not_better_whatever_its_interval() -> None:
    d = decide(Promotion(confidence=0.9), {"loss": 1.4}, CHAMP, {"loss": 1.3}, _iv(-0.2, -0.05, improvement=-0.1))
    assert (d.promote, d.reason) == (False, "NotBetter")


def test_accuracy_is_higher_is_better() -> None:
    champ = CHAMP.model_copy(update={"metrics": {"accuracy": 0.5}})
    policy = Promotion(metric="accuracy", confidence=0.95)
    iv = _iv(0.01, 0.05, improvement=0.03, metric="accuracy")
    assert decide(policy, {"accuracy": 0.53}, champ, {"accuracy": 0.5}, iv).promote
    assert decide(policy, {"accuracy": 0.47}, champ, {"accuracy": 0.5}, iv).reason == "NotBetter"


def _result(champion_run: str, loss: float, rescored: float, interval: Interval) -> RunResult:
    return RunResult.read({"run": "job-r3", "metrics": {"loss": loss},
                           "champion": {"run": champion_run, "metrics": {"loss": rescored}},
                           "evaluatedOn": {"dataset": "eval", "revision": "r1", "rows": 80},
                           "comparison": interval.model_dump(by_alias=True)})


def test_decide_run_uses_the_rescore_only_of_the_current_champion() -> None:
    # the run re-scored job-r0, but the champion is now job-r1 (pinned meanwhile): its recorded
    # metrics are the baseline, and the interval (about job-r0) cannot prove anything
    result = _result("job-r0", 1.25, 1.50, _iv(0.2, 0.3, against="job-r0"))
    d = decide_run(Promotion(), {"loss": 1.25}, CHAMP, result)
    assert d.promote and "1.3" in d.message and "interval" not in d.message
    assert decide_run(Promotion(confidence=0.95), {"loss": 1.25}, CHAMP, result).reason == "NotSignificant"


def test_nothing_is_promoted_while_pinned() -> None:
    result = _result("job-r1", 1.0, 1.3, _iv(0.2, 0.4, improvement=0.3))
    d = decide_run(Promotion(pinnedRun="job-r1"), {"loss": 1.0}, CHAMP, result)
    assert (d.promote, d.reason) == (False, "Pinned")
    assert "pinnedRun is job-r1" in d.message and "would have been promoted" in d.message


def test_the_history_entry_keeps_the_rows_and_the_interval() -> None:
    entry = HistoryEntry(run="job-r3", phase=Phase.succeeded)
    record_evaluation(entry, _result("job-r1", 1.2, 1.3, _iv(0.01, 0.2)), "file:///m/r3")
    assert entry.model == "file:///m/r3"
    assert entry.evaluated_on is not None and (entry.evaluated_on.dataset, entry.evaluated_on.revision,
                                               entry.evaluated_on.rows) == ("eval", "r1", 80)
    assert entry.interval is not None and (entry.interval.against, entry.interval.low) == ("job-r1", 0.01)


def test_tailor_run_finds_the_evaluation_set_in_the_same_file(tmp_path) -> None:
    """`tailor run` (no API server) takes evaluation.datasetRef from the manifest; a missing one is a
    usage error naming the field, never a silent fall back to the run's own test split."""
    from click.testing import CliRunner

    from tailor_operator.cli import main

    manifest = tmp_path / "job.yaml"
    manifest.write_text(f"""\
apiVersion: tailor.dev/v1alpha1
kind: Dataset
metadata: {{name: support}}
spec: {{source: {{uri: {tmp_path}/d.jsonl}}, schema: instruction}}
---
apiVersion: tailor.dev/v1alpha1
kind: FineTuneJob
metadata: {{name: job}}
spec:
  backend: local
  baseModel: {{uri: {tmp_path}/model}}
  datasetRef: {{name: support}}
  evaluation: {{datasetRef: {{name: support-eval}}}}
  output: {{uri: {tmp_path}/runs}}
""")
    result = CliRunner().invoke(main, ["run", str(manifest)])
    assert result.exit_code == 2, result.output
    assert "spec.evaluation.datasetRef.name: Dataset 'support-eval' is not in" in result.stderr
