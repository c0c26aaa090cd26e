"""GPU benchmark: Tailor's train stage against a fairly configured Hugging Face ``Trainer``, same GPU.

    PYTHONPATH=operator:trainer python bench/gpu.py                       # every row, 3 repeats
    PYTHONPATH=operator:trainer python bench/gpu.py --sizes 1b --methods lora --repeat 5
    PYTHONPATH=operator:trainer python bench/gpu.py --sizes 8b --methods lora --levers
    PYTHONPATH=operator:trainer python bench/gpu.py --smoke               # the code paths, on CPU

Models: Llama architecture with random weights from the public Llama 3.2 1B and Llama 3.1 8B
configurations (written below: no hub access). Methods: LoRA r=16 on all linear layers, and full
fine-tuning in pure bf16 with AdamW. Both sides train on the same random token sequences with the
same batch, sequence length (``ROWS``, ``--seq``, ``--batch``) and number of steps:
  tailor  ``tailor_trainer.training.fit`` — the loop every Ray Train worker of the train stage
          runs (precision bf16, one GPU), with its default levers: fused loss (Liger on CUDA),
          compiled blocks, no per-step host sync, LoRA inputs not cast to fp32 (``LEVERS``)
  hf      ``transformers.Trainer`` as a careful user configures it: the model loaded in bf16 with
          ``attn_implementation="sdpa"``, ``bf16=True``, ``optim="adamw_torch_fused"``, the same
          PEFT config, no evaluation, logging or saving in the timed window
Each side runs ``--repeat`` times (alternating); a figure is the median with its min-max.
Throughput is steady-state tokens/s: from the end of the first step (compilation and warm-up) to
the end of the last, with the GPU synchronized at both marks. ``--levers`` adds tailor runs with
every lever off, each one alone, and all on, so each is measured alone and together.

FLOPs per token (the PaLM accounting as torchtitan and nanoGPT use it):
  full  6 x P + 12 x L x H x Dh x S
  LoRA  4 x P + 6 x P_lora + 12 x L x H x Dh x S   (frozen weights need no weight gradients)
P: the weights of every matrix multiply a token goes through — all decoder-layer weights and
lm_head (counted even when tied to the embedding, whose lookup is not a matmul and is left out);
L layers, H attention heads of size Dh, S the sequence length (attention counted without the
causal halving, as in PaLM). MFU = FLOPs/token x tokens/s / the GPU's dense bf16 peak
(``--peak-tflops``, else looked up from the device name). Prints tables; informative only. Needs
one CUDA GPU; rows that do not fit report OOM.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

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
# (sequence length, sequences per step) per size and method; both sides fit an 80 GB GPU at these
# (8B full needs the H200's 141 GB at seq 4096: ~64 GiB of weights, gradients and AdamW state).
ROWS = {("1b", "lora"): (4096, 4), ("1b", "full"): (4096, 4), ("8b", "lora"): (4096, 2),
        ("8b", "full"): (4096, 1)}
# --smoke: the same code paths on CPU with a toy size, to check the script without a GPU.
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False,
             rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512)
DEVICE = "cuda"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 16
# The train stage's speed levers; --levers measures each alone and together. name: (on, off),
# each a hyperparameter or (for the two without a spec field) an environment variable.
LEVERS = {
    "fusedLoss": ({"fusedLoss": "auto"}, {"fusedLoss": "none"}),  # liger on CUDA, else chunked
    "compile": ({"compile": True}, {"compile": False}),            # torch.compile per block
    "noHostSync": ({"env:TAILOR_FLUSH_SECONDS": "1"}, {"env:TAILOR_FLUSH_SECONDS": "0"}),
    "loraUncast": ({"env:TAILOR_PEFT_INPUT_CAST": None}, {"env:TAILOR_PEFT_INPUT_CAST": "1"}),
}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def matmul_params(cfg: dict) -> tuple[int, int]:
    """(P, P_lora): weights of every matmul a token goes through (decoder layers, final norm and
    lm_head; not the embedding lookup), and the LoRA r=16 weights on all linear layers."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    layer = sum(a * b for a, b in shapes) + 2 * h
    lora = n * sum(LORA_R * (a + b) for a, b in shapes)
    return n * layer + h + cfg["vocab_size"] * h, lora


def flops_per_token(cfg: dict, seq: int, method: str) -> float:
    p, p_lora = matmul_params(cfg)
    attention = 12 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * cfg["head_dim"] * seq
    weights = 6 * p if method == "full" else 4 * p + 6 * p_lora
    return weights + attention


def build_model_dir(size: str, root: Path) -> Path:
    """Random-init the model on the GPU in bf16 and save it (both sides load the same files)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / f"llama-{size}"
    if (out / "config.json").exists():
        return out
    config = LlamaConfig(**LLAMA[size], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    model.save_pretrained(out)
    del model
    free()
    return out


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


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_tailor(model_dir: Path, rows: list[dict], method: str, batch: int, steps: int,
               levers: dict | None = None) -> dict:
    import torch

    from tailor_trainer.config import TrainerConfig
    from tailor_trainer.training import fit

    adaptation = {"method": method}
    if method == "lora":
        adaptation["lora"] = {"r": LORA_R, "alpha": 2 * LORA_R, "dropout": 0.0, "targetModules": LORA_TARGETS}
    levers = levers or {}
    env = {k[4:]: v for k, v in levers.items() if k.startswith("env:")}
    hp = {"learningRate": 1e-5, "batchSize": batch, "maxSteps": steps,
          "precision": "bf16" if DEVICE == "cuda" else "fp32", "maxSeqLength": len(rows[0]["input_ids"]),
          "gradientCheckpointing": GRADIENT_CHECKPOINTING, "checkpointEverySteps": 10**6,
          "evalEverySteps": 10**6, **{k: v for k, v in levers.items() if not k.startswith("env:")}}

    cfg = TrainerConfig.model_validate({
        "run": {"job": "bench", "name": "bench-r1"}, "model": {"uri": str(model_dir)},
        "dataset": {"source": {"uri": "random.jsonl"}}, "adaptation": adaptation, "hyperparameters": hp,
        "resources": {"workers": 1, "gpusPerWorker": 1 if DEVICE == "cuda" else 0}, "outputUri": "/tmp/unused"})
    with mock.patch.dict(os.environ):  # the environment levers, for this run only
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        model, out = fit(cfg, str(model_dir), rows, [], config_hash="bench", threads=torch.get_num_threads())
    peak = peak_gib()
    del model
    free()
    return {"tokensPerSecond": out["steadyTokensPerSecond"], "peakGiB": peak, "loss": out["trainLoss"],
            "speed": out.get("speed")}


def run_hf(model_dir: Path, rows: list[dict], method: str, batch: int, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = DEVICE == "cuda"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    model.to(DEVICE)
    model.config.use_cache = False
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=2 * LORA_R,
                                                 lora_dropout=0.0, target_modules=LORA_TARGETS))
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (1, steps):
                sync()
                marks.append(time.perf_counter())

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": torch.tensor(rows[i]["input_ids"]), "labels": torch.tensor(rows[i]["labels"])}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps,
                                 learning_rate=1e-5, bf16=cuda, use_cpu=not cuda,
                                 optim="adamw_torch_fused" if cuda else "adamw_torch",
                                 logging_strategy="no", eval_strategy="no", save_strategy="no",
                                 gradient_checkpointing=GRADIENT_CHECKPOINTING,
                                 gradient_checkpointing_kwargs={"use_reentrant": False},
                                 report_to="none", disable_tqdm=True,
                                 remove_unused_columns=False, dataloader_num_workers=0, seed=1)
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()])
        result = trainer.train()
    peak = peak_gib()
    seq = len(rows[0]["input_ids"])
    tps = (steps - 1) * batch * seq / (marks[-1] - marks[0]) if len(marks) == 2 else None
    del trainer, model
    free()
    return {"tokensPerSecond": tps, "peakGiB": peak, "loss": result.training_loss}


def attempt(fn, *a, **kw) -> dict:
    import torch

    try:
        return fn(*a, **kw)
    except torch.OutOfMemoryError as e:
        free()
        return {"tokensPerSecond": None, "peakGiB": None, "loss": None, "error": f"OOM: {e}"[:200]}


def summarize(runs: list[dict], fpt: float, peak: float | None) -> dict:
    """Median and min-max over repeats (None when any repeat failed)."""
    tps = [r["tokensPerSecond"] for r in runs]
    out = {"runs": runs}
    if not runs or any(t is None for t in tps):
        out.update(tokensPerSecond=None, error=next((r.get("error") for r in runs if r.get("error")), "failed"))
        return out
    med = statistics.median(tps)
    out.update(tokensPerSecond=med, min=min(tps), max=max(tps),
               mfu=med * fpt / (peak * 1e12) if peak else None,
               peakGiB=max((r["peakGiB"] for r in runs if r["peakGiB"] is not None), default=None),
               loss=statistics.median(r["loss"] for r in runs))
    return out


def line(size: str, method: str, seq: int, batch: int, side: str, r: dict, ratio: str = "") -> str:
    if r.get("tokensPerSecond") is None:
        return f"{size:<5}{method:<6}{seq:>6}{batch:>6}  {side:<16}{str(r.get('error'))[:60]}"
    spread = f"{r['min']:.0f}-{r['max']:.0f}"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
    mem = f"{r['peakGiB']:.1f}" if r.get("peakGiB") else "-"
    return (f"{size:<5}{method:<6}{seq:>6}{batch:>6}  {side:<16}{r['tokensPerSecond']:>10.0f}{spread:>17}"
            f"{mfu:>8}{mem:>9}{r['loss']:>9.3f}{ratio:>8}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1b,8b")
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeat", type=int, default=3, help="runs per side; figures are medians")
    p.add_argument("--seq", type=int, default=None, help="sequence length for every row (default: ROWS)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step for every row (default: ROWS)")
    p.add_argument("--tailor-batch", type=int, default=None,
                   help="also run tailor alone at this batch (the memory its levers save, as tokens per step)")
    p.add_argument("--levers", action="store_true", help="also run tailor with each lever alone, none, all")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    p.add_argument("--workdir", default=None, help="where the random-init models are saved")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="toy model on CPU: check the script, not the GPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="both sides recompute activations")
    args = p.parse_args()
    import torch

    global DEVICE, GRADIENT_CHECKPOINTING
    GRADIENT_CHECKPOINTING = args.gradient_checkpointing
    if args.smoke:
        DEVICE = "cpu"
        LLAMA["1b"] = LLAMA["8b"] = SMOKE
        args.seq, args.steps = min(args.seq or 64, 64), min(args.steps, 4)
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
    print(f"{name}, {memory:.0f} GiB, bf16 peak {peak or '?'} TFLOP/s; {args.steps} steps, median of "
          f"{args.repeat}{', gradient checkpointing' if GRADIENT_CHECKPOINTING else ''}; torch {torch.__version__}\n")
    print(f"{'size':<5}{'meth':<6}{'seq':>6}{'batch':>6}  {'side':<16}{'tokens/s':>10}{'min-max':>17}{'MFU':>8}"
          f"{'peak GiB':>9}{'loss':>9}{'ratio':>8}")
    results = []
    for size in args.sizes.split(","):
        t = time.perf_counter()
        model_dir = build_model_dir(size, work)
        p_all, p_lora = matmul_params(LLAMA[size])
        print(f"# {size}: {p_all / 1e9:.2f}B matmul parameters incl. lm_head, built in "
              f"{time.perf_counter() - t:.0f}s", flush=True)
        for method in args.methods.split(","):
            seq, batch = ROWS[(size, method)]
            seq, batch = args.seq or seq, args.batch or batch
            fpt = flops_per_token(LLAMA[size], seq, method)
            row = {"size": size, "method": method, "batch": batch, "seq": seq, "flopsPerToken": fpt}
            n_rows = max(batch, args.tailor_batch or 0) * args.steps
            rows = random_rows(n_rows, seq, LLAMA[size]["vocab_size"])
            runs: dict[str, list[dict]] = {"tailor": [], "hf": []}
            for _ in range(args.repeat):
                runs["tailor"].append(attempt(run_tailor, model_dir, rows, method, batch, args.steps))
                runs["hf"].append(attempt(run_hf, model_dir, rows, method, batch, args.steps))
            for side in ("tailor", "hf"):
                row[side] = summarize(runs[side], fpt, peak)
            t_tps, h_tps = row["tailor"]["tokensPerSecond"], row["hf"]["tokensPerSecond"]
            row["ratio"] = t_tps / h_tps if t_tps and h_tps else None
            t_mem, h_mem = row["tailor"].get("peakGiB"), row["hf"].get("peakGiB")
            row["memoryRatio"] = t_mem / h_mem if t_mem and h_mem else None
            print(line(size, method, seq, batch, "tailor", row["tailor"],
                       f"{row['ratio']:.3f}" if row["ratio"] else ""))
            print(line(size, method, seq, batch, "hf (fair)", row["hf"]))
            if row["memoryRatio"]:
                print(f"{'':<23}peak memory tailor/hf {row['memoryRatio']:.2f}")
            if args.tailor_batch:
                big = summarize([attempt(run_tailor, model_dir, rows, method, args.tailor_batch, args.steps)
                                 for _ in range(args.repeat)], fpt, peak)
                row["tailorBigBatch"] = {"batch": args.tailor_batch, **big}
                print(line(size, method, seq, args.tailor_batch, "tailor big batch", big))
            if args.levers:
                off = {k: v for on_off in LEVERS.values() for k, v in on_off[1].items()}
                variants = {"no levers": off, **{f"+{k} only": {**off, **LEVERS[k][0]} for k in LEVERS},
                            "all levers": {k: v for on_off in LEVERS.values() for k, v in on_off[0].items()}}
                row["levers"] = {}
                for label, flags in variants.items():
                    r = summarize([attempt(run_tailor, model_dir, rows, method, batch, args.steps, flags)
                                   for _ in range(args.repeat)], fpt, peak)
                    row["levers"][label] = {"flags": flags, **r}
                    print(line(size, method, seq, batch, label, r), flush=True)
            results.append(row)
            if args.json:  # after every row: a run cut short still leaves what it measured
                Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
