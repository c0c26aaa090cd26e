"""Speed levers of the train stage keep the numerics (issue 14), on the CPU with the tiny Llama.

- fusedLoss chunked: the same loss and gradients as the full float32 logits, LoRA on lm_head
  included, and the same training losses through the stage (DDP and FSDP2 in test_train.py run
  with it too: it is the default).
- packing: best-fit decreasing fills rows ≥ 97% on a skewed length distribution; packed,
  padded and padding-free (flattened) batches give every document the same loss.
- compile: blocks compiled with torch.compile train to the same losses as eager ones, with
  gradient checkpointing and LoRA.
- no per-step host syncs: a diverging run still stops before a non-finite update reaches a
  checkpoint.
- LoRA inputs left in the autocast dtype (no fp32 round trip): the same loss and gradients.
(Liger Kernel needs a CUDA GPU: tests/gpu/test_gpu.py covers it.)
"""

from __future__ import annotations

import json
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.train")

from tailor_trainer.batches import collate, token_losses  # noqa: E402
from tailor_trainer.config import FusedLoss  # noqa: E402
from tailor_trainer.data.pack import Packer  # noqa: E402
from tailor_trainer.loss import LossModel, resolve_fused_loss  # noqa: E402
from tailor_trainer.stages import Diverged  # noqa: E402
from tailor_trainer.stages.train import run_train  # noqa: E402

from test_train import losses, new_run, prepared  # noqa: E402,F401 - the module's fixture

FP32 = torch.autocast("cpu", enabled=False)


def documents(n: int, seed: int = 0, longest: int = 40) -> list[dict]:
    g = random.Random(seed)
    docs = []
    for i in range(n):
        k = g.randint(4, longest)
        ids = [1] + [g.randint(5, 390) for _ in range(k - 1)]
        labels = [-100] * (k // 3) + ids[k // 3:]  # a masked prompt, as instruction rows have
        docs.append({"id": f"d{i}", "input_ids": ids, "labels": labels})
    return docs


def per_document(loss: torch.Tensor, batch: dict) -> list[float]:
    """Loss sums per document of a ``[B, L]`` position-loss tensor (documents start where the
    position ids restart at 0; padding has no labels, so it adds nothing)."""
    out = []
    positions = batch["position_ids"]
    if positions is None:  # unpacked: one document per row
        positions = torch.arange(loss.size(1)).repeat(loss.size(0), 1)
    for row_loss, row_pos in zip(loss, positions):
        starts = (row_pos == 0).nonzero().flatten().tolist() + [len(row_pos)]
        out += [float(row_loss[a:b].sum()) for a, b in zip(starts, starts[1:])]
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


def test_chunked_loss_equals_the_full_logits_loss_with_lora_on_lm_head(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # non-zero adapters, so the head's LoRA path matters
            torch.nn.init.normal_(p, std=0.02)
    batch = collate(documents(6), 0, "cpu")
    grads = {}
    for mode in ("none", "chunked"):
        loss_model = LossModel(lora, mode, FP32)
        loss_model.chunk_tokens = 7  # many chunks, a ragged last one
        lora.zero_grad()
        total = loss_model(batch)
        total.backward()
        grads[mode] = (total.item(), {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad})
    lora.unload()
    assert grads["chunked"][0] == pytest.approx(grads["none"][0], rel=1e-5)
    assert any("lm_head" in n for n in grads["none"][1])
    for name, g in grads["none"][1].items():
        assert torch.allclose(grads["chunked"][1][name], g, rtol=1e-4, atol=1e-6), name


def test_lora_inputs_left_in_the_autocast_dtype_give_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    """Frozen bf16 weights, fp32 adapters, bf16 autocast (how the stage trains LoRA on a GPU):
    without PEFT's cast of each LoRA input to fp32 the numbers are the same."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tailor_trainer.acceleration import lora_inputs_uncast

    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    batch = collate(documents(4, seed=5), 0, "cpu")
    out = {}
    for uncast in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
        lora = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        assert next(p for n, p in lora.named_parameters() if "lora_A" in n).dtype == torch.float32
        if uncast:
            assert lora_inputs_uncast(lora, torch.bfloat16) == 3 * base.config.num_hidden_layers
        else:
            monkeypatch.setenv("TAILOR_PEFT_INPUT_CAST", "1")
            assert lora_inputs_uncast(lora, torch.bfloat16) == 0
            monkeypatch.delenv("TAILOR_PEFT_INPUT_CAST")
        total = LossModel(lora, "chunked", amp)(batch)
        total.backward()
        out[uncast] = (total.item(), {n: p.grad.float() for n, p in lora.named_parameters() if p.requires_grad})
    assert lora_inputs_uncast(lora, torch.float32) == 0  # no autocast: nothing to change
    assert out[True][0] == out[False][0]
    for name, g in out[False][1].items():
        assert torch.equal(out[True][1][name], g), name


def test_fused_loss_auto_is_chunked_on_cpu_and_liger_falls_back_without_cuda(model):
    cpu = torch.device("cpu")
    assert resolve_fused_loss(FusedLoss.auto, model, cpu) == ("chunked", None)
    mode, why = resolve_fused_loss(FusedLoss.liger, model, cpu)
    assert mode == "chunked" and "CUDA" in why
    assert resolve_fused_loss(FusedLoss.none, model, cpu) == ("none", None)


def test_packer_fills_rows_on_a_skewed_length_distribution():
    g = random.Random(7)
    max_len = 512
    # long-tailed: most rows short, some near the limit (a support-ticket-like mix)
    lengths = [min(max_len, max(8, int(g.lognormvariate(4.3, 0.9)))) for _ in range(6000)]
    packer = Packer(max_len, window_tokens=64 * max_len)
    rows = []
    for i, n in enumerate(lengths):
        rows += packer.add(f"r{i}", list(range(100, 100 + n)), list(range(100, 100 + n)))
    rows += list(packer.flush())
    tokens = sum(lengths)
    assert sum(len(r["input_ids"]) for r in rows) == tokens  # every example exactly once
    assert all(len(r["input_ids"]) <= max_len for r in rows)
    efficiency = tokens / (len(rows) * max_len)
    assert efficiency >= 0.97, efficiency
    # documents restart their positions; the first label of each later document is dropped
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert starts[0] == 0 and all(r["labels"][s] == -100 for s in starts[1:])
    # the same training batches: padding efficiency (real / padded tokens) of micro-batches of 8
    padded = [collate(rows[i:i + 8], 0, "cpu") for i in range(0, len(rows), 8)]
    assert sum(b["tokens"] for b in padded) / sum(b["padded_tokens"] for b in padded) >= 0.97


def test_packed_padded_and_padding_free_batches_give_each_document_the_same_loss(model):
    docs = documents(12, seed=3)
    packer = Packer(64, window_tokens=1 << 30)
    for d in docs:
        assert not packer.add(d["id"], d["input_ids"], d["labels"])
    packed_rows = list(packer.flush())
    assert len(packed_rows) < len(docs)
    # (documents sit in the packs in best-fit order: the per-document losses compare as multisets)
    padded = collate(docs, 0, "cpu")
    packed = collate(packed_rows, 0, "cpu")
    flat = collate(docs, 0, "cpu", flatten=True)
    with torch.no_grad():
        reference = per_document(torch.nn.functional.pad(token_losses(model, padded, FP32)[0], (0, 1)), padded)
        for mode in ("none", "chunked"):
            loss_model = LossModel(model, mode, FP32)
            for batch in (packed, flat):
                got = per_document(loss_model.position_losses(batch), batch)
                assert sorted(got) == pytest.approx(sorted(reference), rel=1e-4, abs=1e-5)
                assert float(loss_model(batch)) == pytest.approx(sum(reference), rel=1e-5)
    assert flat["padded_tokens"] == flat["tokens"] == padded["tokens"] < padded["padded_tokens"]
    assert flat["label_tokens"] == padded["label_tokens"] == packed["label_tokens"]


@pytest.mark.slow
def test_fused_loss_none_and_chunked_train_alike(prepared, tmp_path):
    out, runs = {}, {}
    for mode in ("none", "chunked"):
        ctx, _ = new_run(prepared, tmp_path / mode, hyperparameters={"maxSteps": 4, "fusedLoss": mode})
        out[mode] = run_train(ctx)
        runs[mode] = [v for _, v in losses(tmp_path / mode)]
    assert out["chunked"]["speed"]["fusedLoss"] == "chunked" and out["none"]["speed"]["fusedLoss"] == "none"
    assert runs["chunked"] == pytest.approx(runs["none"], rel=1e-5)
    assert 0 < out["chunked"]["paddingEfficiency"] <= 1
    # the speed levers are not part of the config hash: a run may resume with them changed
    assert new_run(prepared, tmp_path / "x", hyperparameters={"fusedLoss": "none", "compile": True})[0].config_hash \
        == new_run(prepared, tmp_path / "y")[0].config_hash


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(prepared, tmp_path):
    """torch.compile per block (inductor on the CPU), with LoRA and gradient checkpointing."""
    out, runs = {}, {}
    for flag in (False, True):
        # no LoRA dropout: inductor draws its random numbers differently from eager
        ctx, _ = new_run(prepared, tmp_path / str(flag), adaptation={"lora": {"r": 4, "dropout": 0.0}},
                         hyperparameters={"maxSteps": 3, "compile": flag, "gradientCheckpointing": True})
        out[flag] = run_train(ctx)
        runs[flag] = [v for _, v in losses(tmp_path / str(flag))]
    from torch._dynamo.utils import counters

    assert out[True]["speed"]["compile"] is True and out[False]["speed"]["compile"] is False
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]  # really compiled, whole blocks
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


@pytest.mark.slow
def test_a_diverging_run_never_checkpoints_non_finite_weights(prepared, tmp_path):
    from safetensors.torch import load_file

    ctx, _ = new_run(prepared, tmp_path, adaptation={"method": "full", "lora": None},
                     hyperparameters={"learningRate": 1.0, "precision": "fp16", "scheduler": "constant",
                                      "maxSteps": 30, "maxGradNorm": 1000.0, "checkpointEverySteps": 1,
                                      "checkpointsToKeep": 100})
    with pytest.raises(Diverged, match=r"at step \d+"):
        run_train(ctx)
    lines = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    logged = [d["step"] for d in lines if "loss" in d]
    assert logged == list(range(1, len(logged) + 1))  # every finite step logged, none after
    for ckpt in (tmp_path / "train" / "checkpoints").glob("step-*"):
        assert int(ckpt.name.split("-")[1]) <= len(logged)
        weights = load_file(str(ckpt / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt.name


@pytest.mark.slow
def test_compiled_blocks_under_fsdp_train_like_eager_ones(prepared, tmp_path, monkeypatch):
    """compile with FSDP2 (two CPU workers, gloo): blocks compiled before fully_shard wraps them."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runs = {}
    for flag in (False, True):
        ctx, _ = new_run(prepared, tmp_path / str(flag), adaptation={"lora": {"r": 4, "dropout": 0.0}},
                         resources={"workers": 2, "cpusPerWorker": 1, "strategy": "fsdp"},
                         hyperparameters={"maxSteps": 2, "checkpointEverySteps": 2, "compile": flag})
        out = run_train(ctx)
        assert out["status"] == "completed" and out["speed"]["compile"] is flag
        runs[flag] = [v for _, v in losses(tmp_path / str(flag))]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
