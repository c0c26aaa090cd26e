"""Continuous learning people can trust, on the real control plane with the local backend and real
training of the tiny Llama: a fixed evaluation set, significance, and rollback by pinning.

One FineTuneJob, driven the GitOps way (`kubectl apply` of edited manifests), scored on a fixed
evaluation Dataset with `promotion.confidence: 0.95`:

1. revision v1 (16 good rows): r1 is the first champion; the target ConfigMap names its model;
2. v2 (160 good rows): r2 is better on the fixed set, significantly: promoted, the target moves;
3. v3 (v2 plus 160 rows whose answers are shuffled between questions): r3 trains longer on more
   rows but is worse on the fixed set: not promoted, the target still names r2;
4. `pinnedRun: <job>-r1`: the champion and the target move back to r1 (Pinned);
5. the pin removed (Unpinned) and v4 (200 good rows): r4 beats r1 and is promoted.

Every run's history entry names the fixed set (and its revision) and carries its improvement
interval (r1: over the base model; later runs: over the champion on the same rows). The task is
small on purpose (name the item a ticket is about) so that the tiny model learns it in seconds
and the corrupted answers hurt on every seed.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import yaml

from operator_fixtures import REPO, Kube, OperatorProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = REPO / "examples" / "models" / "tailor-tiny-llama"
JOB = "assistant"
ITEMS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "ember"]


def _rows(start: int, stop: int, shuffled: bool = False) -> str:
    """Ticket rows; `shuffled`: the answers are shuffled between the questions (mislabeled rows)."""
    answers = [ITEMS[i % 8] for i in range(start, stop)]
    if shuffled:
        random.Random(0).shuffle(answers)
    return "".join(json.dumps({"prompt": f"Ticket {i}: my {ITEMS[i % 8]} order is late. Item:",
                               "completion": f" {a}"}) + "\n" for i, a in zip(range(start, stop), answers))


def _dataset(name: str, uri: Path, revision: str) -> dict:
    return {"apiVersion": "tailor.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": name},
            "spec": {"source": {"uri": str(uri)}, "format": "jsonl", "schema": "completion", "revision": revision,
                     "split": {"validation": 0.0, "test": 0.05, "seed": 7}}}


def _job(out: Path, pinned: str | None = None) -> dict:
    promotion = {"metric": "loss", "confidence": 0.95, "target": {"configMap": {"name": "assistant-model"}}}
    if pinned:
        promotion["pinnedRun"] = pinned
    return {"apiVersion": "tailor.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": JOB}, "spec": {
        "backend": "local", "baseModel": {"uri": str(MODEL)}, "datasetRef": {"name": "tickets"},
        "adaptation": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                  "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        # epochs, not maxSteps: a revision with more rows also trains longer, as in the issue
        "hyperparameters": {"epochs": 3, "batchSize": 8, "learningRate": 0.02, "maxSeqLength": 32, "seed": 7,
                            "checkpointEverySteps": 1000, "evalEverySteps": 1000},
        "evaluation": {"metrics": ["loss", "accuracy"], "compareToBase": True, "worstExamples": 0,
                       "datasetRef": {"name": "tickets-eval"}},
        "output": {"uri": str(out)}, "backoffLimit": 0,
        "continuousLearning": {"promotion": promotion}}}


def test_fixed_yardstick_significance_and_rollback(control_plane, k8s_client, namespace, tmp_path) -> None:
    if not (MODEL / "config.json").is_file():
        pytest.fail("examples/models/tailor-tiny-llama is missing from the checkout")
    started = time.monotonic()
    kube = Kube(k8s_client, namespace)
    out = tmp_path / "runs"
    data = {"eval": _rows(9000, 9048), "v1": _rows(0, 16), "v2": _rows(0, 160),
            "v3": _rows(0, 160) + _rows(5000, 5160, shuffled=True), "v4": _rows(0, 200)}
    for name, text in data.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    operator = OperatorProcess(control_plane.kubeconfig, tmp_path / "op", namespaces=[namespace],
                               env={"TAILOR_DATASET_BACKEND": "local", "TAILOR_LOCAL_MAX_CONCURRENT": "1"}).start()

    def apply(obj: dict) -> None:
        path = tmp_path / "manifest.yaml"
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        control_plane.kubectl("apply", "-n", namespace, "-f", str(path), check=True)

    def status() -> dict:
        return kube.status("FineTuneJob", JOB)

    def target() -> str | None:
        return ((kube.get("ConfigMap", "assistant-model") or {}).get("data") or {}).get("model-uri")

    def entry(run: str, timeout: float = 240) -> dict:
        def done():
            st = status()
            if st.get("phase") == "Failed":
                raise AssertionError(f"{st}\n{operator.log_tail()}")
            return next((h for h in st.get("history", []) if h["run"] == run and h.get("reason") not in
                         ("Pinned", "Unpinned")), None)
        return wait_until(done, timeout, interval=1, what=f"{run} finished", on_timeout=operator.log_tail)

    def model(run: str) -> str:
        return next(h["model"] for h in status()["history"] if h["run"] == run and h.get("model"))

    try:
        apply(_dataset("tickets-eval", tmp_path / "eval.jsonl", "e1"))
        wait_until(lambda: kube.condition("Dataset", "tickets-eval", "Ready").get("status") == "True", 120,
                   interval=1, what="evaluation Dataset Ready", on_timeout=operator.log_tail)
        eval_rows = kube.status("Dataset", "tickets-eval")["rows"]
        apply(_dataset("tickets", tmp_path / "v1.jsonl", "v1"))
        apply(_job(out))

        # 1. first champion, scored on the fixed set, with its interval over the base model
        r1 = entry(f"{JOB}-r1")
        assert r1["promoted"] and r1["reason"] == "FirstChampion", r1
        assert r1["evaluatedOn"] == {"dataset": "tickets-eval", "revision": "e1", "rows": eval_rows}, r1
        assert r1["interval"]["against"] == "base" and r1["interval"]["low"] > 0, r1  # it learned the task
        wait_until(lambda: target() == model(f"{JOB}-r1"), 30, what="target names r1")

        # 2. more good rows: significantly better on the same fixed rows
        apply(_dataset("tickets", tmp_path / "v2.jsonl", "v2"))
        r2 = entry(f"{JOB}-r2")
        assert r2["promoted"] and r2["reason"] == "Improved", (r2, status()["conditions"])
        assert r2["evaluatedOn"]["dataset"] == "tickets-eval" and r2["evaluatedOn"]["rows"] == eval_rows
        iv = r2["interval"]
        assert iv["against"] == f"{JOB}-r1" and iv["confidence"] == 0.95 and 0 < iv["low"] <= iv["improvement"]
        assert r2["metrics"]["loss"] < r1["metrics"]["loss"]
        wait_until(lambda: target() == model(f"{JOB}-r2"), 30, what="target names r2")

        # 3. mislabeled rows: trains longer, scores worse on the fixed set, rejected
        apply(_dataset("tickets", tmp_path / "v3.jsonl", "v3"))
        r3 = entry(f"{JOB}-r3")
        assert not r3["promoted"] and r3["reason"] == "NotBetter", r3
        assert r3["metrics"]["loss"] > r2["metrics"]["loss"]
        assert r3["interval"]["against"] == f"{JOB}-r2" and r3["interval"]["improvement"] < 0, r3
        assert status()["champion"]["run"] == f"{JOB}-r2" and target() == model(f"{JOB}-r2")

        # 4. rollback: pin r1 (a spec change); champion and target move back
        apply(_job(out, pinned=f"{JOB}-r1"))
        wait_until(lambda: status().get("champion", {}).get("run") == f"{JOB}-r1"
                   and target() == model(f"{JOB}-r1"), 60, interval=1, what="pinned to r1",
                   on_timeout=operator.log_tail)
        st = status()
        assert st["history"][-1]["reason"] == "Pinned" and st["history"][-1]["run"] == f"{JOB}-r1"
        assert next(c for c in st["conditions"] if c["type"] == "Pinned")["status"] == "True"

        # 5. unpin, then a better revision: promoted over the (formerly pinned) r1
        apply(_job(out))
        wait_until(lambda: status()["history"][-1]["reason"] == "Unpinned", 60, interval=1, what="unpinned",
                   on_timeout=operator.log_tail)
        apply(_dataset("tickets", tmp_path / "v4.jsonl", "v4"))
        r4 = entry(f"{JOB}-r4")
        assert r4["promoted"] and r4["reason"] == "Improved", r4
        assert r4["interval"]["against"] == f"{JOB}-r1" and r4["interval"]["low"] > 0
        wait_until(lambda: target() == model(f"{JOB}-r4"), 30, what="target names r4")

        history = status()["history"]
        assert [(h["run"].rsplit("-", 1)[1], h["reason"]) for h in history] == [
            ("r1", "FirstChampion"), ("r2", "Improved"), ("r3", "NotBetter"), ("r1", "Pinned"),
            ("r1", "Unpinned"), ("r4", "Improved")]
        for h in history:
            assert h["evaluatedOn"]["dataset"] == "tickets-eval" and {"low", "high"} <= set(h["interval"]), h
        reasons = kube.event_reasons(JOB)
        for reason in ("Promoted", "NotPromoted", "Pinned", "Unpinned"):
            assert reason in reasons, reasons
        rejected = next(e["message"] for e in kube.events(JOB) if e["reason"] == "NotPromoted")
        assert "evaluation Dataset tickets-eval@e1" in rejected and "95% interval" in rejected, rejected
        report = Path(str(r4["model"]).replace("file://", "")).parents[1] / "evaluate" / "report.html"
        assert "Compared with champion" in report.read_text()
    finally:
        operator.stop()
        print(f"continuous-learning scenario took {time.monotonic() - started:.0f}s")
