"""search: real Ray Tune trials of the real recipe on the tiny Llama fixture.

ASHA stops the hopeless learning rates early and the best trial that trained to its end goes on
to evaluate, where it beats the base model; a search killed midway resumes (Tune's restore) without
training its finished trials again; a config without a search hashes, and trains, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.tune")

from tailor_trainer.config import TrainerConfig  # noqa: E402
from tailor_trainer.search import planned_steps, trial_config  # noqa: E402
from tailor_trainer.stages import StageContext  # noqa: E402
from tailor_trainer.stages.adapt import run_adapt  # noqa: E402
from tailor_trainer.stages.evaluate import run_evaluate  # noqa: E402
from tailor_trainer.stages.prep import run_prep  # noqa: E402
from tailor_trainer.stages.train import run_train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "ember", "pearl", "cedar"]
TOO_SMALL, GOOD, TOO_LARGE = 1e-6, 1e-2, 0.9
# Seed 6 draws (lr, r): (GOOD, 8), (GOOD, 4), (TOO_LARGE, 4), (GOOD, 4), (GOOD, 8), (TOO_SMALL, 8):
# two good trials set the bar at each rung before a hopeless one reaches it.
SEARCH = {"space": {"learningRate": {"choices": [TOO_SMALL, GOOD, TOO_LARGE]},
                    "lora": {"r": {"choices": [4, 8]}}},
          "trials": 6, "concurrentTrials": 2, "scheduler": "asha", "reductionFactor": 3, "seed": 6}


def body(run_dir, model_dir, data, search=None, **hyper) -> dict:
    out = {
        "run": {"job": "unit", "name": "unit-r1"}, "model": {"uri": str(model_dir)},
        "dataset": {"name": "words", "source": {"uri": data}, "schema": "completion",
                    "split": {"validation": 0.15, "test": 0.15}},
        "adaptation": {"method": "lora", "lora": {"r": 4, "dropout": 0.0}},
        "hyperparameters": {"learningRate": 5e-3, "batchSize": 4, "maxSteps": 24, "maxSeqLength": 64,
                            "evalEverySteps": 3, "checkpointEverySteps": 4, "checkpointsToKeep": 1, **hyper},
        "evaluation": {"metrics": ["loss"], "compareToBase": True},
        "resources": {"workers": 1, "cpusPerWorker": 1},
        "outputUri": str(run_dir),
    }
    if search is not None:
        out["search"] = search
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("search")
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for i in range(60):
            a, b = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
            f.write(json.dumps({"prompt": f"say {a} {b} {i}:", "completion": f" {a} {b}"}) + "\n")
    cfg = TrainerConfig.model_validate(body(root / "run", tiny_model_dir, str(data)))
    run_prep(cfg, str(root / "run"))
    return {"root": root, "data": str(data), "model": tiny_model_dir}


def context(prepared, run_dir: Path, search=None, **hyper) -> tuple[StageContext, list[dict]]:
    cfg = TrainerConfig.model_validate(body(run_dir, prepared["model"], prepared["data"], search, **hyper))
    if not (run_dir / "prep").exists():
        shutil.copytree(prepared["root"] / "run" / "prep", run_dir / "prep")
    seen: list[dict] = []
    return StageContext(config=cfg, run_dir=str(run_dir), config_hash=cfg.config_hash(),
                        progress=lambda **kw: seen.append(kw), model_dir=str(prepared["model"])), seen


def stage(ctx: StageContext, name: str, fn) -> dict:
    """Run a stage and write its manifest as the pipeline does."""
    out = fn(ctx)
    Path(ctx.run_dir, name).mkdir(exist_ok=True)
    Path(ctx.run_dir, name, "manifest.json").write_text(json.dumps({**out, "stage": name,
                                                                    "configHash": ctx.config_hash}))
    return out


@pytest.mark.slow
def test_asha_stops_hopeless_learning_rates_and_the_best_trial_is_evaluated(prepared, tmp_path):
    ctx, seen = context(prepared, tmp_path / "run", SEARCH)
    stage(ctx, "adapt", run_adapt)
    manifest = stage(ctx, "train", run_train)
    search = manifest["search"]
    table = {t["id"]: t for t in search["table"]}
    assert len(table) == 6 and search["completed"] + search["stopped"] == 6, search
    lr = {i: t["params"]["learningRate"] for i, t in table.items()}
    completed = [t for t in table.values() if t["state"] == "completed"]
    assert completed and all(lr[t["id"]] == GOOD for t in completed)
    full = min(t["steps"] for t in completed)
    assert full == 24
    for t in table.values():
        if lr[t["id"]] in (TOO_SMALL, TOO_LARGE):  # behind at the first rung (or diverged): cut early
            assert t["state"] == "stopped" and t["steps"] < full, t
    best = search["best"]
    assert manifest["trial"] == best["id"] and best["objective"] == min(t["objective"] for t in completed)
    assert manifest["valLoss"] == pytest.approx(best["objective"])
    # the chosen trial's model, metrics and checkpoints are the train stage's
    run = Path(ctx.run_dir)
    assert (run / "train" / "model" / "adapter_model.safetensors").read_bytes() == \
        (run / "train" / "trials" / best["id"] / "model" / "adapter_model.safetensors").read_bytes()
    assert manifest["checkpoints"] and all(c.startswith(f"trials/{best['id']}/") for c in manifest["checkpoints"])
    # progress carried the search while it ran
    docs = [d for d in seen if d.get("search")]
    assert docs and docs[-1]["search"]["completed"] == search["completed"]
    assert all(d["step"] <= d["totalSteps"] for d in docs if d.get("totalSteps"))

    stage(ctx, "evaluate", run_evaluate)
    result = json.loads((run / "evaluate" / "result.json").read_text())
    assert result["metrics"]["loss"] < result["metrics"]["baseLoss"]
    assert result["search"]["best"]["id"] == best["id"] and len(result["search"]["table"]) == 6
    html = (run / "evaluate" / "report.html").read_text()
    assert "<h2>Search</h2>" in html and f"{best['id']} ★" in html
    assert "hyperparameter search" in (run / "evaluate" / "README.md").read_text()


_DRIVER = """
import sys
from tailor_trainer.config import TrainerConfig
from tailor_trainer.stages import StageContext
from tailor_trainer.stages.train import run_train
cfg = TrainerConfig.model_validate_json(open(sys.argv[1]).read())
run_train(StageContext(config=cfg, run_dir=sys.argv[2], config_hash=cfg.config_hash(), model_dir=sys.argv[3]))
"""


@pytest.mark.slow
def test_a_killed_search_resumes_without_training_finished_trials_again(prepared, tmp_path):
    search = {**SEARCH, "trials": 3, "concurrentTrials": 1, "scheduler": "fifo"}
    run = tmp_path / "run"
    ctx, _ = context(prepared, run, search, maxSteps=12, checkpointEverySteps=2)
    (tmp_path / "config.json").write_text(ctx.config.model_dump_json(by_alias=True))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), str(REPO / "operator")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path / "config.json"), str(run),
                               str(prepared["model"])], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = run / "train" / "trials"
    try:
        deadline = time.monotonic() + 240
        while not list(trials.glob("*/outcome.json")) and time.monotonic() < deadline:
            assert driver.poll() is None, "the search ended before it could be killed"
            time.sleep(0.2)
        time.sleep(4)  # Tune saves its experiment state every 2 s (search.py)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    finished = {p.parent.name: (p.read_bytes(), (p.parent / "metrics.jsonl").read_bytes(),
                                (p.parent / "model" / "adapter_model.safetensors").stat().st_mtime_ns)
                for p in trials.glob("*/outcome.json")}
    assert finished and len(finished) < 3
    assert not (run / "train" / "manifest.json").exists()

    ctx, seen = context(prepared, run, search, maxSteps=12, checkpointEverySteps=2)
    manifest = run_train(ctx)
    assert max(d["search"]["running"] for d in seen if d.get("search")) <= 1  # concurrentTrials
    table = {t["id"]: t for t in manifest["search"]["table"]}
    assert sorted(table) == ["t00", "t01", "t02"] and all(t["state"] == "completed" for t in table.values())
    for tid, (outcome, metrics, mtime) in finished.items():  # not trained (nor saved) again
        d = trials / tid
        assert (d / "outcome.json").read_bytes() == outcome and (d / "metrics.jsonl").read_bytes() == metrics
        assert (d / "model" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert len(list((run / "train" / "tune" / "search").glob("run_trial_*"))) == 3  # restored, no new trials


def test_a_config_without_search_hashes_and_trains_as_before(prepared, tmp_path):
    ctx, _ = context(prepared, tmp_path / "run", maxSteps=2)
    cfg = ctx.config
    legacy = cfg.model_dump(by_alias=True, mode="json", exclude={"run", "progress", "champion", "output_uri"})
    assert legacy.pop("search") is None  # the field the hash of a search-less config leaves out
    for lever in ("fusedLoss", "compile", "attention"):  # speed levers: hashed as before they existed
        legacy["hyperparameters"].pop(lever)
    assert cfg.config_hash() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    searching = TrainerConfig.model_validate(body(tmp_path, prepared["model"], prepared["data"], SEARCH))
    assert searching.config_hash() != cfg.config_hash()
    # a trial trains (and checkpoints) under the hash of the plain config with its values
    trial, total = trial_config(searching, {"learningRate": GOOD, "lora.r": 8}, 42)
    plain_body = body(tmp_path, prepared["model"], prepared["data"], learningRate=GOOD)
    plain_body["adaptation"]["lora"]["r"] = 8
    plain = TrainerConfig.model_validate(plain_body)
    assert trial.search is None and trial.config_hash() == plain.config_hash()
    assert total == planned_steps(plain.hyperparameters, 42) == 24
    capped, total = trial_config(searching.model_copy(update={"search": searching.search.model_copy(
        update={"max_trial_steps": 10})}), {"learningRate": GOOD}, 42)
    assert total == 10 and capped.hyperparameters.max_steps == 10

    manifest = run_train(ctx)
    assert "search" not in manifest and manifest["steps"] == 2
    assert not (tmp_path / "run" / "train" / "trials").exists()
    assert not (tmp_path / "run" / "train" / "tune").exists()
