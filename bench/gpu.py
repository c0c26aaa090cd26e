"""GPU benchmark: Tailor's training recipe against plain Hugging Face ``Trainer``, same GPU.

    PYTHONPATH=operator:trainer python bench/gpu.py                       # 1B and 8B, LoRA and full
    PYTHONPATH=operator:trainer python bench/gpu.py --sizes 1b --steps 20 --methods lora

For each size (Llama-architecture models with random weights from the public Llama 3.2 1B and
Llama 3.1 8B configurations, written below: no hub access needed) and each method (LoRA r=16 on
all linear layers; full fine-tuning in pure bf16, AdamW), both sides train on the same random
token sequences with the same batch, sequence length and number of steps:
  tailor  ``tailor_trainer.training.fit`` — the recipe every Ray Train worker of the train
          stage runs (precision bf16, one GPU)
  hf      ``transformers.Trainer`` (bf16, adamw_torch, no logging/saving), same PEFT config
Throughput is steady-state tokens/s (the first, warm-up step left out); MFU is model FLOPs per
token ((6 for full, 4 for LoRA) x non-embedding parameters + 12 x layers x hidden x sequence,
the PaLM accounting) times tokens/s over the GPU's dense bf16 peak (``--peak-tflops``, else
looked up from the device name). Prints one table; informative only. Needs one CUDA GPU; 8B
full fine-tuning needs ~70 GB (pure bf16 weights, gradients and AdamW state), so it is skipped
when the GPU has less memory than that.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]

# Public architecture settings (meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B config.json).
LLAMA = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
               rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
               rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
}
# Batch (sequences per step) per size and method, at --seq tokens; chosen to fit an 80 GB GPU.
BATCH = {("1b", "lora"): 8, ("1b", "full"): 8, ("8b", "lora"): 4, ("8b", "full"): 1}
# --smoke: the same code paths on CPU with a toy size, to check the script without a GPU.
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False,
             rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512)
DEVICE = "cuda"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def flops_per_token(cfg: dict, seq: int, method: str, non_embedding_params: int) -> float:
    weights = (6 if method == "full" else 4) * non_embedding_params
    return weights + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq


def build_model_dir(size: str, root: Path) -> tuple[Path, int]:
    """Random-init the model on the GPU in bf16 and save it (both sides load the same files)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / f"llama-{size}"
    config = LlamaConfig(**LLAMA[size], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    embed = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - embed
    if not (out / "config.json").exists():
        model.save_pretrained(out)
    del model
    free()
    return out, non_embedding


def free() -> None:
    import torch

    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


def random_rows(n: int, seq: int, vocab: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        rows.append({"id": str(i), "input_ids": ids, "labels": ids, "position_ids": None})
    return rows


GRADIENT_CHECKPOINTING = False  # --gradient-checkpointing: both sides recompute activations


def run_tailor(model_dir: Path, rows: list[dict], method: str, batch: int, steps: int) -> dict:
    import torch

    from tailor_trainer.config import TrainerConfig
    from tailor_trainer.training import fit

    adaptation = {"method": method}
    if method == "lora":
        adaptation["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": LORA_TARGETS}
    cfg = TrainerConfig.model_validate({
        "run": {"job": "bench", "name": "bench-r1"}, "model": {"uri": str(model_dir)},
        "dataset": {"source": {"uri": "random.jsonl"}}, "adaptation": adaptation,
        "hyperparameters": {"learningRate": 1e-5, "batchSize": batch, "maxSteps": steps,
                            "precision": "bf16" if DEVICE == "cuda" else "fp32",
                            "maxSeqLength": len(rows[0]["input_ids"]),
                            "gradientCheckpointing": GRADIENT_CHECKPOINTING},
        "resources": {"workers": 1, "gpusPerWorker": 1 if DEVICE == "cuda" else 0}, "outputUri": "/tmp/unused"})
    model, out = fit(cfg, str(model_dir), rows, [], config_hash="bench", threads=torch.get_num_threads())
    peak = peak_gib()
    del model
    free()
    return {"tokensPerSecond": out["steadyTokensPerSecond"], "peakGiB": peak, "loss": out["trainLoss"]}


def run_hf(model_dir: Path, rows: list[dict], method: str, batch: int, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = DEVICE == "cuda"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16 if cuda else torch.float32)
    model.to(DEVICE)
    model.config.use_cache = False
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS))
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (1, steps):
                if cuda:
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": torch.tensor(rows[i]["input_ids"]), "labels": torch.tensor(rows[i]["labels"])}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps,
                                 learning_rate=1e-5, bf16=cuda, use_cpu=not cuda, optim="adamw_torch",
                                 logging_strategy="no", gradient_checkpointing=GRADIENT_CHECKPOINTING,
                                 gradient_checkpointing_kwargs={"use_reentrant": False},
                                 save_strategy="no", report_to="none", disable_tqdm=True,
                                 remove_unused_columns=False, dataloader_num_workers=0, seed=1)
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()])
        result = trainer.train()
    peak = peak_gib()
    seq = len(rows[0]["input_ids"])
    tps = (steps - 1) * batch * seq / (marks[-1] - marks[0]) if len(marks) == 2 else None
    del trainer, model
    free()
    return {"tokensPerSecond": tps, "peakGiB": peak, "loss": result.training_loss}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1b,8b")
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    p.add_argument("--workdir", default=None, help="where the random-init models are saved")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="toy model on CPU: check the script, not the GPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="both sides recompute activations")
    p.add_argument("--batch", type=int, default=None, help="sequences per step for every size/method")
    args = p.parse_args()
    import torch

    global DEVICE, GRADIENT_CHECKPOINTING
    GRADIENT_CHECKPOINTING = args.gradient_checkpointing
    if args.smoke:
        DEVICE = "cpu"
        LLAMA["1b"] = LLAMA["8b"] = SMOKE
        args.seq, args.steps = min(args.seq, 64), min(args.steps, 4)
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; none is visible here (try --smoke)")
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU (smoke)"
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if DEVICE == "cuda" else 0.0
    peak = peak_tflops(name, args.peak_tflops)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tailor-bench-gpu-"))
    print(f"{name}, {memory:.0f} GiB, bf16 peak {peak or '?'} TFLOP/s; seq {args.seq}, {args.steps} steps"
          f"{', gradient checkpointing' if GRADIENT_CHECKPOINTING else ''}\n")
    print(f"{'model':<6}{'method':<7}{'batch':>6}{'side':>8}{'tokens/s':>11}{'MFU':>8}{'peak GiB':>10}"
          f"{'loss':>9}{'tailor/hf':>11}")
    results = []
    for size in args.sizes.split(","):
        t = time.perf_counter()
        model_dir, non_embedding = build_model_dir(size, work)
        print(f"# {size}: {non_embedding / 1e9:.2f}B non-embedding parameters, built in "
              f"{time.perf_counter() - t:.0f}s")
        for method in args.methods.split(","):
            if size == "8b" and method == "full" and memory < 75 and not args.smoke:
                print(f"{size:<6}{method:<7}  skipped: needs ~70 GiB, this GPU has {memory:.0f}")
                continue
            batch = args.batch or BATCH[(size, method)]
            rows = random_rows(batch * args.steps, args.seq, LLAMA[size]["vocab_size"])
            fpt = flops_per_token(LLAMA[size], args.seq, method, non_embedding)
            row = {"size": size, "method": method, "batch": batch, "seq": args.seq}
            for side, fn in (("tailor", run_tailor), ("hf", run_hf)):
                try:
                    r = fn(model_dir, rows, method, batch, args.steps)
                except torch.OutOfMemoryError as e:
                    free()
                    r = {"tokensPerSecond": None, "peakGiB": None, "loss": None, "error": f"OOM: {e}"[:200]}
                r["mfu"] = (r["tokensPerSecond"] * fpt / (peak * 1e12)) if (peak and r["tokensPerSecond"]) else None
                row[side] = r
            ratio = (row["tailor"]["tokensPerSecond"] / row["hf"]["tokensPerSecond"]
                     if row["tailor"]["tokensPerSecond"] and row["hf"]["tokensPerSecond"] else None)
            row["ratio"] = ratio
            for side in ("tailor", "hf"):
                r = row[side]
                tps = f"{r['tokensPerSecond']:.0f}" if r["tokensPerSecond"] else r.get("error", "-")[:10]
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
                mem = f"{r['peakGiB']:.1f}" if r["peakGiB"] else "-"
                loss = f"{r['loss']:.3f}" if r["loss"] is not None else "-"
                rat = f"{ratio:.3f}" if (side == "hf" and ratio) else ""
                print(f"{size:<6}{method:<7}{batch:>6}{side:>8}{tps:>11}{mfu:>8}{mem:>10}{loss:>9}{rat:>11}",
                      flush=True)
            results.append(row)
            if args.json:  # after every row: a run cut short still leaves what it measured
                Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
