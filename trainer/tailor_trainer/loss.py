"""The training loss without the full-vocabulary logits (``hyperparameters.fusedLoss``).

A causal LM's logits for a micro-batch are ``[B, L, V]``: at V = 128k and 16k tokens, 8 GiB in
float32, plus as much again for their gradient. Only the labelled positions need them, and only a
chunk at a time:

- ``chunked``: the decoder's last hidden states at the labelled positions (indices computed on
  the host by ``collate``, so selecting them needs no device sync), then ``lm_head`` and
  cross-entropy over chunks of at most ``chunk_tokens`` positions, each under non-reentrant
  activation checkpointing, so a chunk's logits are freed after its forward and recomputed in
  the backward (one extra ``lm_head`` matmul). Plain PyTorch: runs everywhere, LoRA on lm_head
  included.
- ``liger``: Liger Kernel's fused linear cross-entropy (Triton; CUDA only), which computes the
  gradient in the forward pass and never stores logits. Needs a plain ``nn.Linear`` head.
- ``none``: the model's own logits for every position, as before.

:class:`LossModel` holds the model and its loss as one module whose forward returns the loss sum:
DDP synchronizes gradients only through its wrapped module's forward, and FSDP2's root gathers
the head's weights in the model's forward, so the head runs inside the same call. The decoder's
output is taken with a forward hook; the model's own head is asked for one position only
(``logits_to_keep=1``).

Imports torch: only training imports this module.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tailor_trainer.batches import IGNORE_INDEX
from tailor_trainer.config import FusedLoss

log = logging.getLogger("tailor_trainer")

# Logits of one chunk stay under ~256 MiB in float32 (2**26 values): 512 positions at V = 128k.
CHUNK_VALUES = 1 << 26
# Config attributes of models whose logits are more than lm_head(hidden): soft-capping, scales.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or no Triton/CUDA for it
        return False
    return True


def resolve_fused_loss(choice: FusedLoss, model: Any, device: Any) -> tuple[str, Optional[str]]:
    """The loss path to use (none, chunked, liger) and, when it differs from what was asked for,
    why. auto: liger on CUDA when installed, else chunked (on the CPU too: lm_head runs only at
    labelled positions, which pays for the recomputation; bench/train.py)."""
    want = choice.value
    if want == "auto":
        want = "liger" if device.type == "cuda" and liger_available() else "chunked"
    if want == "none":
        return "none", None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    peft_config = getattr(model, "peft_config", None) or {}
    why = None
    if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        why = "prefix tuning feeds the decoder virtual tokens: the model's own logits are used"
    elif any(getattr(config, a, None) for a in _LOGIT_TRANSFORMS):
        why = f"{type(base).__name__} transforms its logits beyond lm_head: the model's own logits are used"
    elif "logits_to_keep" not in inspect.signature(base.forward).parameters:
        why = f"{type(base).__name__}.forward has no logits_to_keep: the model's own logits are used"
    else:
        try:
            base.get_decoder()
            head = base.get_output_embeddings()
        except Exception:  # noqa: BLE001 - exotic layouts
            head = None
        if head is None:
            why = f"{type(base).__name__} has no decoder/lm_head pair: the model's own logits are used"
    if why is not None:
        if choice is not FusedLoss.auto:
            log.warning("fusedLoss %s: %s", choice.value, why)
        return "none", why
    if want == "liger":
        if device.type != "cuda" or not liger_available():
            why = "liger needs a CUDA GPU and the liger-kernel package: using chunked"
            want = "chunked"
        elif type(base.get_output_embeddings()) is not torch.nn.Linear:
            why = "lm_head is adapted (LoRA) or not a plain Linear, which liger cannot fuse: using chunked"
            want = "chunked"
        if why and choice is not FusedLoss.auto:
            log.warning("fusedLoss liger: %s", why)
    return want, why


class LossModel(torch.nn.Module):
    """``model`` plus its loss; ``forward(batch)`` returns the summed next-token loss of the
    micro-batch (float32, a scalar) — what the training step divides by its label count."""

    def __init__(self, model: Any, mode: str, amp: Any):
        super().__init__()
        self.model = model
        self.mode, self.amp = mode, amp
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._hidden: Optional[torch.Tensor] = None
        self._capture = False
        if mode != "none":
            self.head = base.get_output_embeddings()
            self.chunk_tokens = max(128, CHUNK_VALUES // max(1, int(self.head.weight.shape[0])))
            self._hook = base.get_decoder().register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module: Any, args: Any, output: Any) -> None:
        if self._capture:
            self._hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.mode == "none":
            return plain_token_losses(self.model, batch, self.amp).sum()
        return self.labelled_losses(self._last_hidden(batch), batch).sum()

    def position_losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """``[B, L]``: the loss of predicting each position's next token (0 where unlabelled),
        the same numbers as ``batches.token_losses`` plus a zero column."""
        shape = batch["input_ids"].shape
        if self.mode == "none":
            return F.pad(plain_token_losses(self.model, batch, self.amp), (0, 1))
        losses = self.labelled_losses(self._last_hidden(batch), batch)
        if self.mode == "liger":
            raise ValueError("liger computes the loss sum only")
        flat = losses.new_zeros(shape.numel())
        return flat.index_copy(0, batch["target_index"], losses).view(shape)

    def _last_hidden(self, batch: dict[str, Any]) -> torch.Tensor:
        self._capture = True
        try:
            with self.amp:
                self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           logits_to_keep=1, **batch.get("attention_kwargs", {}))
            hidden, self._hidden = self._hidden, None
        finally:
            self._capture = False
        if hidden is None:
            raise RuntimeError("the decoder's forward hook did not fire")
        return hidden

    def labelled_losses(self, hidden: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Per-position losses at the labelled positions, in ``batch["target_index"]`` order."""
        index, targets = batch["target_index"], batch["targets"]
        h = hidden.reshape(-1, hidden.size(-1)).index_select(0, index)
        if h.size(0) == 0:  # no labels: a zero that still reaches every parameter (DDP waits for all)
            with self.amp:
                return (self.head(hidden[:, :1]).float().sum() * 0.0).reshape(1)
        if self.mode == "liger":
            with self.amp:
                return _liger_sum(h, self.head.weight, targets).reshape(1)
        n, step = h.size(0), self.chunk_tokens
        parts = []
        for i in range(0, n, step):
            hc, tc = h[i:i + step], targets[i:i + step]
            if torch.is_grad_enabled():
                parts.append(checkpoint(_chunk_losses, self.head, hc, tc, self.amp, use_reentrant=False))
            else:
                parts.append(_chunk_losses(self.head, hc, tc, self.amp))
        return torch.cat(parts)


def _chunk_losses(head: Any, h: torch.Tensor, targets: torch.Tensor, amp: Any) -> torch.Tensor:
    with amp:
        logits = head(h)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _liger_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    if torch.is_autocast_enabled("cuda"):  # the weights of full fine-tuning stay fp32 under autocast
        dtype = torch.get_autocast_dtype("cuda")
        h, weight = h.to(dtype), weight.to(dtype)
    elif h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(weight, h, targets)
    out = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return out.float()


def plain_token_losses(model: Any, batch: dict[str, Any], amp: Any) -> torch.Tensor:
    """Per-token loss ``[B, L-1]`` from the model's full logits (``fusedLoss`` none)."""
    from tailor_trainer.batches import token_losses

    loss, _ = token_losses(model, batch, amp)
    return loss
