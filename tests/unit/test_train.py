"""train: real torch/transformers/PEFT and Ray Train on the tiny Llama fixture.

Seeded runs repeat exactly; frozen weights stay bit-identical; checkpoints are complete or
absent, pruned to the newest K, and a rerun resumes from the newest one and continues exactly
where the lost run would have gone; a NaN loss stops the run as Diverged; packed rows attend only
within their own document; two CPU workers train with DDP (gloo) on a real local Ray.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.train")

from tailor_trainer.config import TrainerConfig  # noqa: E402
from tailor_trainer.stages import Diverged, StageContext  # noqa: E402
from tailor_trainer.stages.prep import run_prep  # noqa: E402
from tailor_trainer.batches import collate, epoch_order, token_losses  # noqa: E402
from tailor_trainer.checkpoints import list_checkpoints, write_checkpoint  # noqa: E402
from tailor_trainer.stages.train import run_train  # noqa: E402

WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "ember", "pearl", "cedar",
         "lotus", "comet"]


def write_completion_data(path, n: int = 60) -> str:
    """Short prompt/completion rows a tiny model can learn: repeat the word after the colon."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = WORDS[i % len(WORDS)], WORDS[(i * 5 + 3) % len(WORDS)]
            f.write(json.dumps({"prompt": f"say {a} {b} {i}:", "completion": f" {a} {b}"}) + "\n")
    return str(path)


def make_config(run_dir, model_dir, data, **sections) -> TrainerConfig:
    body = {
        "run": {"job": "unit", "name": "unit-r1"}, "model": {"uri": str(model_dir)},
        "dataset": {"name": "words", "source": {"uri": data}, "schema": "completion",
                    "split": {"validation": 0.15, "test": 0.15}},
        "adaptation": {"method": "lora", "lora": {"r": 4, "dropout": 0.1}},
        "hyperparameters": {"learningRate": 5e-3, "batchSize": 4, "maxSteps": 6, "maxSeqLength": 64,
                            "checkpointEverySteps": 2, "checkpointsToKeep": 2},
        "outputUri": str(run_dir),
    }
    for key, value in sections.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainerConfig.model_validate(body)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    """One prep (completion rows), copied into each test's run directory."""
    root = tmp_path_factory.mktemp("prepared")
    data = write_completion_data(root / "data.jsonl")
    cfg = make_config(root / "run", tiny_model_dir, data)
    run_prep(cfg, str(root / "run"))
    return {"run": root / "run", "data": data, "model": tiny_model_dir}


def new_run(prepared, run_dir, **sections):
    cfg = make_config(run_dir, prepared["model"], prepared["data"], **sections)
    if not (run_dir / "prep").exists():
        shutil.copytree(prepared["run"] / "prep", run_dir / "prep")
    seen: list[dict] = []
    ctx = StageContext(config=cfg, run_dir=str(run_dir), config_hash=cfg.config_hash(),
                       progress=lambda **kw: seen.append(kw), model_dir=str(prepared["model"]))
    return ctx, seen


def losses(run_dir) -> list[tuple[int, float]]:
    lines = (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
    return [(d["step"], d["loss"]) for d in map(json.loads, lines) if "loss" in d]


# ---------------------------------------------------------------------------------------------
# Pieces


def test_packed_rows_attend_only_within_their_document(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    a, b = [1, 20, 21, 22, 23, 24], [1, 30, 31, 32, 33]
    alone = collate([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}], 0, "cpu")
    packed_labels = a + [-100] + b[1:]
    packed = collate([{"input_ids": a + b, "labels": packed_labels,
                       "position_ids": list(range(len(a))) + list(range(len(b)))}], 0, "cpu")
    with torch.no_grad():
        sep, _ = token_losses(model, alone, torch.autocast("cpu", enabled=False))
        pk, _ = token_losses(model, packed, torch.autocast("cpu", enabled=False))
    # Document b inside the pack predicts its tokens exactly as b alone does.
    assert torch.allclose(pk[0, len(a):], sep[1, : len(b) - 1], atol=1e-5)
    assert torch.allclose(pk[0, : len(a) - 1], sep[0, : len(a) - 1], atol=1e-5)


def test_epoch_order_shards_every_row_once_per_epoch():
    orders = [epoch_order(10, 0, 7, 3, r) for r in range(3)]
    assert all(len(o) == 4 for o in orders)  # padded to the same count on every rank
    assert set().union(*map(set, orders)) == set(range(10))
    assert epoch_order(10, 0, 7, 1, 0) == epoch_order(10, 0, 7, 1, 0)
    assert epoch_order(10, 0, 7, 1, 0) != epoch_order(10, 1, 7, 1, 0)


def test_checkpoint_write_is_atomic_and_keeps_the_newest(tmp_path):
    root = str(tmp_path / "ckpt")
    for step in (2, 4, 6):
        write_checkpoint(root, step, {"x.txt": lambda p: open(p, "w").write("x")},
                         {"configHash": "h"}, keep=2)
    os.makedirs(os.path.join(root, "step-8"))  # a crash before the rename would leave no step-8 …
    os.makedirs(os.path.join(root, ".tmp-step-8-abcd"))  # … only a temporary directory like this
    assert [s for s, _ in list_checkpoints(root, "h")] == [4, 6]
    assert list_checkpoints(root, "other") == []
    manifest = json.loads((tmp_path / "ckpt" / "step-6" / "manifest.json").read_text())
    assert manifest["step"] == 6 and list(manifest["files"]) == ["x.txt"]
    assert manifest["files"]["x.txt"]["size"] == 1  # and its sha256: tests/unit/test_checkpoint_integrity.py


# ---------------------------------------------------------------------------------------------
# The stage (Ray Train local mode: one worker, no cluster)


@pytest.mark.slow
def test_seeded_run_repeats_exactly(prepared, tmp_path):
    first, seen = new_run(prepared, tmp_path / "a")
    out = run_train(first)
    second, _ = new_run(prepared, tmp_path / "b")
    run_train(second)
    assert out["steps"] == 6 and out["status"] == "completed" and out["mode"] == "local"
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "a")) == 6
    # Progress went through the callback: stage, step, loss, tokens/s, ETA.
    last = [s for s in seen if s.get("step") == 6][-1]
    assert last["stage"] == "train" and last["totalSteps"] == 6
    assert last["loss"] is not None and last["tokensPerSecond"] > 0 and last["etaSeconds"] == 0
    # The adapter is a PEFT directory.
    assert (tmp_path / "a" / "train" / "model" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_frozen_weights_stay_bit_identical(prepared, tmp_path):
    from transformers import AutoModelForCausalLM

    ctx, _ = new_run(prepared, tmp_path, adaptation={"method": "freeze", "lora": None, "freeze": {"firstLayers": 1}},
                     hyperparameters={"learningRate": 1e-2, "maxSteps": 3})
    run_train(ctx)
    base = dict(AutoModelForCausalLM.from_pretrained(str(prepared["model"])).named_parameters())
    tuned = dict(AutoModelForCausalLM.from_pretrained(str(tmp_path / "train" / "model")).named_parameters())
    frozen = [n for n in base if n.startswith("model.layers.0.") or n == "model.embed_tokens.weight"]
    trained = [n for n in base if n not in frozen]
    assert frozen and all(torch.equal(base[n], tuned[n]) for n in frozen)
    assert all(not torch.equal(base[n], tuned[n]) for n in trained)


def test_merged_model_equals_base_plus_adapter(prepared, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ctx, _ = new_run(prepared, tmp_path, mergedModel=True,
                     hyperparameters={"maxSteps": 2, "learningRate": 5e-2})
    out = run_train(ctx)
    assert out["mergedModel"] == "merged"
    ids = torch.randint(5, 300, (2, 10))
    base = AutoModelForCausalLM.from_pretrained(str(prepared["model"]))
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "train" / "model")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "train" / "merged")).eval()
    with torch.no_grad():
        assert torch.allclose(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
    assert (tmp_path / "train" / "merged" / "tokenizer_config.json").exists()


@pytest.mark.slow
def test_resume_continues_from_the_last_complete_checkpoint(prepared, tmp_path):
    straight, _ = new_run(prepared, tmp_path / "straight")
    run_train(straight)
    reference = losses(tmp_path / "straight")

    ctx, _ = new_run(prepared, tmp_path / "crashed")
    run_train(ctx)
    train = tmp_path / "crashed" / "train"
    # Make it look like the run died just after checkpoint 4: nothing after it survived.
    shutil.rmtree(train / "checkpoints" / "step-6")
    shutil.rmtree(train / "model")
    (train / "checkpoints" / ".tmp-step-6-dead").mkdir()
    out = run_train(ctx)
    assert out["resumedFrom"] == 4 and out["steps"] == 6
    assert [s for s, _ in losses(tmp_path / "crashed")] == [1, 2, 3, 4, 5, 6]
    # Optimizer, scheduler, data position and RNG (LoRA dropout) were restored: same losses.
    assert [v for _, v in losses(tmp_path / "crashed")] == pytest.approx([v for _, v in reference], rel=1e-6)
    assert not (train / "checkpoints" / ".tmp-step-6-dead").exists()
    assert sorted(p.name for p in (train / "checkpoints").iterdir()) == ["step-4", "step-6"]


@pytest.mark.slow
def test_early_stopping_on_a_validation_plateau(prepared, tmp_path):
    ctx, _ = new_run(prepared, tmp_path, hyperparameters={
        "learningRate": 1e-9, "maxSteps": 20, "evalEverySteps": 1, "earlyStopping": {"patience": 2, "minDelta": 1e-4}})
    out = run_train(ctx)
    assert out["status"] == "earlyStopped" and out["steps"] == 3 and out["bestStep"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("adaptation", [{}, {"method": "full", "lora": None}])
def test_gradient_checkpointing_changes_memory_not_results(prepared, tmp_path, monkeypatch, adaptation):
    """Same losses and weights with and without recomputation (LoRA dropout included: the RNG is
    replayed), and the model really runs with checkpointing on."""
    from safetensors.torch import load_file

    from tailor_trainer import adaptation as adapt_module

    seen = []
    original = adapt_module.build_trainable

    def spy(*args, **kwargs):
        model, plan = original(*args, **kwargs)
        seen.append(model)
        return model, plan

    monkeypatch.setattr(adapt_module, "build_trainable", spy)  # fit() imports it at call time
    out = {}
    for flag in (False, True):
        run = tmp_path / str(flag)
        ctx, _ = new_run(prepared, run, adaptation=adaptation,
                         hyperparameters={"maxSteps": 3, "gradientCheckpointing": flag})
        run_train(ctx)
        inner = seen[-1].get_base_model() if hasattr(seen[-1], "get_base_model") else seen[-1]
        assert inner.is_gradient_checkpointing is flag
        out[flag] = (losses(run), load_file(str(run / "train" / "checkpoints" / "step-3" / "trainable.safetensors")))
    assert [v for _, v in out[True][0]] == pytest.approx([v for _, v in out[False][0]], rel=1e-6)
    assert all(torch.allclose(out[True][1][k], out[False][1][k], atol=1e-6) for k in out[False][1])


@pytest.mark.slow
def test_early_stopping_keeps_the_best_weights_across_a_resume(prepared, tmp_path):
    """Best at step 1, stopped at step 3; a run that died after its step-2 checkpoint and resumed
    must still end with the step-1 weights (they travel in the checkpoint), bit for bit."""
    from safetensors.torch import load_file

    es = {"learningRate": 1e-9, "maxSteps": 20, "evalEverySteps": 1, "checkpointEverySteps": 1,
          "earlyStopping": {"patience": 2, "minDelta": 1e-4}}
    straight, _ = new_run(prepared, tmp_path / "straight", hyperparameters=es)
    assert run_train(straight)["bestStep"] == 1
    ctx, _ = new_run(prepared, tmp_path / "crashed", hyperparameters=es)
    run_train(ctx)
    train = tmp_path / "crashed" / "train"
    assert (train / "checkpoints" / "step-2" / "best.safetensors").exists()
    shutil.rmtree(train / "checkpoints" / "step-3")
    shutil.rmtree(train / "model")
    out = run_train(ctx)
    assert out["resumedFrom"] == 2 and out["status"] == "earlyStopped" and out["bestStep"] == 1
    want = load_file(str(tmp_path / "straight" / "train" / "model" / "adapter_model.safetensors"))
    got = load_file(str(train / "model" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    last = load_file(str(train / "checkpoints" / "step-3" / "trainable.safetensors"))
    last = {k.replace(".default.", "."): t for k, t in last.items()}  # PEFT drops the adapter name
    assert last.keys() == got.keys()
    assert any(not torch.equal(last[k], got[k]) for k in got), "step 3 must differ from step 1 for this test"


@pytest.mark.slow
def test_diverging_run_stops_as_diverged(prepared, tmp_path):
    # fp16 activations with a huge learning rate overflow within a few steps.
    ctx, _ = new_run(prepared, tmp_path, adaptation={"method": "full", "lora": None},
                     hyperparameters={"learningRate": 1.0, "precision": "fp16", "scheduler": "constant",
                                      "maxSteps": 30, "maxGradNorm": 1000.0})
    with pytest.raises(Diverged, match=r"training loss became (nan|inf) at step \d+") as err:
        run_train(ctx)
    assert err.value.field == "spec.hyperparameters.learningRate"
    assert not (tmp_path / "train" / "model").exists()


@pytest.mark.slow
def test_two_cpu_workers_train_with_ddp(prepared, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ctx, seen = new_run(prepared, tmp_path, resources={"workers": 2, "cpusPerWorker": 1},
                        hyperparameters={"maxSteps": 4, "checkpointEverySteps": 4})
    out = run_train(ctx)
    assert out["mode"] == "workers" and out["worldSize"] == 2 and out["steps"] == 4
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]
    assert [s for s, _ in list_checkpoints(str(tmp_path / "train" / "checkpoints"))] == [4]
    assert (tmp_path / "train" / "model" / "adapter_model.safetensors").exists()
    # Rank 0's progress reached the driver through the relay actor.
    assert any(s.get("stage") == "train" and s.get("step") for s in seen)


@pytest.mark.slow
def test_two_cpu_workers_train_with_fsdp_like_ddp_and_resume(prepared, tmp_path, monkeypatch):
    """resources.strategy fsdp (FSDP2 over gloo), full fine-tuning: the same losses as DDP on the
    same data (the gradients are the same average), checkpoints hold full tensors equal to DDP's,
    a run that lost its last checkpoint resumes from the one before and ends where an
    uninterrupted run ends, and the saved model is a plain unsharded one. (Each 2-worker run
    costs about a minute here, so LoRA gets the lighter test below.)"""
    from safetensors.torch import load_file

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    adaptation = {"method": "full", "lora": None}
    hp = {"maxSteps": 4, "checkpointEverySteps": 2, "learningRate": 1e-3}
    ddp, _ = new_run(prepared, tmp_path / "ddp", resources={"workers": 2, "cpusPerWorker": 1},
                     adaptation=adaptation, hyperparameters=hp)
    run_train(ddp)
    fsdp, _ = new_run(prepared, tmp_path / "fsdp", resources={"workers": 2, "cpusPerWorker": 1, "strategy": "fsdp"},
                      adaptation=adaptation, hyperparameters=hp)
    out = run_train(fsdp)
    assert out["worldSize"] == 2 and out["steps"] == 4
    assert [v for _, v in losses(tmp_path / "fsdp")] == pytest.approx([v for _, v in losses(tmp_path / "ddp")],
                                                                       rel=1e-4)
    train = tmp_path / "fsdp" / "train"
    ckpt = load_file(str(train / "checkpoints" / "step-4" / "trainable.safetensors"))
    ddp_ckpt = load_file(str(tmp_path / "ddp" / "train" / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert ckpt.keys() == ddp_ckpt.keys()
    assert all(ckpt[k].shape == ddp_ckpt[k].shape for k in ckpt)  # full tensors, not shards
    assert all(torch.allclose(ckpt[k], ddp_ckpt[k], atol=1e-5) for k in ckpt)
    assert (train / "model" / "model.safetensors").exists()

    # lose the step-4 checkpoint and the model: the rerun resumes at step 2 and ends the same
    reference = losses(tmp_path / "fsdp")
    shutil.rmtree(train / "checkpoints" / "step-4")
    shutil.rmtree(train / "model")
    again = run_train(fsdp)
    assert again["resumedFrom"] == 2 and again["steps"] == 4
    assert [v for _, v in losses(tmp_path / "fsdp")] == pytest.approx([v for _, v in reference], rel=1e-5)
    resumed = load_file(str(train / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert all(torch.allclose(resumed[k], ckpt[k], atol=1e-6) for k in ckpt)


@pytest.mark.slow
def test_lora_under_fsdp_saves_a_plain_adapter(prepared, tmp_path, monkeypatch):
    """LoRA on a sharded frozen base: the loss falls, the checkpoint holds the full adapter
    tensors, and the saved adapter reloads with plain PEFT."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ctx, _ = new_run(prepared, tmp_path, resources={"workers": 2, "cpusPerWorker": 1, "strategy": "fsdp"},
                     hyperparameters={"maxSteps": 6, "checkpointEverySteps": 6})
    out = run_train(ctx)
    assert out["worldSize"] == 2 and out["steps"] == 6 and out["status"] == "completed"
    values = [v for _, v in losses(tmp_path)]
    assert values[-1] < values[0]
    ckpt = load_file(str(tmp_path / "train" / "checkpoints" / "step-6" / "trainable.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)
    assert all(t.shape[0] == 4 or t.shape[1] == 4 for t in ckpt.values())  # r=4: whole A/B matrices
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(prepared["model"])),
                                      str(tmp_path / "train" / "model"))
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert saved.keys() == ckpt.keys() and all(torch.equal(saved[k], ckpt[k]) for k in ckpt)
