"""evaluate: held-out metrics for the fine-tuned and the base model, exact match by greedy
generation, samples and worst examples, the champion on the same rows, k-fold cross-validation
on Ray, gates that fail the run, and the files people read (result.json, report.html, loss.png,
model card). Real models: one short LoRA training in this module's fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.train")

from tailor_trainer.config import TrainerConfig  # noqa: E402
from tailor_trainer.pipeline import main_run  # noqa: E402
from tailor_trainer.stages import GateFailed, StageContext  # noqa: E402
from tailor_trainer.stages.adapt import run_adapt  # noqa: E402
from tailor_trainer.stages.evaluate import run_evaluate  # noqa: E402
from tailor_trainer.stages.prep import run_prep  # noqa: E402
from tailor_trainer.stages.train import run_train  # noqa: E402

WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "ember"]


def _data(path, n: int, answer=None) -> str:
    with open(path, "w") as f:
        for i in range(n):
            a = WORDS[i % len(WORDS)]
            f.write(json.dumps({"prompt": f"say {a} {i}:", "completion": answer or f" {a}"}) + "\n")
    return str(path)


def _config(run_dir, model_dir, data, method: dict, hyper: dict, evaluation: dict, **extra) -> dict:
    return {
        "run": {"job": "ev", "name": "ev-r1"}, "model": {"uri": str(model_dir)},
        "dataset": {"name": "words", "revision": "rev-1", "source": {"uri": data}, "schema": "completion",
                    "split": {"validation": 0.15, "test": 0.2}},
        "adaptation": method,
        "hyperparameters": {"batchSize": 8, "maxSeqLength": 64, "checkpointEverySteps": 100, **hyper},
        "evaluation": evaluation, "outputUri": str(run_dir), **extra,
    }


def _ctx(body: dict, model_dir) -> StageContext:
    cfg = TrainerConfig.model_validate(body)
    return StageContext(config=cfg, run_dir=body["outputUri"], config_hash=cfg.config_hash(),
                        model_dir=str(model_dir))


def _train(ctx: StageContext) -> None:
    """prep, adapt, train, with manifests as the pipeline writes them."""
    for name, stage in (("prep", lambda: run_prep(ctx.config, ctx.run_dir)),
                        ("adapt", lambda: run_adapt(ctx)), ("train", lambda: run_train(ctx))):
        body = {**stage(), "stage": name, "configHash": ctx.config_hash}
        (Path(ctx.run_dir) / name / "manifest.json").write_text(json.dumps(body))


EVALUATION = {"metrics": ["loss", "perplexity", "accuracy", "exactMatch"], "maxNewTokens": 6,
              "samplePrompts": ["say tiger 1000:", "say ocean 1001:"], "worstExamples": 3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("evaluate")
    body = _config(root / "run", tiny_model_dir, _data(root / "data.jsonl", 80),
                   {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                               "targetModules": ["q_proj", "v_proj", "up_proj", "down_proj"]}},
                   {"learningRate": 2e-2, "maxSteps": 25, "warmupRatio": 0.1}, EVALUATION)
    ctx = _ctx(body, tiny_model_dir)
    _train(ctx)
    return {"body": body, "root": root, "model": tiny_model_dir}


def _copy(trained, dest):
    shutil.copytree(trained["root"] / "run", dest)
    body = json.loads(json.dumps(trained["body"]))
    body["outputUri"] = str(dest)
    return body


def test_metrics_base_vs_tuned_and_the_files_people_read(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    body = _copy(trained, tmp_path / "run")
    manifest = run_evaluate(_ctx(body, trained["model"]))
    ev = tmp_path / "run" / "evaluate"
    result = json.loads((ev / "result.json").read_text())
    m = result["metrics"]
    for key in ("loss", "perplexity", "accuracy", "exactMatch", "baseLoss", "basePerplexity",
                "baseAccuracy", "baseExactMatch", "trainLoss"):
        assert key in m, key
    assert m["loss"] < m["baseLoss"] - 0.5  # it learned something the base model does not know
    assert m["accuracy"] > m["baseAccuracy"]
    assert m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-6)
    assert 0.0 <= m["exactMatch"] <= 1.0
    assert manifest["metrics"] == m
    assert result["datasetRevision"] == "rev-1" and result["configHash"] == _ctx(body, trained["model"]).config_hash
    assert result["evaluatedOn"]["split"] == "test" and result["evaluatedOn"]["rows"] > 0
    assert result["artifacts"]["model"] == f"{tmp_path / 'run'}/train/model"
    assert result["trainableParameters"] > 0 and result["steps"] == 25

    samples = json.loads((ev / "samples.json").read_text())
    assert [s["prompt"] for s in samples["prompts"]] == EVALUATION["samplePrompts"]
    assert all(isinstance(s["before"], str) and isinstance(s["after"], str) for s in samples["prompts"])
    worst = samples["worst"]
    assert len(worst) == 3 and worst[0]["loss"] >= worst[1]["loss"] >= worst[2]["loss"]
    assert all({"prompt", "reference", "output"} <= set(w) for w in worst)

    assert (ev / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (ev / "report.html").read_text()
    for part in ("data:image/png;base64,", "Metrics", "Samples: before and after", "Hardest held-out",
                 "Lineage", "say tiger 1000:", "rev-1"):
        assert part in html, part
    card = (ev / "README.md").read_text()
    assert "base_model:" in card and result["configHash"] in card and "rev-1" in card
    assert (tmp_path / "run" / "train" / "model" / "README.md").read_text() == card

    # The adapter reloads with plain PEFT and generates.
    base = AutoModelForCausalLM.from_pretrained(str(trained["model"]))
    model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "train" / "model")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "train" / "model"))
    ids = tok("say tiger 1000:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_exact_match_by_greedy_generation(tmp_path, tiny_model_dir):
    # Every answer is the same word: a few full fine-tuning steps teach it, greedy decoding says it.
    body = _config(tmp_path / "run", tiny_model_dir, _data(tmp_path / "d.jsonl", 40, answer=" yes"),
                   {"method": "full"}, {"learningRate": 1e-2, "maxSteps": 30},
                   {"metrics": ["loss", "exactMatch"], "maxNewTokens": 3, "compareToBase": False,
                    "worstExamples": 0})
    ctx = _ctx(body, tiny_model_dir)
    _train(ctx)
    run_evaluate(ctx)
    m = json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())["metrics"]
    assert m["exactMatch"] == 1.0 and "baseLoss" not in m


def test_champion_is_measured_on_the_same_rows(trained, tmp_path):
    body = _copy(trained, tmp_path / "run")
    body["champion"] = {"run": "ev-r0", "modelUri": str(trained["root"] / "run" / "train" / "model"),
                        "metrics": {"loss": 1.0}}
    body["evaluation"] = {**body["evaluation"], "metrics": ["loss", "accuracy"], "samplePrompts": [],
                          "compareToBase": False}
    run_evaluate(_ctx(body, trained["model"]))
    result = json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())
    champ = result["champion"]
    assert champ["run"] == "ev-r0" and champ["promotedMetrics"] == {"loss": 1.0}
    # Same model, same rows: the same numbers.
    assert champ["metrics"]["loss"] == pytest.approx(result["metrics"]["loss"], rel=1e-6)
    assert champ["metrics"]["accuracy"] == pytest.approx(result["metrics"]["accuracy"])


def test_missed_gate_fails_the_run_with_metric_and_threshold(trained, tmp_path):
    body = _copy(trained, tmp_path / "run")
    body["evaluation"] = {**body["evaluation"], "samplePrompts": [], "gates": [
        {"metric": "accuracy", "min": 0.0}, {"metric": "loss", "max": 0.01}]}
    body["progress"] = {"file": str(tmp_path / "progress.json")}
    with pytest.raises(GateFailed, match=r"gate failed: loss = [0-9.]+, required <= 0\.01 \(max\)"):
        run_evaluate(_ctx(body, trained["model"]))
    # Through the pipeline: the run fails, the reason and field reach the progress document,
    # and the report still shows why.
    (tmp_path / "config.json").write_text(json.dumps(body))
    assert main_run(str(tmp_path / "config.json"), stages="evaluate") == 1
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["state"] == "Failed"
    assert progress["error"]["reason"] == "GateFailed"
    assert "loss" in progress["error"]["message"] and "0.01" in progress["error"]["message"]
    assert progress["error"]["field"] == "spec.evaluation.gates[1]"
    result = json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())
    assert [g["passed"] for g in result["gates"]] == [True, False]
    assert "gates failed" in (tmp_path / "run" / "evaluate" / "report.html").read_text()
    assert not (tmp_path / "run" / "evaluate" / "manifest.json").exists()


@pytest.mark.slow
def test_cross_validation_folds_run_in_parallel_on_ray(trained, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    body = _copy(trained, tmp_path / "run")
    body["hyperparameters"] = {**body["hyperparameters"], "maxSteps": 3}
    body["evaluation"] = {"metrics": ["loss"], "compareToBase": False, "worstExamples": 0,
                          "crossValidation": {"folds": 2}}
    run_evaluate(_ctx(body, trained["model"]))
    result = json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())
    folds = json.loads((tmp_path / "run" / "evaluate" / "samples.json").read_text())["crossValidation"]
    assert sorted(f["fold"] for f in folds) == [0, 1]
    assert all(f["loss"] > 0 and f["heldOutRows"] > 0 and f["steps"] == 3 for f in folds)
    losses = [f["loss"] for f in folds]
    assert result["metrics"]["cvLossMean"] == pytest.approx(sum(losses) / 2)
    assert result["metrics"]["cvLossStd"] == pytest.approx(abs(losses[0] - losses[1]) / 2)
