"""Speed levers of the training step: the attention kernel (``hyperparameters.attention``),
``torch.compile`` per transformer block (``hyperparameters.compile``) and LoRA inputs left in
the autocast dtype (``lora_inputs_uncast``). The loss lever is in
``loss.py``; packing is a prep-stage matter (``data/pack.py``).

Each lever resolves ``auto`` against the device and the installed packages, and falls back, with
a logged reason, where it cannot apply; the training outcome records what was used
(``speed``).

Imports torch: only training imports this module.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from tailor_trainer.config import AdaptationMethod, Attention, TrainerConfig

log = logging.getLogger("tailor_trainer")


def flash_attention_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:
        return False
    return bool(is_flash_attn_2_available())


def resolve_attention(choice: Attention, model: Any, device: Any) -> str:
    """Set the model's attention kernel; returns its name. auto: flash_attention_2 on CUDA with
    flash-attn installed, else the model's default (sdpa)."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    want = choice.value
    if want == "auto":
        want = "flash_attention_2" if device.type == "cuda" and flash_attention_available() else current
    elif want == "flash_attention_2" and not (device.type == "cuda" and flash_attention_available()):
        log.warning("attention flash_attention_2 needs a CUDA GPU and the flash-attn package: using sdpa")
        want = "sdpa"
    if want != current:
        try:
            model.set_attn_implementation(want)
        except (ValueError, ImportError, AttributeError) as e:
            log.warning("attention %s is not available for %s (%s): using %s", want, type(model).__name__, e, current)
            want = current
    return want


def resolve_compile(flag: Optional[bool], cfg: TrainerConfig, device: Any) -> tuple[bool, Optional[str]]:
    """Whether to compile the blocks, and why not where it was asked for (or auto) but cannot be.
    Unset: on CUDA only (on the CPU compiling takes longer than a short run saves)."""
    want = device.type == "cuda" if flag is None else flag
    if not want:
        return False, None
    why = None
    if cfg.adaptation.method is AdaptationMethod.qlora:
        why = "bitsandbytes 4-bit layers do not compile: blocks run uncompiled"
    elif not torch._dynamo.is_dynamo_supported():
        why = "torch.compile is not supported on this Python: blocks run uncompiled"
    if why is not None:
        if flag:
            log.warning("compile: %s", why)
        return False, why
    return True, None


def compile_blocks(model: Any) -> int:
    """Compile each transformer block (the classes the model lists in ``_no_split_modules``, as
    FSDP shards them) in place with ``Module.compile``: parameter names stay the same, activation
    checkpointing wraps the compiled block, and FSDP2's hooks (added afterwards) run eagerly
    (dynamo skips FSDP hooks). Returns how many blocks were compiled."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile()
    if not blocks:
        log.warning("compile: %s names no transformer block class: nothing compiled", type(inner).__name__)
    return len(blocks)


# Bench only: "1" keeps PEFT's cast of every LoRA input to the adapter's dtype, to measure that alone.
_PEFT_INPUT_CAST_ENV = "TAILOR_PEFT_INPUT_CAST"


def lora_inputs_uncast(model: Any, amp_dtype: Any) -> int:
    """Under bf16/fp16 autocast, stop PEFT from casting each LoRA layer's input to the adapter's
    fp32 dtype (a full fp32 copy of the activations per adapted layer, every step): autocast
    casts the input back to the compute dtype for the adapter's matmul anyway, so the result is
    bit-identical (bf16 -> fp32 -> bf16 is exact) without the round trip. PEFT's own switch
    (``cast_input_dtype_enabled``, what ``peft.helpers.disable_input_dtype_casting`` sets).
    Returns the number of layers changed (0 without autocast or adapters)."""
    if amp_dtype not in (torch.bfloat16, torch.float16) or os.environ.get(_PEFT_INPUT_CAST_ENV) == "1":
        return 0
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)
