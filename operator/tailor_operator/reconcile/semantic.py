"""Checks admission cannot do because they need another object: the Dataset, the model's modules.

Module names come from a small table keyed by the model's `config.json` `model_type`; models
the table does not know are left to the trainer (which lists the modules that exist).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import FineTuneJob

_LLAMA = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
          "lm_head", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "norm", "act_fn"}
MODULES: dict[str, set[str]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA | {"q_norm", "k_norm"},
    "gemma": _LLAMA,
    "gemma2": _LLAMA | {"pre_feedforward_layernorm", "post_feedforward_layernorm"},
    "gpt2": {"c_attn", "c_proj", "c_fc", "wte", "wpe", "lm_head", "attn", "mlp", "ln_1", "ln_2", "ln_f"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "embed_in", "embed_out",
                 "attention", "mlp", "input_layernorm", "post_attention_layernorm", "final_layer_norm"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "embed_tokens", "embed_positions",
            "lm_head", "self_attn", "self_attn_layer_norm", "final_layer_norm"},
    "phi": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "embed_tokens", "lm_head", "self_attn",
            "mlp", "input_layernorm", "final_layernorm"},
}


@dataclass(frozen=True)
class SpecProblem:
    reason: str
    message: str
    field: str


def model_modules(model_config: Optional[dict[str, Any]]) -> Optional[set[str]]:
    if not model_config:
        return None
    return MODULES.get(str(model_config.get("model_type", "")))


def check_target_modules(job: FineTuneJob, model_config: Optional[dict[str, Any]]) -> Optional[SpecProblem]:
    """Target modules that match nothing in the model, when the model's family is known."""
    known = model_modules(model_config)
    if known is None:
        return None
    adaptation = job.spec.adaptation
    checks: list[tuple[str, Optional[list[str]]]] = []
    if adaptation.method.is_lora_family and adaptation.lora is not None:
        checks.append(("spec.adaptation.lora.targetModules", adaptation.lora.target_modules))
    checks.append(("spec.adaptation.ia3TargetModules", adaptation.ia3_target_modules))
    for field, patterns in checks:
        unknown = [p for p in patterns or [] if p.split(".")[-1] not in known]
        if unknown:
            model_type = model_config.get("model_type") if model_config else "?"
            return SpecProblem(
                "UnknownTargetModules",
                f"{field}: {', '.join(unknown)} not found in {model_type} model "
                f"{job.spec.base_model.uri}; it has: {', '.join(sorted(known))}",
                field,
            )
    return None
