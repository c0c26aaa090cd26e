"""The training recipe: :func:`fit`, the loop every Ray Train worker runs (and each
cross-validation fold).

Read :func:`fit` top to bottom: build the adapted model, plan the schedule (AdamW, the warmup
schedule), resume from the last complete checkpoint, then loop — one optimizer step over the
accumulated micro-batches (stopping on a NaN/Inf loss), log, validate (early stopping),
checkpoint — and save. :class:`TrainingRun` holds the state those steps share; each step is one
of its methods.

Speed (issue 14; each lever a hyperparameter, recorded in the outcome's ``speed``): the loss
comes from the last hidden states without full-vocabulary logits (``loss.py``), transformer
blocks may be compiled and the attention kernel chosen (``acceleration.py``), varlen kernels get
padding-free micro-batches, and a step's loss and gradient norm stay on the device until a
:meth:`TrainingRun.flush` (at most a second later, and before every validation and checkpoint).

Distributed: DDP (``DistributedDataParallel``) or, with ``resources.strategy`` fsdp, PyTorch
FSDP2 (``fully_shard``, one shard group per transformer block; helpers in ``fsdp.py``); fp16 on
a GPU uses a ``GradScaler``. Files, with a ``train_dir`` (docs/stage-contracts.md):
``checkpoints/step-N/`` (written to a temporary name, then renamed, with a manifest),
``metrics.jsonl``, ``model/`` (adapter or full model) and, with ``mergedModel``, ``merged/``.

Imports torch: only the train and evaluate stages import this module.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import uuid
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from tailor_trainer import adaptation
from tailor_trainer.acceleration import compile_blocks, lora_inputs_uncast, resolve_attention, resolve_compile
from tailor_trainer.batches import amp_context, as_tensors, collate, epoch_order, to_device
from tailor_trainer.checkpoints import (
    CHECKPOINTS,
    Resumable,
    choose_checkpoint,
    clean_partial,
    load_torch,
    rng_state,
    set_rng_state,
    write_checkpoint,
    write_text,
)
from tailor_trainer.config import AdaptationMethod, Precision, Strategy, TrainerConfig
from tailor_trainer.errors import DataInvalid, InvalidSpec
from tailor_trainer.fsdp import gather_trainable, load_sharded, shard_model
from tailor_trainer.loss import LossModel, resolve_fused_loss

# Early stopping's best trainable weights so far, kept in each checkpoint while early stopping is on.
BEST_FILE = "best.safetensors"
# Test-only fault injection: the process dies right after writing this checkpoint step.
_CRASH_AFTER_ENV = "TAILOR_FAULT_EXIT_AFTER_CHECKPOINT"
# Per-step figures stay on the device and reach the host (metrics.jsonl, progress, divergence)
# at the latest after this many seconds, and at every validation, checkpoint and the last step.
# Benches set TAILOR_FLUSH_SECONDS=0 (read when a run starts) to measure the old way: one host
# sync per step.
FLUSH_SECONDS = 1.0
_FLUSH_ENV = "TAILOR_FLUSH_SECONDS"


# ---------------------------------------------------------------------------------------------
# The recipe


def fit(cfg: TrainerConfig, model_dir: str, train_rows: list[dict], val_rows: list[dict], *,
        config_hash: str, train_dir: Optional[str] = None, threads: Optional[int] = None,
        progress: Optional[Callable[..., None]] = None, device: Any = None,
        on_checkpoint: Optional[Callable[[], None]] = None,
        on_validation: Optional[Callable[[int, float], None]] = None) -> tuple[Any, dict[str, Any]]:
    """Train on ``train_rows``; returns the (unwrapped) model and the outcome.

    With ``train_dir`` it checkpoints, resumes, logs ``metrics.jsonl`` and saves the final model
    there (the train stage); without, it only trains (a cross-validation fold). ``device``
    defaults to GPU ``LOCAL_RANK`` with ``gpusPerWorker``, else the CPU. ``on_checkpoint`` runs on
    rank 0 after each checkpoint is complete (the train stage pushes it to remote output there);
    ``on_validation(step, val_loss)`` on rank 0 after each validation (a search trial reports it
    to Ray Tune there, whose scheduler may end the trial).
    """
    device = pick_device(cfg, device, threads)
    if not train_rows:
        raise DataInvalid("the train split is empty", field="dataset")
    run = TrainingRun(cfg, model_dir, train_rows, val_rows, config_hash=config_hash, train_dir=train_dir,
                      progress=progress, device=device, on_checkpoint=on_checkpoint,
                      on_validation=on_validation)
    run.build_model()
    run.plan_schedule()
    run.resume()
    run.start()
    while run.step < run.total_steps and run.status == "completed":
        for group in run.micro_batch_groups():  # the rest of the current epoch
            if not run.train_step(group):
                break  # diverged
            run.report()
            if run.step % run.eval_every == 0 or run.step == run.total_steps:
                run.validate()
            if run.checkpoint_due():
                run.checkpoint()
                run.report(force=True)
                run.crash_if_asked()
            if run.step >= run.total_steps or run.status != "completed":
                break
    return run.finish()


def pick_device(cfg: TrainerConfig, device: Any, threads: Optional[int]) -> Any:
    """``device``, else GPU ``LOCAL_RANK`` with ``gpusPerWorker``, else the CPU (``threads`` threads)."""
    if device is None and cfg.resources.gpus_per_worker and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if threads:
            torch.set_num_threads(max(1, threads))
    return device


class TrainingRun:
    """The state the steps of :func:`fit` share, and the steps themselves, in the order fit
    calls them. ``state`` (step, tokens, best validation loss) is what a checkpoint saves."""

    def __init__(self, cfg: TrainerConfig, model_dir: str, train_rows: list[dict], val_rows: list[dict], *,
                 config_hash: str, train_dir: Optional[str], progress: Optional[Callable[..., None]],
                 device: Any, on_checkpoint: Optional[Callable[[], None]],
                 on_validation: Optional[Callable[[int, float], None]] = None):
        self.cfg, self.hp, self.model_dir = cfg, cfg.hyperparameters, model_dir
        self.train_rows, self.val_rows = train_rows, val_rows
        self.config_hash, self.train_dir, self.device = config_hash, train_dir, device
        self.progress, self.on_checkpoint, self.on_validation = progress, on_checkpoint, on_validation
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1
        self.lead = self.rank == 0
        self.fsdp = cfg.resources.strategy is Strategy.fsdp and self.world > 1
        self.ckpt_root = os.path.join(train_dir, CHECKPOINTS) if train_dir else None
        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "bestVal": None, "bestStep": None, "badEvals": 0}
        self.status = "completed"  # or "diverged", "earlyStopped"
        self.last_loss: Optional[float] = None
        self.diverged_value: Optional[float] = None
        self.resumed_from: Optional[int] = None
        self.found: Optional[Resumable] = None
        self.skipped: list[dict[str, Any]] = []
        self.best_weights: Optional[dict[str, Any]] = None
        self.metrics_file: Any = None

    @property
    def step(self) -> int:
        return self.state["step"]

    # -- 1. Model: base + adaptation, seeded so every rank builds the same one.

    def build_model(self) -> None:
        cfg, hp, device = self.cfg, self.hp, self.device
        torch.manual_seed(hp.seed)
        random.seed(hp.seed)
        self.amp, dtype = amp_context(hp.precision, device)
        self.dtype = dtype
        # Frozen weights may live in the compute dtype (PEFT keeps its adapters in fp32). Fully
        # trained weights stay fp32 (autocast does the low-precision math) except with an explicit
        # bf16: pure bf16 training, for models whose fp32 weights and optimizer state would not fit.
        pure_bf16 = hp.precision is Precision.bf16
        load_dtype = dtype if (cfg.adaptation.method.is_peft or pure_bf16) else torch.float32
        if cfg.adaptation.method.is_peft and dtype == torch.float16 and device.type == "cpu":
            load_dtype = torch.float32  # fp16 weights on CPU are slow and gain nothing
        self.load_dtype = load_dtype
        model, self.plan = adaptation.build_trainable(cfg, self.model_dir, device=device, dtype=load_dtype)
        base_config = getattr(model, "config", None)
        if base_config is not None:
            base_config.use_cache = False
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.attention = resolve_attention(hp.attention, inner, device)
        # varlen kernels keep documents apart in one padding-free sequence per micro-batch
        self.flatten = self.attention in ("flash_attention_2", "flex_attention")
        self.pad_id = next((v for v in (getattr(base_config, "pad_token_id", None),
                                        getattr(base_config, "eos_token_id", None)) if isinstance(v, int)), 0)
        if hp.gradient_checkpointing:
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            if not getattr(inner, "supports_gradient_checkpointing", False):
                raise InvalidSpec(f"{type(inner).__name__} does not support gradient checkpointing; set "
                                  "hyperparameters.gradientCheckpointing false",
                                  field="spec.hyperparameters.gradientCheckpointing")
            # non-reentrant: works with frozen inputs (PEFT), DDP, FSDP2, and replays dropout's RNG
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # exact under autocast; before compiling, which traces the flag
        self.lora_uncast = lora_inputs_uncast(model, dtype) > 0
        self.compiled, self.compile_note = resolve_compile(hp.compile, cfg, device)
        if self.compiled:  # the blocks, in place (parameter names unchanged), before FSDP wraps them
            self.compiled = compile_blocks(model) > 0
        self.loss_mode, self.loss_note = resolve_fused_loss(hp.fused_loss, model, device)
        if self.fsdp:
            shard_model(model, device.type, self.world)  # before the optimizer: it must hold the sharded parameters
        self.model = model
        self.loss_model = LossModel(model, self.loss_mode, self.amp)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # -- 2. Schedule: micro-batches per epoch per rank, optimizer steps, warmup; the optimizer.

    def plan_schedule(self) -> None:
        from transformers import get_scheduler

        hp, device = self.hp, self.device
        rows_per_rank = math.ceil(len(self.train_rows) / self.world)
        micro_per_epoch = math.ceil(rows_per_rank / hp.batch_size)
        self.steps_per_epoch = math.ceil(micro_per_epoch / hp.gradient_accumulation_steps)
        self.total_steps = hp.max_steps or max(1, math.ceil(hp.epochs_or_default * self.steps_per_epoch))
        warmup = math.ceil(hp.warmup_ratio * self.total_steps)
        self.eval_every = hp.eval_every_steps or (self.steps_per_epoch if hp.max_steps is None
                                                  else hp.checkpoint_every_steps)
        decay = [p for n, p in self.params if p.ndim >= 2]
        no_decay = [p for n, p in self.params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.learning_rate, fused=True)
        # fp16 on a GPU needs loss scaling; a skipped (overflowing) step is then normal, not divergence.
        self.scaler = (torch.amp.GradScaler("cuda") if (self.dtype == torch.float16 and device.type == "cuda")
                       else None)
        self.scheduler = get_scheduler(hp.scheduler.value, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total_steps)

    # -- 3. Resume from the newest verified checkpoint of this config (a corrupt one is skipped
    # and recorded); its .pt files load weights-only.

    def resume(self) -> None:
        if self.ckpt_root:
            if self.lead:
                clean_partial(self.ckpt_root)
            self.found, self.skipped = choose_checkpoint(self.ckpt_root, self.config_hash, self.world)
            if self.found:
                self._load_checkpoint(self.found)
        if self.train_dir and self.lead:
            self._open_metrics(os.path.join(self.train_dir, "metrics.jsonl"))

    def _load_checkpoint(self, found: Resumable) -> None:
        from safetensors.torch import load_file

        path, device = found.path, self.device
        if self.fsdp:
            weights = load_file(os.path.join(path, "trainable.safetensors"), device="cpu")
            load_sharded(self.model, self.optimizer, weights, load_torch(os.path.join(path, "optimizer.pt"), "cpu"))
        else:
            weights = load_file(os.path.join(path, "trainable.safetensors"), device=str(device))
            by_name = dict(self.params)
            for name, tensor in weights.items():
                by_name[name].data.copy_(tensor)
            self.optimizer.load_state_dict(load_torch(os.path.join(path, "optimizer.pt"), device))
        self.scheduler.load_state_dict(load_torch(os.path.join(path, "scheduler.pt")))
        with open(os.path.join(path, "state.json")) as f:
            self.state.update(json.load(f))
        if self.scaler and "scaler.pt" in found.files:
            self.scaler.load_state_dict(load_torch(os.path.join(path, "scaler.pt")))
        rng = load_torch(os.path.join(path, "rng.pt"))
        if len(rng) == self.world:
            set_rng_state(rng[self.rank])
        self.resumed_from = self.state["step"]

    def _open_metrics(self, metrics_path: str) -> None:
        kept = []
        if self.resumed_from and os.path.exists(metrics_path):  # drop what the lost steps logged
            with open(metrics_path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= self.resumed_from]
        self.metrics_file = open(metrics_path, "w")
        self.metrics_file.writelines(kept)
        self.metrics_file.flush()

    # -- 4. The loop: start, then per optimizer step train_step, report, validate, checkpoint.

    def start(self) -> None:
        """Wrap for DDP, tensorize the rows, take the best weights a resume carries, start the clocks."""
        model, device = self.model, self.device
        # DDP synchronizes gradients through its module's forward: the model and its loss, as one
        self.ddp = self.loss_model
        if self.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.loss_model,
                                               device_ids=[device.index] if device.type == "cuda" else None)
        self.tensors = [as_tensors(r) for r in self.train_rows]
        if self.found is not None and BEST_FILE in self.found.files:
            from safetensors.torch import load_file

            # early stopping's best weights so far: without them a resumed run that stops early
            # would keep its last weights instead of the best ones
            self.best_weights = load_file(os.path.join(self.found.path, BEST_FILE), device="cpu")
        self.t_start, self.tokens_at_start, self.step_at_start = time.monotonic(), self.state["tokens"], self.step
        self.cpu_start = time.process_time()
        self.first_step: Optional[tuple[float, int]] = None
        self.steady_end: Optional[tuple[float, int]] = None
        self.last_progress = 0.0
        # (step, learning rate, time, device tensor [loss sum, label tokens, tokens, padded tokens,
        # grad norm]) of the steps taken since the last flush
        self.pending: list[tuple[int, float, float, Any]] = []
        self.last_flush = time.monotonic()
        self.flush_seconds = float(os.environ.get(_FLUSH_ENV, FLUSH_SECONDS))
        self.real_tokens = self.padded_tokens = 0
        model.train()
        self.report(force=True)

    def micro_batch_groups(self) -> Iterator[list[dict[str, Any]]]:
        """The micro-batches of each optimizer step from the current step to the end of its epoch."""
        hp = self.hp
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        order = epoch_order(len(self.tensors), epoch, hp.seed, self.world, self.rank)
        micro = [order[i:i + hp.batch_size] for i in range(0, len(order), hp.batch_size)]
        for first in range(offset * hp.gradient_accumulation_steps, len(micro), hp.gradient_accumulation_steps):
            yield [collate([self.tensors[j] for j in mb], self.pad_id, self.device, flatten=self.flatten,
                           flash=self.attention == "flash_attention_2")
                   for mb in micro[first:first + hp.gradient_accumulation_steps]]

    def train_step(self, group: list[dict[str, Any]]) -> bool:
        """One optimizer step over the accumulated micro-batches. Its loss and gradient norm stay
        on the device (no host sync per step) until :meth:`flush`; a non-finite loss (or, without
        loss scaling, gradient norm) makes the fused AdamW skip the update on the device, and the
        next flush stops the run as diverged. False when the run has stopped."""
        optimizer, scaler, world = self.optimizer, self.scaler, self.world
        label_tokens = max(1, sum(b["label_tokens"] for b in group))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for k, batch in enumerate(group):
            if self.fsdp:
                self.model.set_requires_gradient_sync(k == len(group) - 1)
                sync = nullcontext()
            else:
                sync = self.ddp.no_sync() if (world > 1 and k < len(group) - 1) else nullcontext()
            with sync:
                loss = self.ddp(batch)
                scaled = loss / label_tokens
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.detach().double()
        counts = [sum(b[key] for b in group) for key in ("label_tokens", "tokens", "padded_tokens")]
        stats = torch.cat([loss_sum.reshape(1), to_device(torch.tensor(counts, dtype=torch.float64), self.device)])
        if world > 1:
            dist.all_reduce(stats)
        if scaler:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.hp.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if scaler:
            scaler.step(optimizer)  # skips a step whose gradients overflowed: normal with fp16
            scaler.update()
        else:
            optimizer.found_inf = (~(torch.isfinite(stats[0]) & torch.isfinite(norm))).float()
            optimizer.step()
            del optimizer.found_inf
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.pending.append((self.step, self.scheduler.get_last_lr()[0], time.monotonic(),
                             torch.cat([stats, norm.detach().double().reshape(1)])))
        # the first step is flushed at once: the steady-state clock starts when it has finished
        if (self.first_step is None or time.monotonic() - self.last_flush >= self.flush_seconds
                or self.step >= self.total_steps or self.step % self.eval_every == 0 or self.checkpoint_due()):
            self.flush()
        return self.status == "completed"

    def flush(self) -> None:
        """Bring the pending steps' figures to the host (one sync): log them, count their tokens,
        and stop the run as diverged at the first non-finite one (its update was skipped)."""
        if not self.pending:
            return
        values = torch.stack([p[3] for p in self.pending]).tolist()
        pending, self.pending = self.pending, []
        self.last_flush = time.monotonic()
        # On a GPU the host runs ahead of the device: the last pending step has finished only by
        # now (the sync above), so that is its time, for honest steady-state tokens/s.
        last = pending[-1]
        pending[-1] = (last[0], last[1], self.last_flush, last[3])
        for (step, lr, at, _), (loss_sum, labels, tokens, padded, grad_norm) in zip(pending, values):
            step_loss = loss_sum / labels if labels > 0 else 0.0
            if not math.isfinite(step_loss) or (self.scaler is None and not math.isfinite(grad_norm)):
                self.status = "diverged"
                self.diverged_value = step_loss if not math.isfinite(step_loss) else grad_norm
                self.state["step"] = step - 1  # the steps after it are discarded with the run
                return
            self.state["tokens"] += int(tokens)
            self.real_tokens += int(tokens)
            self.padded_tokens += int(padded)
            self.steady_end = (at, self.state["tokens"])
            self.last_loss = round(step_loss, 6)
            self._log_step(step, lr, at, step_loss, grad_norm)

    def _log_step(self, step: int, lr: float, at: float, step_loss: float, grad_norm: float) -> None:
        if self.metrics_file:
            elapsed = at - self.t_start
            self._log({
                "step": step, "epoch": round(step / self.steps_per_epoch, 4),
                "loss": step_loss, "learningRate": lr, "gradNorm": grad_norm,
                "tokens": self.state["tokens"],
                "tokensPerSecond": (self.state["tokens"] - self.tokens_at_start) / elapsed if elapsed else None,
                "cpuSeconds": round(time.process_time() - self.cpu_start, 4),
            })
        if self.first_step is None:  # steady-state throughput leaves out the warm-up step
            self.first_step = (at, self.state["tokens"])

    def _log(self, line: dict[str, Any]) -> None:
        self.metrics_file.write(json.dumps(line) + "\n")
        self.metrics_file.flush()

    def report(self, force: bool = False, **extra: Any) -> None:
        """Progress to the callback: at most once a second unless ``force``."""
        now = time.monotonic()
        if self.progress is None or (not force and now - self.last_progress < 1.0):
            return
        self.last_progress = now
        done = self.step - self.step_at_start
        elapsed = now - self.t_start
        tps = (self.state["tokens"] - self.tokens_at_start) / elapsed if elapsed > 0 else None
        eta = (self.total_steps - self.step) * elapsed / done if done else None
        extra.setdefault("message", None)
        self.progress(stage="train", step=self.step, totalSteps=self.total_steps,
                      epoch=round(self.step / self.steps_per_epoch, 3), loss=self.last_loss,
                      tokensPerSecond=round(tps, 1) if tps else None,
                      etaSeconds=int(eta) if eta is not None else None, **extra)

    def validate(self) -> None:
        """Validation loss, logged; tracks the best (and its weights, with early stopping) and
        stops early after ``patience`` evaluations without improvement."""
        val = self.validation_loss()
        if val is None:
            return
        if self.metrics_file:
            self._log({"step": self.step, "valLoss": val})
        state, es = self.state, self.hp.early_stopping
        if state["bestVal"] is None or val < state["bestVal"] - (es.min_delta if es else 0.0):
            state["bestVal"], state["bestStep"], state["badEvals"] = val, self.step, 0
            if es is not None:
                self.best_weights = (gather_trainable(self.params, True) if self.fsdp else
                                     {n: p.detach().to("cpu", copy=True) for n, p in self.params})
        else:
            state["badEvals"] += 1
            if es is not None and state["badEvals"] >= es.patience:
                self.status = "earlyStopped"
        if self.on_validation is not None and self.lead:
            self.on_validation(self.step, val)

    def validation_loss(self) -> Optional[float]:
        val_rows, model, world, fsdp = self.val_rows, self.model, self.world, self.fsdp
        if not val_rows:
            return None
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        mine = val_rows[self.rank::world]
        # FSDP: every rank must run the same number of forwards (each gathers the layers); a rank
        # with a row fewer runs one more on a row it does not count.
        per_rank = math.ceil(len(val_rows) / world) if fsdp else len(mine)
        batch_size = self.hp.batch_size
        with torch.no_grad():
            for i in range(0, per_rank, batch_size):
                rows, counted = mine[i:i + batch_size], True
                if not rows:
                    rows, counted = val_rows[:1], False
                batch = collate(rows, self.pad_id, self.device, flatten=self.flatten,
                                flash=self.attention == "flash_attention_2")
                loss = self.loss_model(batch)
                if counted:
                    sums[0] += loss.double()
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

    def checkpoint_due(self) -> bool:
        return bool(self.ckpt_root) and (self.step % self.hp.checkpoint_every_steps == 0
                                         or self.step == self.total_steps or self.status != "completed")

    def checkpoint(self) -> None:
        """Write ``checkpoints/step-N/`` (rank 0; under FSDP every rank takes part in gathering)."""
        from safetensors.torch import save_file

        world, lead, params, state = self.world, self.lead, self.params, self.state
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.fsdp:  # collectives: every rank takes part, rank 0 receives the full tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            weights = gather_trainable(params, lead)
            optim_state = get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif lead:
            weights = {n: p.detach().to("cpu").contiguous() for n, p in params}
            optim_state = self.optimizer.state_dict()
        if lead:
            scaler, best_weights = self.scaler, self.best_weights
            write_checkpoint(self.ckpt_root, state["step"], {
                "trainable.safetensors": lambda p: save_file(weights, p),
                "optimizer.pt": lambda p: torch.save(optim_state, p),
                "scheduler.pt": lambda p: torch.save(self.scheduler.state_dict(), p),
                "rng.pt": lambda p: torch.save(rngs, p),
                "state.json": lambda p: write_text(p, json.dumps(state)),
                **({"scaler.pt": lambda p: torch.save(scaler.state_dict(), p)} if scaler else {}),
                **({BEST_FILE: lambda p: save_file({n: w.contiguous() for n, w in best_weights.items()}, p)}
                   if best_weights is not None else {}),
            }, {"stage": "train", "configHash": self.config_hash, "worldSize": world,
                "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                keep=self.hp.checkpoints_to_keep)
            if self.on_checkpoint is not None:
                self.on_checkpoint()
        if world > 1:
            dist.barrier()

    def crash_if_asked(self) -> None:
        if self.lead and os.environ.get(_CRASH_AFTER_ENV) == str(self.step):
            os._exit(137)

    # -- 5. Save.

    def finish(self) -> tuple[Any, dict[str, Any]]:
        """Keep the final (or, stopped early, the best) weights, save the model, return the outcome."""
        self.flush()
        duration = time.monotonic() - self.t_start
        self._final_weights()
        if self.metrics_file:
            self.metrics_file.close()
        saved, merged = self._save_final()
        if self.world > 1:
            dist.barrier()
        outcome = self._outcome(duration, saved, merged)
        if self.progress is not None:
            self.report(force=True)
        return self.model, outcome

    def _final_weights(self) -> None:
        status, best_weights = self.status, self.best_weights
        if self.fsdp and status != "diverged":
            # rank 0 saves (and returns) an unsharded copy: the same adapted model rebuilt on the CPU
            # with the trained weights gathered from every rank
            final = best_weights if (status == "earlyStopped" and best_weights is not None) \
                else gather_trainable(self.params, self.lead)
            if self.lead:
                self.model, _ = adaptation.build_trainable(self.cfg, self.model_dir, device=torch.device("cpu"),
                                                           dtype=self.load_dtype)
                by_name = dict(self.model.named_parameters())
                for n, w in final.items():
                    by_name[n].data.copy_(w)
        elif status == "earlyStopped" and best_weights is not None:
            by_name = dict(self.params)
            for n, w in best_weights.items():
                by_name[n].data.copy_(w.to(self.device))

    def _save_final(self) -> tuple[Optional[str], Optional[str]]:
        cfg, train_dir = self.cfg, self.train_dir
        saved = merged = None
        if train_dir and self.lead and self.status != "diverged":
            saved = os.path.join(train_dir, "model")
            save_model_dir(self.model, self.model_dir, saved)
            if cfg.merged_model:
                if cfg.adaptation.method is AdaptationMethod.prefix:
                    merged = None  # virtual tokens cannot be folded into the weights
                else:
                    merged = os.path.join(train_dir, "merged")
                    target = self.model.merge_and_unload() if cfg.adaptation.method.is_peft else self.model
                    save_model_dir(target, self.model_dir, merged)
        return saved, merged

    def speed_levers(self) -> dict[str, Any]:
        """The speed levers this run used (hyperparameters.fusedLoss, compile, attention, packing)
        and, where one was turned off or changed, why."""
        notes = {k: v for k, v in (("fusedLoss", self.loss_note), ("compile", self.compile_note)) if v}
        return {"fusedLoss": self.loss_mode, "compile": self.compiled, "attention": self.attention,
                "paddingFree": self.flatten, "packing": self.hp.packing, "loraInputsUncast": self.lora_uncast,
                **({"notes": notes} if notes else {})}

    def _outcome(self, duration: float, saved: Optional[str], merged: Optional[str]) -> dict[str, Any]:
        state = self.state
        trained = state["tokens"] - self.tokens_at_start
        steady = None
        first_step, steady_end = self.first_step, self.steady_end
        if first_step and steady_end and steady_end[0] > first_step[0]:
            steady = (steady_end[1] - first_step[1]) / (steady_end[0] - first_step[0])
        outcome = {
            "status": self.status, "steps": state["step"], "totalSteps": self.total_steps,
            "stepsPerEpoch": self.steps_per_epoch, "epochs": round(state["step"] / self.steps_per_epoch, 4),
            "trainLoss": self.last_loss, "valLoss": state["bestVal"], "bestStep": state["bestStep"],
            "tokensTrained": state["tokens"], "tokensPerSecond": trained / duration if duration > 0 else None,
            "steadyTokensPerSecond": steady,
            "loopSeconds": round(duration, 3), "resumedFrom": self.resumed_from, "skippedCheckpoints": self.skipped,
            "worldSize": self.world,
            "device": str(self.device), "trainableParameters": self.plan.trainable_parameters,
            "totalParameters": self.plan.total_parameters,
            "model": "model" if saved else None, "mergedModel": "merged" if merged else None,
            # real tokens / tokens the model ran on (padding included), all ranks
            "paddingEfficiency": (round(self.real_tokens / self.padded_tokens, 4)
                                  if self.padded_tokens else None),
            "speed": self.speed_levers(),
        }
        if self.status == "diverged":
            outcome["divergedAt"] = state["step"] + 1
            outcome["divergedValue"] = str(self.diverged_value)
        return outcome


# ---------------------------------------------------------------------------------------------
# Saving


def save_model_dir(model: Any, model_dir: str, out: str) -> None:
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
