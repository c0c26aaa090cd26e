"""The diffusers pipeline's parts, LoRA on the UNet, and the adapter on disk.

The adapter is what ``diffusers``' own LoRA training script writes
(``pytorch_lora_weights.safetensors`` with ``unet.``-prefixed keys, via
``StableDiffusionPipeline.save_lora_weights``), so ``pipe.load_lora_weights(dir)`` loads it onto
the base pipeline, and evaluation loads it exactly that way too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from tailor_trainer.config import LoraConfig, TrainerConfig
from tailor_trainer.errors import InvalidSpec, ModelInvalid

MODEL_INDEX = "model_index.json"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The UNet's attention projections (self- and cross-attention), as diffusers' LoRA script adapts."""
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
PIPELINES = ("StableDiffusionPipeline",)
FIELD_MODEL = "spec.baseModel.uri"
FIELD_TARGETS = "spec.adaptation.lora.targetModules"


def is_diffusers_dir(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, MODEL_INDEX))


def check_pipeline(model_dir: str) -> dict[str, Any]:
    """The model_index.json of a supported pipeline, else ModelInvalid naming the field."""
    path = os.path.join(model_dir, MODEL_INDEX)
    if not os.path.isfile(path):
        raise ModelInvalid(f"{model_dir} has no {MODEL_INDEX}: a Dataset of schema image-caption needs a diffusers "
                           "Stable-Diffusion-architecture pipeline (unet, vae, text_encoder, tokenizer, scheduler)",
                           field=FIELD_MODEL)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelInvalid(f"cannot read {path}: {e}", field=FIELD_MODEL) from e
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        raise ModelInvalid(f"{model_dir}: pipeline {kind!r} is not supported; supported: {', '.join(PIPELINES)} "
                           "(docs/image-models.md)", field=FIELD_MODEL)
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if c not in index]
    if missing:
        raise ModelInvalid(f"{model_dir}: the pipeline has no {', '.join(missing)}", field=FIELD_MODEL)
    return index


@dataclass
class Parts:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any

    @property
    def resolution(self) -> int:
        return resolution_of(self.unet.config, self.vae.config)


def resolution_of(unet_config: Any, vae_config: Any) -> int:
    return int(unet_config.sample_size) * 2 ** (len(vae_config.block_out_channels) - 1)


def read_resolution(model_dir: str) -> int:
    """The training resolution from the configs alone (no weights): UNet sample size x VAE scale."""
    from types import SimpleNamespace

    def cfg(sub: str) -> Any:
        with open(os.path.join(model_dir, sub, "config.json"), encoding="utf-8") as f:
            return SimpleNamespace(**json.load(f))

    check_pipeline(model_dir)
    return resolution_of(cfg("unet"), cfg("vae"))


def load_tokenizer(model_dir: str) -> Any:
    from transformers import CLIPTokenizer

    check_pipeline(model_dir)
    return CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")


def load_parts(model_dir: str, device: Any = None, meta: bool = False) -> Parts:
    """The frozen parts; ``meta`` builds the UNet from its config only (the adapt stage's check)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    check_pipeline(model_dir)
    if meta:
        import torch

        config = UNet2DConditionModel.load_config(model_dir, subfolder="unet")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        return Parts(unet, None, None, None, None)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    tokenizer = load_tokenizer(model_dir)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        if device is not None:
            m.to(device)
    vae.eval()
    text_encoder.eval()
    return Parts(unet, vae, text_encoder, tokenizer, scheduler)


def targets_of(lora: Optional[LoraConfig]) -> list[str]:
    return list(lora.target_modules) if lora is not None and lora.target_modules else list(DEFAULT_TARGETS)


def check_targets(unet: Any, targets: list[str]) -> list[str]:
    """Every pattern matches a Linear/Conv module of the UNet (by name or name suffix), else
    InvalidSpec listing the attention projections that exist. Returns the matched names."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    names = [n for n, m in unet.named_modules() if isinstance(m, kinds)]
    matched, unknown = [], []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        (matched.extend(hits) if hits else unknown.append(t))
    if unknown:
        attn = sorted({n.split("attn1.")[-1] for n in names if ".attn1." in n}
                      | {n.split("attn2.")[-1] for n in names if ".attn2." in n})
        raise InvalidSpec(f"target module(s) {', '.join(map(repr, unknown))} match nothing in the UNet; its "
                          f"attention projections are {', '.join(attn) or '(none)'}", field=FIELD_TARGETS)
    return sorted(set(matched))


def add_lora(unet: Any, lora: Optional[LoraConfig]) -> dict[str, Any]:
    """Freeze the UNet and add a LoRA adapter (``unet.add_adapter``, PEFT); returns the plan."""
    from peft import LoraConfig as PeftLora

    lora = lora or LoraConfig()
    targets = targets_of(lora)
    matched = check_targets(unet, targets)
    unet.requires_grad_(False)
    unet.add_adapter(PeftLora(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              init_lora_weights="gaussian", target_modules=targets))
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    return {"method": "lora", "component": "unet", "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
            "targetModules": targets, "adaptedModules": len(matched), "trainableParameters": trainable,
            "totalParameters": total, "trainablePercent": round(100.0 * trainable / total, 4)}


def lora_state(unet: Any) -> dict[str, Any]:
    """The adapter's tensors in the diffusers LoRA layout (what save_lora_weights expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_adapter(unet: Any, out: str, cfg: TrainerConfig) -> None:
    from diffusers import StableDiffusionPipeline

    os.makedirs(out, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(save_directory=out, unet_lora_layers=lora_state(unet),
                                              safe_serialization=True)
    with open(os.path.join(out, "tailor_adapter.json"), "w", encoding="utf-8") as f:
        json.dump({"format": "diffusers-lora", "file": ADAPTER_FILE, "baseModel": cfg.model.uri,
                   "load": "StableDiffusionPipeline.from_pretrained(base).load_lora_weights(this folder)"},
                  f, indent=2)


def load_pipeline(model_dir: str, adapter_dir: Optional[str] = None, device: Any = None) -> Any:
    """The base pipeline, with the adapter loaded the standard way when given."""
    from diffusers import StableDiffusionPipeline

    check_pipeline(model_dir)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    if adapter_dir is not None:
        pipe.load_lora_weights(adapter_dir)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
