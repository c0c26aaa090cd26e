"""The evaluate stage on a fixed evaluation set, and significance on real models: two runs that
differ only by their seed, each scoring the other as its champion on the same fixed rows. The
better-looking one would be promoted on its point estimate, and is not with `confidence` set.
Real tiny Llama, real LoRA training (a few seconds each), the operator's own decision function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.train")

from tailor_operator.api.v1alpha1 import ChampionStatus, Promotion  # noqa: E402
from tailor_operator.reconcile.promotion import decide_run  # noqa: E402
from tailor_trainer.config import TrainerConfig  # noqa: E402
from tailor_trainer.contract import RunResult  # noqa: E402
from tailor_trainer.evalset import EvalSetChanged  # noqa: E402
from tailor_trainer.stages import StageContext  # noqa: E402
from tailor_trainer.stages.adapt import run_adapt  # noqa: E402
from tailor_trainer.stages.evaluate import run_evaluate  # noqa: E402
from tailor_trainer.stages.prep import run_prep  # noqa: E402
from tailor_trainer.stages.train import run_train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "examples" / "data" / "support-instructions.jsonl"
MODEL = REPO / "examples" / "models" / "tailor-tiny-llama"  # pretrained on this kind of text


def _body(root: Path, model: Path, seed: int, eval_uri: str) -> dict:
    return {
        "run": {"job": "fx", "name": f"fx-s{seed}"}, "model": {"uri": str(model)},
        "dataset": {"name": "support", "revision": "rev-1", "source": {"uri": str(root / "train.jsonl")},
                    "schema": "instruction", "split": {"validation": 0.05, "test": 0.05}},
        "adaptation": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                  "targetModules": ["q_proj", "v_proj"]}},
        "hyperparameters": {"batchSize": 8, "maxSeqLength": 128, "maxSteps": 12, "learningRate": 3e-3,
                            "checkpointEverySteps": 100, "evalEverySteps": 100, "seed": seed},
        "evaluation": {"metrics": ["loss", "accuracy"], "compareToBase": False, "worstExamples": 0,
                       "datasetRef": {"name": "support-eval"}},
        "evalDataset": {"name": "support-eval", "revision": "eval-1", "source": {"uri": eval_uri},
                        "schema": "instruction", "split": {"validation": 0.1, "test": 0.1}},
        "comparison": {"metric": "loss", "confidence": 0.95},
        "outputUri": str(root / f"run-s{seed}"),
    }


def _ctx(body: dict, model: Path) -> StageContext:
    cfg = TrainerConfig.model_validate(body)
    return StageContext(config=cfg, run_dir=body["outputUri"], config_hash=cfg.config_hash(), model_dir=str(model))


def _train(ctx: StageContext) -> None:
    for name, stage in (("prep", lambda: run_prep(ctx.config, ctx.run_dir)),
                        ("adapt", lambda: run_adapt(ctx)), ("train", lambda: run_train(ctx))):
        body = {**stage(), "stage": name, "configHash": ctx.config_hash}
        (Path(ctx.run_dir) / name / "manifest.json").write_text(json.dumps(body))


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    if not (MODEL / "config.json").is_file():
        pytest.skip("examples/models/tailor-tiny-llama is not in this checkout")
    tiny_model_dir = MODEL
    root = tmp_path_factory.mktemp("fixed-set")
    lines = SUPPORT.read_text().splitlines(keepends=True)
    (root / "train.jsonl").write_text("".join(lines[:240]))
    (root / "eval.jsonl").write_text("".join(lines[1900:1960]))  # never trained on
    bodies = {s: _body(root, tiny_model_dir, s, str(root / "eval.jsonl")) for s in (1, 2)}
    for body in bodies.values():
        _train(_ctx(body, tiny_model_dir))
    results = {}
    for seed, other in ((1, 2), (2, 1)):  # each scores the other as its champion
        body = dict(bodies[seed], champion={"run": f"fx-s{other}",
                                            "modelUri": f"{bodies[other]['outputUri']}/train/model"})
        run_evaluate(_ctx(body, tiny_model_dir))
        results[seed] = json.loads((Path(body["outputUri"]) / "evaluate" / "result.json").read_text())
    return {"root": root, "bodies": bodies, "results": results, "model": tiny_model_dir}


def test_every_model_is_scored_on_the_fixed_set(two_seeds) -> None:
    r1, r2 = two_seeds["results"][1], two_seeds["results"][2]
    on = r1["evaluatedOn"]
    assert on["dataset"] == "support-eval" and on["revision"] == "eval-1" and on["rows"] >= 30
    assert r2["evaluatedOn"] == on  # the same rows whatever the run
    # the champion re-scored by the other run equals that model's own score: same rows, same metric
    assert r1["champion"]["metrics"]["loss"] == pytest.approx(r2["metrics"]["loss"], rel=1e-5)
    assert r2["champion"]["metrics"]["loss"] == pytest.approx(r1["metrics"]["loss"], rel=1e-5)
    c1, c2 = r1["comparison"], r2["comparison"]
    assert c1["against"] == "fx-s2" and c2["against"] == "fx-s1" and c1["rows"] == on["rows"]
    assert c1["improvement"] == pytest.approx(r2["metrics"]["loss"] - r1["metrics"]["loss"], abs=1e-6)
    assert c1["improvement"] == pytest.approx(-c2["improvement"], abs=1e-6)
    html = (Path(two_seeds["bodies"][1]["outputUri"]) / "evaluate" / "report.html").read_text()
    assert "Compared with champion fx-s2" in html and "evaluation Dataset support-eval" in html


def test_a_seed_only_difference_is_promoted_on_its_point_estimate_but_not_with_confidence(two_seeds) -> None:
    results = two_seeds["results"]
    # the run that looks better than the other (one of the two does, unless they tie exactly)
    seed = 1 if results[1]["comparison"]["improvement"] > 0 else 2
    other = 3 - seed
    result = RunResult.read(results[seed])
    champion = ChampionStatus(run=f"fx-s{other}", model="m", metrics=results[other]["metrics"])
    looks_better = decide_run(Promotion(), result.metrics, champion, result)
    assert (looks_better.promote, looks_better.reason) == (True, "Improved"), looks_better.message
    sure = decide_run(Promotion(confidence=0.95), result.metrics, champion, result)
    assert (sure.promote, sure.reason) == (False, "NotSignificant"), sure.message
    c = results[seed]["comparison"]
    assert c["low"] <= 0 < c["improvement"] < c["high"], c


def test_a_changed_evaluation_set_fails_the_run(two_seeds, tmp_path) -> None:
    body = dict(two_seeds["bodies"][1], outputUri=str(tmp_path / "run"))
    import shutil

    shutil.copytree(two_seeds["bodies"][1]["outputUri"], tmp_path / "run")
    body["evalDataset"] = {**body["evalDataset"], "contentFingerprint": "0000000000000000"}
    with pytest.raises(EvalSetChanged) as e:
        run_evaluate(_ctx(body, two_seeds["model"]))
    assert e.value.field == "spec.evaluation.datasetRef" and e.value.reason == "DatasetChanged"
    assert "support-eval" in e.value.message
