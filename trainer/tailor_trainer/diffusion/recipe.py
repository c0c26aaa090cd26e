"""The diffusion training recipe each Ray Train worker runs: LoRA on the UNet, noise-prediction MSE.

Read top to bottom: load the frozen parts and add LoRA -> encode every row once (latent mean/std,
caption embeddings; the VAE and text encoder are frozen) -> optimizer and LR schedule -> resume
from the newest verified checkpoint (the language path's files and checks:
``tailor_trainer.checkpoints``) -> per optimizer step: sample latents, noise and timesteps, add
noise with the model's scheduler, MSE between the UNet's prediction and the target -> validate,
log, checkpoint -> save the adapter (diffusers LoRA format).

Batches, noise and timesteps depend only on (seed, step, micro-batch, rank), so a resumed run
takes exactly the steps an uninterrupted one would; the step count continues from the checkpoint.
With several workers the UNet is wrapped in DDP and each rank takes its share of every epoch.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Optional

from tailor_trainer.batches import amp_context, epoch_order
from tailor_trainer.checkpoints import (CHECKPOINTS, choose_checkpoint, clean_partial, load_torch, rng_state,
                                        set_rng_state, write_checkpoint, write_text)
from tailor_trainer.config import TrainerConfig
from tailor_trainer.diffusion.measure import denoising_losses, encode_rows, target_of
from tailor_trainer.diffusion.model import add_lora, load_parts, save_adapter
from tailor_trainer.errors import DataInvalid

CRASH_AFTER_ENV = "TAILOR_FAULT_EXIT_AFTER_CHECKPOINT"
"""Tests: exit (as a killed pod would) right after the checkpoint of this step."""


def total_steps(cfg: TrainerConfig, n_rows: int, world: int) -> int:
    hp = cfg.hyperparameters
    if hp.max_steps is not None:
        return hp.max_steps
    per_step = hp.batch_size * hp.gradient_accumulation_steps * world
    return max(1, math.ceil(hp.epochs_or_default() * n_rows / per_step))


def _indices(n: int, position: int, count: int, seed: int, world: int, rank: int) -> list[int]:
    """``count`` row indices of this rank starting at its ``position``-th row over all epochs."""
    out: list[int] = []
    while len(out) < count:
        order = epoch_order(n, position // max(1, math.ceil(n / world)), seed, world, rank)
        offset = position % len(order)
        take = order[offset: offset + count - len(out)]
        out.extend(take)
        position += len(take)
    return out


def fit_diffusion(cfg: TrainerConfig, model_dir: str, train_rows: list[dict], val_rows: list[dict], *,
                  config_hash: str, train_dir: Optional[str], threads: Optional[int] = None,
                  progress: Optional[Callable[..., None]] = None, device: Any = None,
                  on_checkpoint: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file
    from transformers import get_scheduler

    from tailor_trainer.training import pick_device

    hp = cfg.hyperparameters
    device = pick_device(cfg, device, threads)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    lead = rank == 0
    if not train_rows:
        raise DataInvalid("no training rows (prep wrote an empty train split)", field="dataset")
    torch.manual_seed(hp.seed)

    # 1. Parts, LoRA, and every row encoded once.
    parts = load_parts(model_dir, device=device)
    plan = add_lora(parts.unet, cfg.adaptation.lora)
    unet, scheduler, res = parts.unet, parts.scheduler, parts.resolution
    if hp.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    amp, _ = amp_context(hp.precision, device)
    lat_mean, lat_std, emb = encode_rows(train_rows, parts.vae, parts.text_encoder, res, device)
    val = encode_rows(val_rows, parts.vae, parts.text_encoder, res, device) if val_rows else None
    params = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]

    # 2. Optimizer and schedule.
    steps = total_steps(cfg, len(train_rows), world)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=hp.learning_rate, weight_decay=hp.weight_decay)
    lr_sched = get_scheduler(hp.scheduler.value, optimizer, num_warmup_steps=int(hp.warmup_ratio * steps),
                             num_training_steps=steps)
    state: dict[str, Any] = {"step": 0, "images": 0, "bestVal": None, "bestStep": None}

    # 3. Resume.
    ckpt_root = os.path.join(train_dir, CHECKPOINTS) if train_dir else None
    found, skipped = None, []
    if ckpt_root:
        if lead:
            clean_partial(ckpt_root)
        found, skipped = choose_checkpoint(ckpt_root, config_hash, world)
    if found is not None:
        weights = load_file(os.path.join(found.path, "trainable.safetensors"), device=str(device))
        by_name = dict(params)
        for name, tensor in weights.items():
            by_name[name].data.copy_(tensor)
        optimizer.load_state_dict(load_torch(os.path.join(found.path, "optimizer.pt"), device))
        lr_sched.load_state_dict(load_torch(os.path.join(found.path, "scheduler.pt")))
        with open(os.path.join(found.path, "state.json")) as f:
            state.update(json.load(f))
        rngs = load_torch(os.path.join(found.path, "rng.pt"))
        if len(rngs) == world:
            set_rng_state(rngs[rank])
    resumed_from = state["step"] if found is not None else None
    metrics_file = None
    if train_dir and lead:
        path = os.path.join(train_dir, "metrics.jsonl")
        kept = []
        if resumed_from and os.path.exists(path):  # drop what steps after the checkpoint logged
            with open(path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resumed_from]
        metrics_file = open(path, "w")
        metrics_file.writelines(kept)

    model = unet
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)

    def validation_loss() -> Optional[float]:
        if val is None:
            return None
        losses = denoising_losses(unet, scheduler, val[0], val[2], amp=amp)
        return sum(losses) / len(losses)

    # 4. The loop.
    n, bs, accum = len(train_rows), hp.batch_size, hp.gradient_accumulation_steps
    n_train_t = scheduler.config.num_train_timesteps
    started, step_at_start = time.monotonic(), state["step"]
    status, last_loss, diverged = "completed", None, None
    unet.train()
    while state["step"] < steps:
        step = state["step"]
        step_loss = 0.0
        for micro in range(accum):
            idx = _indices(n, (step * accum + micro) * bs, bs, hp.seed, world, rank)
            g = torch.Generator().manual_seed(hp.seed * 7_919 + (step * accum + micro) * 131 + rank)
            mean, std, cond = lat_mean[idx], lat_std[idx], emb[idx]
            latents = mean + std * torch.randn(mean.shape, generator=g).to(device)
            noise = torch.randn(mean.shape, generator=g).to(device)
            t = torch.randint(0, n_train_t, (len(idx),), generator=g).to(device)
            noisy = scheduler.add_noise(latents, noise, t)
            with amp:
                pred = model(noisy, t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred.float(), target_of(scheduler, latents, noise, t).float())
            (loss / accum).backward()
            step_loss += loss.item() / accum
        if not math.isfinite(step_loss):
            status, diverged = "diverged", step_loss
            break
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], hp.max_grad_norm).item()
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step = step + 1
        state["images"] += bs * accum * world
        last_loss = step_loss
        line: dict[str, Any] = {"step": step, "loss": round(step_loss, 6), "lr": lr_sched.get_last_lr()[0],
                                "gradNorm": round(grad_norm, 4)}
        if hp.eval_every_steps and (step % hp.eval_every_steps == 0 or step == steps):
            v = validation_loss()
            line["valLoss"] = v
            if v is not None and (state["bestVal"] is None or v < state["bestVal"]):
                state["bestVal"], state["bestStep"] = v, step
        if metrics_file:
            metrics_file.write(json.dumps(line) + "\n")
            metrics_file.flush()
        if progress is not None:
            elapsed = time.monotonic() - started
            done = step - step_at_start
            progress(stage="train", step=step, totalSteps=steps, loss=step_loss, message=None,
                     epoch=round(step * bs * accum * world / n, 3),
                     etaSeconds=round(elapsed / done * (steps - step), 1) if done else None)
        if ckpt_root and (step % hp.checkpoint_every_steps == 0 or step == steps):
            rngs = [None] * world
            if world > 1:
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            if lead:
                weights = {k: p.detach().to("cpu").contiguous() for k, p in params}
                snapshot = dict(state)
                write_checkpoint(ckpt_root, step, {
                    "trainable.safetensors": lambda p: save_file(weights, p),
                    "optimizer.pt": lambda p: torch.save(optimizer.state_dict(), p),
                    "scheduler.pt": lambda p: torch.save(lr_sched.state_dict(), p),
                    "rng.pt": lambda p: torch.save(rngs, p),
                    "state.json": lambda p: write_text(p, json.dumps(snapshot)),
                }, {"stage": "train", "configHash": config_hash, "worldSize": world, "kind": "diffusion-lora",
                    "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                    keep=hp.checkpoints_to_keep)
                if on_checkpoint is not None:
                    on_checkpoint()
            if world > 1:
                dist.barrier()
            if lead and os.environ.get(CRASH_AFTER_ENV) == str(step):
                os._exit(137)

    # 5. Save the adapter.
    duration = time.monotonic() - started
    if metrics_file:
        metrics_file.close()
    if status == "completed" and hp.eval_every_steps is None and val is not None:
        state["bestVal"], state["bestStep"] = validation_loss(), state["step"]
    if lead and train_dir and status == "completed":
        save_adapter(unet, os.path.join(train_dir, "model"), cfg)
    if world > 1:
        dist.barrier()
    trained = (state["step"] - step_at_start) * bs * accum * world
    outcome = {
        "status": status, "steps": state["step"], "totalSteps": steps, "trainLoss": last_loss,
        "valLoss": state["bestVal"], "bestStep": state["bestStep"], "imagesTrained": state["images"],
        "imagesPerSecond": round(trained / duration, 3) if duration > 0 else None,
        "loopSeconds": round(duration, 3), "resumedFrom": resumed_from, "skippedCheckpoints": skipped,
        "worldSize": world, "device": str(device), "resolution": res,
        "trainableParameters": plan["trainableParameters"], "totalParameters": plan["totalParameters"],
        "model": "model" if status == "completed" else None, "mergedModel": None,
    }
    if diverged is not None:
        outcome["divergedAt"] = state["step"] + 1
        outcome["divergedValue"] = str(diverged)
    return outcome
