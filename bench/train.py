"""Benchmark of the train stage: tokens/s against a plain transformers/PyTorch loop.

    PYTHONPATH=operator:trainer python bench/train.py                   # LoRA, quickstart model
    PYTHONPATH=operator:trainer python bench/train.py --method full --steps 40 --threads 2

Same model (``--model``, default examples/models/tailor-tiny-llama), same prepared rows (the
quickstart support instructions, tokenized once by the prep stage), same batch size, same
number of optimizer steps and CPU threads, in the same process, alternating
  plain   a careful hand-written loop: AutoModelForCausalLM (+ the same PEFT config), AdamW with
          its fused kernel (``fused=True``, a user's best option on CPU and GPU), linear schedule,
          ``model(input_ids, attention_mask, labels=...)``, backward, clip, step; no logging
  stage   the train stage (``run_train``: Ray Train TorchTrainer, local mode with one worker)
each ``--repeats`` times. Throughput is training tokens (padding excluded) per second of the
training loop; for the stage it is what the stage itself reports after its last optimizer
step (metrics.jsonl), so model loading and Ray start-up are shown separately as "stage wall".
Prints a table, each side's median with its min-max, and the ratio of the medians stage/plain
(the stage should be >= 1.0: it does the same work plus its own bookkeeping). Informative only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]
# As the trainer's entrypoint does (pipeline.main_run), for both loops: before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def config(work: Path, args: argparse.Namespace, run: str):
    from tailor_trainer.config import TrainerConfig

    adaptation = {"method": args.method}
    if args.method == "lora":
        adaptation["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0,
                              "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"]}
    return TrainerConfig.model_validate({
        "run": {"job": "bench", "name": run}, "model": {"uri": args.model},
        "dataset": {"name": "support", "source": {"uri": args.data}, "schema": "instruction"},
        "adaptation": adaptation,
        "hyperparameters": {"learningRate": 1e-3, "batchSize": args.batch_size, "maxSteps": args.steps,
                            "maxSeqLength": args.seq, "checkpointEverySteps": 10**6,
                            "evalEverySteps": 10**6, "seed": 1},
        "evaluation": {"metrics": ["loss"]},
        "resources": {"workers": 1, "cpusPerWorker": args.threads},
        "outputUri": str(work / run),
    })


def plain_loop(cfg, rows: list[dict], threads: int) -> dict:
    """What one would write by hand with transformers and PyTorch."""
    import torch
    from transformers import AutoModelForCausalLM, get_scheduler

    torch.set_num_threads(threads)
    torch.manual_seed(1)
    hp = cfg.hyperparameters
    model = AutoModelForCausalLM.from_pretrained(cfg.model.uri)
    if cfg.adaptation.method.value == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg.adaptation.lora
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha,
                                                 lora_dropout=lora.dropout, target_modules=lora.target_modules))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.learning_rate, fused=True)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=hp.max_steps)
    # The very batches the stage draws (its seeded per-epoch permutation), so padding is equal.
    from tailor_trainer.batches import epoch_order

    order = [i for epoch in range(hp.max_steps * hp.batch_size // len(rows) + 1)
             for i in epoch_order(len(rows), epoch, hp.seed, 1, 0)]
    pad = model.config.pad_token_id or 0
    tokens, step, i = 0, 0, 0
    start, cpu = time.perf_counter(), time.process_time()
    while step < hp.max_steps:
        batch = [rows[order[i + k]] for k in range(hp.batch_size)]
        i += hp.batch_size
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad] * (n - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        step += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"tokens": tokens, "seconds": elapsed, "tokensPerSecond": tokens / elapsed,
            "tokensPerCpuSecond": tokens / cpu, "loss": float(loss.detach())}


def stage(cfg, prep_dir: Path) -> dict:
    import shutil

    from tailor_trainer.stages import StageContext
    from tailor_trainer.stages.train import run_train

    run_dir = Path(cfg.output_uri)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(prep_dir, run_dir / "prep")
    ctx = StageContext(config=cfg, run_dir=str(run_dir), config_hash=cfg.config_hash(), model_dir=cfg.model.uri)
    start = time.perf_counter()
    out = run_train(ctx)
    wall = time.perf_counter() - start
    lines = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in lines if "loss" in x][-1]
    return {"tokens": last["tokens"], "seconds": last["tokens"] / last["tokensPerSecond"],
            "tokensPerSecond": last["tokensPerSecond"], "tokensPerCpuSecond": last["tokens"] / last["cpuSeconds"],
            "loss": last["loss"], "wall": wall,
            "mode": out["mode"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "examples" / "models" / "tailor-tiny-llama"))
    p.add_argument("--data", default=str(REPO / "examples" / "data" / "support-instructions.jsonl"))
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both (cpusPerWorker)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    os.environ.setdefault("TAILOR_RAY_LOCAL_MODE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    import pyarrow.parquet as pq

    from tailor_trainer.stages.prep import run_prep

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tailor-bench-train-"))
    cfg = config(work, args, "prep")
    run_prep(cfg, str(work / "prep-run"))
    prep_dir = work / "prep-run" / "prep"
    rows = pq.read_table(prep_dir / "train.parquet").to_pylist()
    print(f"model {args.model}\nmethod {args.method}, {len(rows)} train rows, batch {args.batch_size}, "
          f"{args.steps} steps, max {args.seq} tokens, {args.threads} thread(s)\n")
    results: dict[str, list[dict]] = {"plain": [], "stage": []}
    for r in range(args.repeats):
        results["plain"].append(plain_loop(cfg, rows, args.threads))
        results["stage"].append(stage(config(work, args, f"stage-{r}"), prep_dir))
    print(f"{'run':<8}{'tokens':>9}{'loop s':>9}{'tokens/s':>11}{'tok/cpu-s':>11}{'final loss':>12}"
          f"{'stage wall s':>14}")
    for name, runs in results.items():
        for x in runs:
            wall = f"{x['wall']:.1f}" if "wall" in x else ""
            print(f"{name:<8}{x['tokens']:>9}{x['seconds']:>9.2f}{x['tokensPerSecond']:>11.1f}"
                  f"{x['tokensPerCpuSecond']:>11.1f}{x['loss']:>12.4f}{wall:>14}")
    for key, label in (("tokensPerSecond", "tokens/s"), ("tokensPerCpuSecond", "tokens/CPU-s")):
        med = {k: statistics.median(x[key] for x in v) for k, v in results.items()}
        spread = {k: f"{min(x[key] for x in v):.0f}-{max(x[key] for x in v):.0f}" for k, v in results.items()}
        per = [s[key] / p[key] for p, s in zip(results["plain"], results["stage"])]
        print(f"{label}: plain median {med['plain']:.0f} ({spread['plain']}), stage median {med['stage']:.0f} "
              f"({spread['stage']}); ratio of medians stage/plain {med['stage'] / med['plain']:.3f} "
              f"(per repeat {', '.join(f'{r:.3f}' for r in per)})")
    print("(tokens/CPU-s is the steadier figure on a shared machine; wall tokens/s is what users see)")
    same = math.isclose(results["plain"][0]["tokens"], results["stage"][0]["tokens"], rel_tol=0.15)
    if not same:
        print("note: the two loops saw different token counts (different batches); compare tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
