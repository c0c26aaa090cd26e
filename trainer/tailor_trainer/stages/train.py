"""The train stage: Ray Train ``TorchTrainer`` running one linear recipe, :func:`fit`.

Read :func:`fit` top to bottom: build the adapted model, order the data, set up AdamW and the
warmup schedule, resume from the last complete checkpoint, then loop — accumulate micro-batches,
stop on a NaN/Inf loss, clip, step, log, validate (early stopping), checkpoint — and save.

Where it runs:
- ``resources.workers`` > 1, or inside a Ray cluster (``RAY_ADDRESS`` set, the RayJob case): a
  Ray Train worker group, DDP over gloo on CPU or NCCL on GPU. Rank 0 sends progress to a small
  relay actor that the driver forwards to the reporter.
- one worker and no cluster (laptop, CI, ``tailor run``): Ray Train's local mode
  (``ScalingConfig(num_workers=0)``), the same function in this process without starting Ray.
  ``TAILOR_RAY_LOCAL_MODE=0`` forces a worker group.

Files (docs/stage-contracts.md): ``train/checkpoints/step-N/`` (written to a temporary name, then
renamed, with a manifest), ``train/metrics.jsonl``, ``train/model/`` (adapter or full model) and,
with ``mergedModel``, ``train/merged/``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import threading
import time
import uuid
from contextlib import nullcontext
from typing import Any, Callable, Optional

from tailor_trainer import storage
from tailor_trainer.batches import amp_context, as_tensors, collate, epoch_order, load_rows, token_losses
from tailor_trainer.checkpoints import (
    CHECKPOINTS,
    Resumable,
    clean_partial,
    find_resumable,
    list_checkpoints,
    load_torch,
    rng_state,
    set_rng_state,
    write_checkpoint,
    write_text,
)
from tailor_trainer.config import AdaptationMethod, Precision, Strategy, TrainerConfig
from tailor_trainer.runtime import ensure_ray, stage_error_in, start_relay, use_local_mode
from tailor_trainer.stages import DataInvalid, Diverged, InvalidSpec, StageContext, StageError, TrainingFailed

# Early stopping's best trainable weights so far, kept in each checkpoint while early stopping is on.
BEST_FILE = "best.safetensors"
# Test-only fault injection: the process dies right after writing this checkpoint step.
_CRASH_AFTER_ENV = "TAILOR_FAULT_EXIT_AFTER_CHECKPOINT"
_LOCAL_PROGRESS: dict[str, Callable[..., None]] = {}


def _save_model_dir(model: Any, model_dir: str, out: str) -> None:
    """Save the trained model (adapter, or full model) with the tokenizer, atomically."""
    from transformers import AutoTokenizer

    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp, safe_serialization=True)
    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    except (OSError, ValueError):
        pass  # a model without a tokenizer still trains; prep would have failed first
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)


# ---------------------------------------------------------------------------------------------
# FSDP (resources.strategy fsdp): PyTorch FSDP2, one shard group per transformer block


def shard_model(model: Any, device_type: str, world: int) -> None:
    """Shard every transformer block (the classes the model lists in ``_no_split_modules``, added
    identity blocks included), then the rest (embeddings, head, PEFT extras) at the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in names]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def gather_trainable(params: list[tuple[str, Any]], keep: bool) -> dict[str, Any]:
    """Full CPU copies of the trainable (sharded) parameters; a collective: every rank calls it
    with the same list. Ranks with ``keep`` False take part but keep nothing."""
    out = {}
    for name, p in params:
        full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if keep:
            out[name] = full.to("cpu", copy=True).contiguous()
        del full
    return out


def load_sharded(model: Any, optimizer: Any, weights: dict[str, Any], optim_state: dict[str, Any]) -> None:
    """Resume under FSDP: full (unsharded) checkpoint tensors, resharded onto this world."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state,
                             options=StateDictOptions(full_state_dict=True))


def choose_checkpoint(root: str, config_hash: str, world: int
                      ) -> tuple[Optional[Resumable], list[dict[str, Any]]]:
    """The checkpoint every rank resumes from: each rank verifies its own copy (on another node it
    is a separate download); while they disagree, all retry at or below the oldest choice, so
    every rank loads the same verified step (or none)."""
    import torch.distributed as dist

    found, skipped = find_resumable(root, config_hash)
    if world == 1:
        return found, skipped
    while True:
        choices: list[Any] = [None] * world
        dist.all_gather_object(choices, found.step if found else -1)
        if len(set(choices)) == 1:
            return found, skipped
        limit = min(choices)
        for step in sorted({c for c in choices if c > limit}, reverse=True):
            if not any(s["step"] == step for s in skipped):
                skipped.append({"step": step, "reason": f"CheckpointCorrupt: step-{step} failed "
                                                        "verification on another rank"})
        found, more = find_resumable(root, config_hash, at_most=limit) if limit >= 0 else (None, [])
        skipped += [s for s in more if not any(s["step"] == k["step"] for k in skipped)]


# ---------------------------------------------------------------------------------------------
# The recipe


def fit(cfg: TrainerConfig, model_dir: str, train_rows: list[dict], val_rows: list[dict], *,
        config_hash: str, train_dir: Optional[str] = None, threads: Optional[int] = None,
        progress: Optional[Callable[..., None]] = None, device: Any = None,
        on_checkpoint: Optional[Callable[[], None]] = None) -> tuple[Any, dict[str, Any]]:
    """Train on ``train_rows``; returns the (unwrapped) model and the outcome.

    With ``train_dir`` it checkpoints, resumes, logs ``metrics.jsonl`` and saves the final model
    there (the train stage); without, it only trains (a cross-validation fold). ``device``
    defaults to GPU ``LOCAL_RANK`` with ``gpusPerWorker``, else the CPU. ``on_checkpoint`` runs on
    rank 0 after each checkpoint is complete (the train stage pushes it to remote output there).
    """
    import torch
    import torch.distributed as dist
    from transformers import get_scheduler

    from tailor_trainer.stages.adapt import build_trainable

    hp = cfg.hyperparameters
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    lead = rank == 0
    if device is None and cfg.resources.gpus_per_worker and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if threads:
            torch.set_num_threads(max(1, threads))
    if not train_rows:
        raise DataInvalid("the train split is empty", field="dataset")

    # 1. Model: base + adaptation, seeded so every rank builds the same one.
    torch.manual_seed(hp.seed)
    random.seed(hp.seed)
    amp, dtype = amp_context(hp.precision, device)
    # Frozen weights may live in the compute dtype (PEFT keeps its adapters in fp32). Fully trained
    # weights stay fp32 (autocast does the low-precision math) except with an explicit bf16: pure
    # bf16 training, for models whose fp32 weights and optimizer state would not fit.
    pure_bf16 = hp.precision is Precision.bf16
    load_dtype = dtype if (cfg.adaptation.method.is_peft or pure_bf16) else torch.float32
    if cfg.adaptation.method.is_peft and dtype == torch.float16 and device.type == "cpu":
        load_dtype = torch.float32  # fp16 weights on CPU are slow and gain nothing
    model, plan = build_trainable(cfg, model_dir, device=device, dtype=load_dtype)
    base_config = getattr(model, "config", None)
    if base_config is not None:
        base_config.use_cache = False
    pad_id = next((v for v in (getattr(base_config, "pad_token_id", None),
                               getattr(base_config, "eos_token_id", None)) if isinstance(v, int)), 0)
    if hp.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not getattr(inner, "supports_gradient_checkpointing", False):
            raise InvalidSpec(f"{type(inner).__name__} does not support gradient checkpointing; set "
                              "hyperparameters.gradientCheckpointing false",
                              field="spec.hyperparameters.gradientCheckpointing")
        # non-reentrant: works with frozen inputs (PEFT), DDP, FSDP2, and replays dropout's RNG
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fsdp = cfg.resources.strategy is Strategy.fsdp and world > 1
    if fsdp:
        shard_model(model, device.type, world)  # before the optimizer: it must hold the sharded parameters
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # 2. Schedule: micro-batches per epoch per rank, optimizer steps, warmup.
    rows_per_rank = math.ceil(len(train_rows) / world)
    micro_per_epoch = math.ceil(rows_per_rank / hp.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / hp.gradient_accumulation_steps)
    total_steps = hp.max_steps or max(1, math.ceil(hp.epochs_or_default * steps_per_epoch))
    warmup = math.ceil(hp.warmup_ratio * total_steps)
    eval_every = hp.eval_every_steps or (steps_per_epoch if hp.max_steps is None else hp.checkpoint_every_steps)
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.learning_rate, fused=device.type == "cuda")
    # fp16 on a GPU needs loss scaling; a skipped (overflowing) step is then normal, not divergence.
    scaler = torch.amp.GradScaler("cuda") if (dtype == torch.float16 and device.type == "cuda") else None
    scheduler = get_scheduler(hp.scheduler.value, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    state = {"step": 0, "tokens": 0, "bestVal": None, "bestStep": None, "badEvals": 0}

    # 3. Resume from the newest verified checkpoint of this config (a corrupt one is skipped and
    # recorded); its .pt files load weights-only.
    ckpt_root = os.path.join(train_dir, CHECKPOINTS) if train_dir else None
    resumed_from = None
    found: Optional[Resumable] = None
    skipped: list[dict[str, Any]] = []
    if ckpt_root:
        if lead:
            clean_partial(ckpt_root)
        found, skipped = choose_checkpoint(ckpt_root, config_hash, world)
        if found:
            from safetensors.torch import load_file

            path = found.path
            if fsdp:
                weights = load_file(os.path.join(path, "trainable.safetensors"), device="cpu")
                load_sharded(model, optimizer, weights, load_torch(os.path.join(path, "optimizer.pt"), "cpu"))
            else:
                weights = load_file(os.path.join(path, "trainable.safetensors"), device=str(device))
                by_name = dict(params)
                for name, tensor in weights.items():
                    by_name[name].data.copy_(tensor)
                optimizer.load_state_dict(load_torch(os.path.join(path, "optimizer.pt"), device))
            scheduler.load_state_dict(load_torch(os.path.join(path, "scheduler.pt")))
            with open(os.path.join(path, "state.json")) as f:
                state.update(json.load(f))
            if scaler and "scaler.pt" in found.files:
                scaler.load_state_dict(load_torch(os.path.join(path, "scaler.pt")))
            rng = load_torch(os.path.join(path, "rng.pt"))
            if len(rng) == world:
                set_rng_state(rng[rank])
            resumed_from = state["step"]
    metrics_path = os.path.join(train_dir, "metrics.jsonl") if train_dir else None
    metrics_file = None
    if metrics_path and lead:
        kept = []
        if resumed_from and os.path.exists(metrics_path):  # drop what the lost steps logged
            with open(metrics_path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resumed_from]
        metrics_file = open(metrics_path, "w")
        metrics_file.writelines(kept)
        metrics_file.flush()

    ddp = model
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    tensors = [as_tensors(r) for r in train_rows]
    best_weights: Optional[dict[str, Any]] = None
    if found is not None and BEST_FILE in found.files:
        from safetensors.torch import load_file

        # early stopping's best weights so far: without them a resumed run that stops early
        # would keep its last weights instead of the best ones
        best_weights = load_file(os.path.join(found.path, BEST_FILE), device="cpu")
    status, last_loss, diverged_value = "completed", None, None
    t_start, tokens_at_start, step_at_start = time.monotonic(), state["tokens"], state["step"]
    cpu_start = time.process_time()
    first_step: Optional[tuple[float, int]] = None
    steady_end: Optional[tuple[float, int]] = None
    last_progress = 0.0

    def report(force: bool = False, **extra: Any) -> None:
        nonlocal last_progress
        now = time.monotonic()
        if progress is None or (not force and now - last_progress < 1.0):
            return
        last_progress = now
        done = state["step"] - step_at_start
        elapsed = now - t_start
        tps = (state["tokens"] - tokens_at_start) / elapsed if elapsed > 0 else None
        eta = (total_steps - state["step"]) * elapsed / done if done else None
        extra.setdefault("message", None)
        progress(stage="train", step=state["step"], totalSteps=total_steps,
                 epoch=round(state["step"] / steps_per_epoch, 3), loss=last_loss,
                 tokensPerSecond=round(tps, 1) if tps else None,
                 etaSeconds=int(eta) if eta is not None else None, **extra)

    def validation_loss() -> Optional[float]:
        if not val_rows:
            return None
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        mine = val_rows[rank::world]
        # FSDP: every rank must run the same number of forwards (each gathers the layers); a rank
        # with a row fewer runs one more on a row it does not count.
        per_rank = math.ceil(len(val_rows) / world) if fsdp else len(mine)
        with torch.no_grad():
            for i in range(0, per_rank, hp.batch_size):
                rows, counted = mine[i:i + hp.batch_size], True
                if not rows:
                    rows, counted = val_rows[:1], False
                batch = collate(rows, pad_id, device)
                loss, _ = token_losses(model, batch, amp)
                if counted:
                    sums[0] += loss.sum().double()
                    sums[1] += batch["label_tokens"]
        if fsdp:
            # FSDP2 keeps the root's parameters gathered after a forward until the backward that
            # never comes here; reshard, or the optimizer's (sharded) parameters are not the
            # module's until the next training step
            model.reshard()
        if world > 1:
            dist.all_reduce(sums)
        model.train()
        return float(sums[0] / sums[1]) if sums[1] > 0 else None

    def checkpoint() -> None:
        from safetensors.torch import save_file

        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if fsdp:  # collectives: every rank takes part, rank 0 receives the full tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            weights = gather_trainable(params, lead)
            optim_state = get_optimizer_state_dict(
                model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif lead:
            weights = {n: p.detach().to("cpu").contiguous() for n, p in params}
            optim_state = optimizer.state_dict()
        if lead:
            write_checkpoint(ckpt_root, state["step"], {
                "trainable.safetensors": lambda p: save_file(weights, p),
                "optimizer.pt": lambda p: torch.save(optim_state, p),
                "scheduler.pt": lambda p: torch.save(scheduler.state_dict(), p),
                "rng.pt": lambda p: torch.save(rngs, p),
                "state.json": lambda p: write_text(p, json.dumps(state)),
                **({"scaler.pt": lambda p: torch.save(scaler.state_dict(), p)} if scaler else {}),
                **({BEST_FILE: lambda p: save_file({n: w.contiguous() for n, w in best_weights.items()}, p)}
                   if best_weights is not None else {}),
            }, {"stage": "train", "configHash": config_hash, "worldSize": world,
                "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                keep=hp.checkpoints_to_keep)
            if on_checkpoint is not None:
                on_checkpoint()
        if world > 1:
            dist.barrier()

    # 4. The loop.
    model.train()
    report(force=True)
    while state["step"] < total_steps and status == "completed":
        epoch, offset = divmod(state["step"], steps_per_epoch)
        order = epoch_order(len(tensors), epoch, hp.seed, world, rank)
        micro = [order[i:i + hp.batch_size] for i in range(0, len(order), hp.batch_size)]
        for first in range(offset * hp.gradient_accumulation_steps, len(micro), hp.gradient_accumulation_steps):
            group = [collate([tensors[j] for j in mb], pad_id, device)
                     for mb in micro[first:first + hp.gradient_accumulation_steps]]
            label_tokens = max(1, sum(b["label_tokens"] for b in group))
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            for k, batch in enumerate(group):
                if fsdp:
                    model.set_requires_gradient_sync(k == len(group) - 1)
                    sync = nullcontext()
                else:
                    sync = ddp.no_sync() if (world > 1 and k < len(group) - 1) else nullcontext()
                with sync:
                    loss, _ = token_losses(ddp, batch, amp)
                    loss_sum = loss.sum()
                    scaled = loss_sum / label_tokens
                    (scaler.scale(scaled) if scaler else scaled).backward()
                sums[0] += loss_sum.detach().double()
                sums[1] += batch["label_tokens"]
                sums[2] += batch["tokens"]
            if world > 1:
                dist.all_reduce(sums)
            step_loss = float(sums[0] / sums[1]) if sums[1] > 0 else 0.0
            if scaler:
                scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], hp.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if not math.isfinite(step_loss) or (scaler is None and not math.isfinite(grad_norm)):
                status, diverged_value = "diverged", (step_loss if not math.isfinite(step_loss) else grad_norm)
                optimizer.zero_grad(set_to_none=True)
                break
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += int(sums[2])
            steady_end = (time.monotonic(), state["tokens"])
            last_loss = round(step_loss, 6)
            if metrics_file:
                elapsed = time.monotonic() - t_start
                metrics_file.write(json.dumps({
                    "step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4),
                    "loss": step_loss, "learningRate": scheduler.get_last_lr()[0], "gradNorm": grad_norm,
                    "tokens": state["tokens"],
                    "tokensPerSecond": (state["tokens"] - tokens_at_start) / elapsed if elapsed else None,
                    "cpuSeconds": round(time.process_time() - cpu_start, 4),
                }) + "\n")
                metrics_file.flush()
            if first_step is None:  # steady-state throughput leaves out the warm-up step
                first_step = (time.monotonic(), state["tokens"])
            report()
            if state["step"] % eval_every == 0 or state["step"] == total_steps:
                val = validation_loss()
                if val is not None:
                    if metrics_file:
                        metrics_file.write(json.dumps({"step": state["step"], "valLoss": val}) + "\n")
                        metrics_file.flush()
                    es = hp.early_stopping
                    if state["bestVal"] is None or val < state["bestVal"] - (es.min_delta if es else 0.0):
                        state["bestVal"], state["bestStep"], state["badEvals"] = val, state["step"], 0
                        if es is not None:
                            best_weights = (gather_trainable(params, True) if fsdp else
                                            {n: p.detach().to("cpu", copy=True) for n, p in params})
                    else:
                        state["badEvals"] += 1
                        if es is not None and state["badEvals"] >= es.patience:
                            status = "earlyStopped"
            if ckpt_root and (state["step"] % hp.checkpoint_every_steps == 0
                              or state["step"] == total_steps or status != "completed"):
                checkpoint()
                report(force=True)
                if lead and os.environ.get(_CRASH_AFTER_ENV) == str(state["step"]):
                    os._exit(137)
            if state["step"] >= total_steps or status != "completed":
                break

    # 5. Save.
    duration = time.monotonic() - t_start
    if fsdp and status != "diverged":
        # rank 0 saves (and returns) an unsharded copy: the same adapted model rebuilt on the CPU
        # with the trained weights gathered from every rank
        final = best_weights if (status == "earlyStopped" and best_weights is not None) \
            else gather_trainable(params, lead)
        if lead:
            model, _ = build_trainable(cfg, model_dir, device=torch.device("cpu"), dtype=load_dtype)
            by_name = dict(model.named_parameters())
            for n, w in final.items():
                by_name[n].data.copy_(w)
    elif status == "earlyStopped" and best_weights is not None:
        by_name = dict(params)
        for n, w in best_weights.items():
            by_name[n].data.copy_(w.to(device))
    if metrics_file:
        metrics_file.close()
    saved = merged = None
    if train_dir and lead and status != "diverged":
        saved = os.path.join(train_dir, "model")
        _save_model_dir(model, model_dir, saved)
        if cfg.merged_model:
            if cfg.adaptation.method is AdaptationMethod.prefix:
                merged = None  # virtual tokens cannot be folded into the weights
            else:
                merged = os.path.join(train_dir, "merged")
                target = model.merge_and_unload() if cfg.adaptation.method.is_peft else model
                _save_model_dir(target, model_dir, merged)
    if world > 1:
        dist.barrier()
    trained = state["tokens"] - tokens_at_start
    steady = None
    if first_step and steady_end and steady_end[0] > first_step[0]:
        steady = (steady_end[1] - first_step[1]) / (steady_end[0] - first_step[0])
    outcome = {
        "status": status, "steps": state["step"], "totalSteps": total_steps,
        "stepsPerEpoch": steps_per_epoch, "epochs": round(state["step"] / steps_per_epoch, 4),
        "trainLoss": last_loss, "valLoss": state["bestVal"], "bestStep": state["bestStep"],
        "tokensTrained": state["tokens"], "tokensPerSecond": trained / duration if duration > 0 else None,
        "steadyTokensPerSecond": steady,
        "loopSeconds": round(duration, 3), "resumedFrom": resumed_from, "skippedCheckpoints": skipped,
        "worldSize": world,
        "device": str(device), "trainableParameters": plan.trainable_parameters,
        "totalParameters": plan.total_parameters,
        "model": "model" if saved else None, "mergedModel": "merged" if merged else None,
    }
    if status == "diverged":
        outcome["divergedAt"] = state["step"] + 1
        outcome["divergedValue"] = str(diverged_value)
    if progress is not None:
        report(force=True)
    return model, outcome


# ---------------------------------------------------------------------------------------------
# Ray Train entry point (each worker; or this process in local mode)


def train_worker(job: dict[str, Any]) -> dict[str, Any]:
    import ray.train

    cfg = TrainerConfig.model_validate(job["config"])
    rank = ray.train.get_context().get_world_rank()
    progress = None
    relay = job.get("relay")
    if rank == 0:
        if relay is not None:
            progress = lambda **doc: relay.update.remote(doc)  # noqa: E731 - fire and forget
        else:
            progress = _LOCAL_PROGRESS.get(job.get("progressKey", ""))
    device = None
    if cfg.resources.gpus_per_worker:
        import ray.train.torch

        try:
            device = ray.train.torch.get_device()  # this worker's GPU among those Ray made visible
        except Exception:  # noqa: BLE001 - local mode without a GPU context: fit() decides
            device = None
    run_dir, model_dir = job["runDir"], job["modelDir"]
    mirror = storage.RunMirror.for_output(cfg.output_uri)
    if mirror is not None:
        # s3 output: this worker's copy of the run directory (on another node than the driver it
        # starts empty): the prepared data, and the checkpoints to resume from
        run_dir = mirror.local
        if not os.path.exists(os.path.join(run_dir, "prep", "manifest.json")):
            mirror.pull("prep")
        mirror.pull(os.path.join("train", CHECKPOINTS))
    if not os.path.isdir(model_dir):  # resolved on the driver's node: fetch it here as well
        model_dir = storage.resolve_model_dir(cfg.model.uri, cfg.model.revision)
    train_rows = load_rows(run_dir, "train")
    val_rows = load_rows(run_dir, "validation")
    push = (lambda: mirror.push(f"train/{CHECKPOINTS}", delete=True)) if (mirror and rank == 0) else None
    _, outcome = fit(cfg, model_dir, train_rows, val_rows, config_hash=job["configHash"],
                     train_dir=os.path.join(run_dir, "train"), threads=job.get("threads"),
                     progress=progress, device=device, on_checkpoint=push)
    if mirror is not None and rank == 0:
        mirror.push("train")  # the model, merged model and metrics, for the driver to pull
    if rank == 0 and relay is not None:
        import ray as _ray

        _ray.get(relay.finish.remote(outcome))
    return outcome


RAY_RESTARTS = 3
"""Worker-group restarts Ray Train may make within one attempt (lost workers, failed starts)."""


def run_train(ctx: StageContext) -> dict[str, Any]:
    """Train with Ray Train; returns the train manifest (the outcome plus file names)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tailor_trainer.stages.adapt import preflight

    cfg = ctx.config
    preflight(cfg)
    if cfg.hyperparameters.packing and cfg.adaptation.method is AdaptationMethod.prefix:
        raise InvalidSpec("prefix tuning cannot be combined with packing (virtual tokens would be "
                          "shared by all packed examples); set hyperparameters.packing false",
                          field="spec.hyperparameters.packing")
    train_dir = ctx.stage_dir("train")
    res = cfg.resources
    local = use_local_mode(cfg)
    job: dict[str, Any] = {
        "config": cfg.model_dump(mode="json", by_alias=True), "configHash": ctx.config_hash,
        "runDir": os.path.abspath(ctx.run_dir), "modelDir": ctx.base_model_dir(),
        # cpusPerWorker threads, in local mode too: on a shared machine extra OpenMP threads that
        # wait for busy cores make a step many times slower, not faster.
        "threads": max(1, int(res.cpus_per_worker)),
    }
    # A lost worker (a deleted or preempted pod) restarts the worker group in place, resuming from
    # the last checkpoint, at most RAY_RESTARTS times; then the attempt fails and the operator's
    # retry (backoffLimit, a new cluster) takes over. Ray's defaults retry preemptions and
    # worker-group start failures forever, which can keep a run "Running" without end.
    run_config = RunConfig(name=f"{cfg.run.name}-train", storage_path=os.path.join(train_dir, "ray"),
                           failure_config=FailureConfig(max_failures=0, max_preemption_failures=RAY_RESTARTS,
                                                        controller_failure_limit=RAY_RESTARTS))
    ctx.progress(stage="train", message="starting workers" if not local else "starting")
    stop = threading.Event()
    poller = None
    if local:
        key = uuid.uuid4().hex
        _LOCAL_PROGRESS[key] = ctx.progress
        job["progressKey"] = key
        trainer = TorchTrainer(train_worker, train_loop_config=job,
                               scaling_config=ScalingConfig(num_workers=0), run_config=run_config)
    else:
        import ray

        ensure_ray(cfg)
        relay = start_relay()
        job["relay"] = relay

        def forward() -> None:
            seen, stopping = 0, False
            while not stopping:
                stopping = stop.wait(1.0)  # one last poll after training ended
                try:
                    seq, doc = ray.get(relay.poll.remote(), timeout=10)
                except Exception:  # noqa: BLE001 - progress is best effort
                    continue
                if doc is not None and seq != seen:
                    seen = seq
                    ctx.progress(**doc)

        poller = threading.Thread(target=forward, name="tailor-progress", daemon=True)
        poller.start()
        gpus = res.gpus_per_worker
        trainer = TorchTrainer(
            train_worker, train_loop_config=job,
            # SPREAD: one training worker per worker pod (fractional CPUs would let Ray pack two
            # into one pod, and then a lost pod takes two ranks while another idles)
            scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=gpus > 0, placement_strategy="SPREAD",
                                         resources_per_worker={"CPU": res.cpus_per_worker,
                                                               **({"GPU": gpus} if gpus else {})}),
            torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
            run_config=run_config)
    try:
        result = trainer.fit()
        outcome = result.return_value
        if outcome is None and not local:
            outcome = ray.get(job["relay"].result.remote())
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; surface ours
        inner = stage_error_in(e)
        if inner is not None:
            raise inner from e
        raise TrainingFailed(f"training failed: {type(e).__name__}: {str(e)[-2000:]}") from e
    finally:
        stop.set()
        if local:
            _LOCAL_PROGRESS.pop(job["progressKey"], None)
        if poller is not None:
            poller.join(timeout=15)
            ray.kill(job["relay"])
    if not outcome:
        raise TrainingFailed("training ended without a result from rank 0")
    if ctx.mirror is not None:
        ctx.mirror.pull("train")  # rank 0 may have run on another node
    if outcome["status"] == "diverged":
        raise Diverged(
            f"training loss became {outcome['divergedValue']} at step {outcome['divergedAt']} "
            f"(learning rate {cfg.hyperparameters.learning_rate:g}); lower "
            f"hyperparameters.learningRate or maxGradNorm, or use precision fp32/bf16",
            field="spec.hyperparameters.learningRate")
    shutil.rmtree(os.path.join(train_dir, "ray"), ignore_errors=True)
    checkpoints = [os.path.relpath(p, train_dir) for _, p in list_checkpoints(
        os.path.join(train_dir, CHECKPOINTS), ctx.config_hash)]
    return {**outcome, "checkpoints": checkpoints, "metrics": "metrics.jsonl",
            "mode": "local" if local else "workers", "workers": res.workers,
            "python": sys.version.split()[0]}
