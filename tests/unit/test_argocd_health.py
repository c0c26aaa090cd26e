"""Argo CD health checks (docs/argocd/*.lua) run by the Lua VM Argo CD embeds: gopher-lua at the
version Argo CD pins, driven like argo-cd's util/lua (`obj` global, default libraries only, the
returned table read as {status, message}); built by `scripts/testenv build` as
testenv/luahealth. Fixtures follow the status contract the operator writes (docs/gitops.md): one
per phase of each kind, plus a missing status and a stale observedGeneration."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ARGOCD = REPO / "docs" / "argocd"
FTJ_LUA = ARGOCD / "finetunejob.lua"
DS_LUA = ARGOCD / "dataset.lua"
T = "2026-12-01T10:00:00Z"


@pytest.fixture(scope="module")
def luahealth() -> Path:
    r = subprocess.run([str(REPO / "scripts" / "testenv"), "env", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"`scripts/testenv env --json` failed: {r.stderr}", pytrace=False)
    path = Path(json.loads(r.stdout)["tools"]["luahealth"])
    if not path.is_file():
        pytest.fail(f"{path} is not built: run `scripts/testenv build` (docs/testenv.md)", pytrace=False)
    return path


def health(luahealth: Path, script: Path, obj: dict[str, Any]) -> dict[str, str]:
    r = subprocess.run([str(luahealth), str(script)], input=json.dumps(obj), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, f"{script.name} failed on {json.dumps(obj)}: {r.stderr}"
    return json.loads(r.stdout)


def cond(type_: str, status: str, reason: str = "", message: str = "", generation: int = 3) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": T, "observedGeneration": generation}


def job(phase: Optional[str], generation: int = 3, observed: Optional[int] = 3, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "tailor.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "support-bot", "namespace": "team-a", "generation": generation},
        "spec": {"baseModel": {"uri": "hf://tiny"}, "datasetRef": {"name": "support"}},
    }
    if phase is not None:
        obj["status"] = {"phase": phase, "observedGeneration": observed, **status}
        if observed is None:
            del obj["status"]["observedGeneration"]
    return obj


def _in_flight(phase: str, why: str, **extra: Any) -> dict[str, Any]:
    return job(phase, conditions=[cond("Ready", "False", phase, why), cond("Reconciling", "True", phase, why)],
               currentRun="support-bot-r1", **extra)


RUNNING_PROGRESS = {"summary": "42% 126/300", "percent": 42, "step": 126, "totalSteps": 300, "epoch": 0.84,
                    "loss": 1.25, "tokensPerSecond": 5120.5, "etaSeconds": 95}

# (id, object, expected status, substrings the message must contain)
FTJ_CASES = [
    ("no-status", job(None), "Progressing", ["Waiting for the operator", "generation 3"]),
    # without status.observedGeneration (as kstatus): the conditions' own generations decide
    ("no-observed-generation", job("Pending", observed=None), "Progressing", ["Pending"]),
    ("no-observed-generation-ready", job("Succeeded", observed=None,
                                         conditions=[cond("Ready", "True", "Succeeded", "run r1 succeeded")]),
     "Healthy", ["run r1 succeeded"]),
    ("no-observed-generation-stale-ready", job("Succeeded", generation=4, observed=None,
                                               conditions=[cond("Ready", "True", "Succeeded", "run r1 succeeded")]),
     "Progressing", ["Succeeded"]),
    ("stale-generation", job("Succeeded", generation=4, observed=3,
                             conditions=[cond("Ready", "True", "Succeeded", "run r1 succeeded")]),
     "Progressing", ["Waiting for the operator", "generation 4"]),
    ("pending", _in_flight("Pending", "waiting for Dataset support to be Ready"), "Progressing",
     ["Pending", "waiting for Dataset support to be Ready"]),
    ("validating", _in_flight("Validating", "validating Dataset support"), "Progressing",
     ["Validating", "validating Dataset support"]),
    ("queued", _in_flight("Queued", "RayJob support-bot-r1 is waiting for capacity"), "Progressing",
     ["Queued", "waiting for capacity"]),
    ("running", _in_flight("Running", "run support-bot-r1 is training", stage="train", progress=RUNNING_PROGRESS),
     "Progressing", ["Running: stage train, 42% (step 126/300), ETA 95s"]),
    ("evaluating", _in_flight("Evaluating", "evaluating", stage="evaluate",
                              progress={"summary": "evaluate 100% 300/300", "percent": 100, "step": 300,
                                        "totalSteps": 300}),
     "Progressing", ["Evaluating: stage evaluate, 100% (step 300/300)"]),
    ("retry-waiting", job("Pending", attempts=1,
                          conditions=[cond("Ready", "False", "AttemptFailed", "attempt 1 failed; retrying"),
                                      cond("Reconciling", "True", "Retrying", "retrying in 30s")],
                          error={"reason": "OOMKilled", "message": "worker 0 ran out of memory"}),
     "Progressing", ["Pending", "OOMKilled: worker 0 ran out of memory"]),
    ("pending-stalled", job("Pending",
                            conditions=[cond("Ready", "False", "DatasetNotFound", "Dataset support not found"),
                                        cond("Stalled", "True", "DatasetNotFound", "Dataset support not found")],
                            error={"reason": "DatasetNotFound", "message": "Dataset support not found",
                                   "field": "spec.datasetRef.name"}),
     "Degraded", ["DatasetNotFound: Dataset support not found (field spec.datasetRef.name)"]),
    ("policy-refused", job("Pending",
                           conditions=[cond("Ready", "False", "PolicyViolation", "refused"),
                                       cond("Stalled", "True", "PolicyViolation",
                                            "spec.resources.gpusPerWorker 8 exceeds the namespace limit 2")]),
     "Degraded", ["exceeds the namespace limit 2"]),
    ("failed", job("Failed", completionTime=T,
                   conditions=[cond("Ready", "False", "Failed", "run support-bot-r1 failed"),
                               cond("Stalled", "True", "Diverged", "loss became NaN at step 40")],
                   error={"reason": "Diverged", "message": "loss became NaN at step 40"}),
     "Degraded", ["Diverged: loss became NaN at step 40"]),
    ("failed-without-stalled", job("Failed", conditions=[cond("Ready", "False", "Failed", "gate failed")]),
     "Degraded", ["gate failed"]),
    ("succeeded", job("Succeeded", completionTime=T, metrics={"loss": 0.81},
                      conditions=[cond("Ready", "True", "Succeeded", "run support-bot-r1 succeeded")]),
     "Healthy", ["run support-bot-r1 succeeded"]),
    ("continuous-learning-idle", job("Succeeded", completionTime=T,
                                     champion={"run": "support-bot-r2", "datasetRevision": "v2"},
                                     conditions=[cond("Ready", "True", "WaitingForData",
                                                      "champion support-bot-r2; waiting for a new revision")]),
     "Healthy", ["waiting for a new revision", "champion support-bot-r2"]),
    ("succeeded-no-message", job("Succeeded", champion={"run": "support-bot-r2"},
                                 conditions=[cond("Ready", "True", "Succeeded")]),
     "Healthy", ["Succeeded; champion support-bot-r2"]),
    ("continuous-learning-retraining", _in_flight("Running", "retraining on revision v3", stage="prep",
                                                  champion={"run": "support-bot-r2"}),
     "Progressing", ["Running: stage prep - retraining on revision v3"]),
    ("suspended", job("Suspended", conditions=[cond("Ready", "False", "Suspended", "suspended"),
                                                cond("Suspended", "True", "Suspended", "spec.suspend is true")]),
     "Suspended", ["spec.suspend is true"]),
    ("succeeded-ready-stale-condition", job("Succeeded", generation=5, observed=5,
                                            conditions=[cond("Ready", "True", "Succeeded", "old", generation=4)]),
     "Progressing", ["Succeeded"]),
]


@pytest.mark.parametrize("obj,want,parts", [c[1:] for c in FTJ_CASES], ids=[c[0] for c in FTJ_CASES])
def test_finetunejob_health(luahealth, obj, want, parts) -> None:
    got = health(luahealth, FTJ_LUA, obj)
    assert got["status"] == want, got
    for part in parts:
        assert part in got.get("message", ""), got


def test_every_finetunejob_phase_has_a_case() -> None:
    from tailor_operator.api.v1alpha1 import Phase
    covered = {(c[1].get("status") or {}).get("phase") for c in FTJ_CASES}
    assert {p.value for p in Phase} <= covered


def dataset(generation: int = 2, observed: Optional[int] = 2, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "tailor.dev/v1alpha1", "kind": "Dataset",
        "metadata": {"name": "support", "namespace": "team-a", "generation": generation},
        "spec": {"source": {"uri": "file:///data/support.jsonl"}, "format": "jsonl", "schema": "chat"},
    }
    if status or observed is not None:
        obj["status"] = dict(status)
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


DS_CASES = [
    ("no-status", dataset(observed=None), "Progressing", ["Waiting for the operator", "generation 2"]),
    ("stale-generation", dataset(generation=3, revision="v1",
                                 conditions=[cond("Ready", "True", "Validated", "1200 rows", generation=2)]),
     "Progressing", ["generation 3"]),
    ("validating", dataset(conditions=[cond("Ready", "Unknown", "Validating", "validating revision v2", 2),
                                       cond("Reconciling", "True", "Validating", "validation Job running", 2)]),
     "Progressing", ["Validating: validation Job running"]),
    ("ready", dataset(revision="v2", rows=1200, conditions=[cond("Ready", "True", "Validated", "1200 rows", 2)]),
     "Healthy", ["revision v2: 1200 rows"]),
    ("validation-failed", dataset(
        conditions=[cond("Ready", "False", "DataInvalid", "38% of rows are invalid", 2),
                    cond("Stalled", "True", "DataInvalid", "38% of rows are invalid (maxBadFraction 0.1)", 2)],
        firstErrors=[{"line": 7, "reason": "MissingColumn", "message": "no 'messages'"}]),
     "Degraded", ["DataInvalid: 38% of rows are invalid (maxBadFraction 0.1)", "line 7, MissingColumn"]),
    ("refused", dataset(conditions=[cond("Ready", "False", "SourceRefused", "refused", 2),
                                    cond("Stalled", "True", "SourceRefused",
                                         "source pvc://other/x is outside the allowed prefixes", 2)]),
     "Degraded", ["outside the allowed prefixes"]),
    ("not-ready-transient", dataset(conditions=[cond("Ready", "False", "SourceUnavailable",
                                                     "s3 returned 503; retrying", 2)]),
     "Progressing", ["s3 returned 503"]),
]


@pytest.mark.parametrize("obj,want,parts", [c[1:] for c in DS_CASES], ids=[c[0] for c in DS_CASES])
def test_dataset_health(luahealth, obj, want, parts) -> None:
    got = health(luahealth, DS_LUA, obj)
    assert got["status"] == want, got
    for part in parts:
        assert part in got.get("message", ""), got


def test_scripts_need_no_open_libs(luahealth, tmp_path) -> None:
    """Argo CD opens no `string`/`math` for a ConfigMap script unless useOpenLibs is set: the
    runner must refuse a script that uses them (else the tests above could pass on a script that
    fails in Argo CD), and ours must not use them."""
    bad = tmp_path / "bad.lua"
    bad.write_text('return {status = string.format("%s", "Healthy")}\n')
    r = subprocess.run([str(luahealth), str(bad)], input="{}", capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "format" in r.stderr
    invalid = tmp_path / "invalid.lua"
    invalid.write_text('return {status = "Fine"}\n')
    assert health(luahealth, invalid, {}) == {"status": "Unknown", "message": "Lua returned an invalid health status"}


def test_argocd_cm_snippet_embeds_the_scripts_verbatim() -> None:
    cm = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    assert (cm["kind"], cm["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    assert cm["data"] == {"resource.customizations.health.tailor.dev_FineTuneJob": FTJ_LUA.read_text(),
                          "resource.customizations.health.tailor.dev_Dataset": DS_LUA.read_text()}


def test_degraded_wins_over_a_stale_ready(luahealth) -> None:
    """A failed retrain of a job that once succeeded: Ready may still read True from the old run
    until the operator rewrites it, yet the job is Degraded."""
    obj = copy.deepcopy(job("Failed", conditions=[cond("Ready", "True", "Succeeded", "old run"),
                                                   cond("Stalled", "True", "TrainerExited", "exit code 1")]))
    assert health(luahealth, FTJ_LUA, obj)["status"] == "Degraded"


def _contract(kind: str, obj: dict[str, Any]) -> str:
    """The mapping of docs/gitops.md, written independently of the Lua."""
    st, gen = obj.get("status"), obj["metadata"].get("generation")
    if not st or (st.get("observedGeneration") is not None and gen is not None and st["observedGeneration"] < gen):
        return "Progressing"
    conds = {c["type"]: c for c in st.get("conditions") or []}

    def holds(t: str) -> bool:
        c = conds.get(t)
        return c is not None and c["status"] == "True" and (
            c.get("observedGeneration") is None or gen is None or c["observedGeneration"] >= gen)
    if st.get("phase") == "Failed" or holds("Stalled"):
        return "Degraded"
    if kind == "FineTuneJob" and st.get("phase") == "Suspended":
        return "Suspended"
    return "Healthy" if holds("Ready") else "Progressing"


GOLDENS = sorted(p for prefix in ("ftj", "ds") for p in (REPO / "tests" / "data").glob(f"{prefix}-*")
                 if (p / "expected.yaml").is_file() and (p / "input.yaml").is_file())


def test_the_operators_own_statuses(luahealth) -> None:
    """Every status the reconcile goldens (tests/data/{ftj,ds}-*) expect the operator to write, on
    the object it was written for: the scripts agree with the contract on each of them."""
    seen: dict[str, set[str]] = {"FineTuneJob": set(), "Dataset": set()}
    for case in GOLDENS:
        doc = yaml.safe_load((case / "input.yaml").read_text())
        expected = yaml.safe_load((case / "expected.yaml").read_text())
        obj = copy.deepcopy(doc.get("job") or doc["dataset"])
        if not expected.get("status"):
            continue
        obj["status"] = expected["status"]
        kind = obj["kind"]
        got = health(luahealth, FTJ_LUA if kind == "FineTuneJob" else DS_LUA, obj)
        assert got["status"] == _contract(kind, obj), (case.name, got)
        assert got.get("message"), case.name
        seen[kind].add(got["status"])
    assert {"Healthy", "Progressing", "Degraded"} <= seen["FineTuneJob"], seen
    assert {"Healthy", "Progressing", "Degraded"} <= seen["Dataset"], seen
