"""Adaptation: turn the pretrained model into the model that will be trained.

A library shared by the adapt, train and evaluate stages and by preflight. One function,
:func:`apply_adaptation`, does the whole change in a fixed order (activation swap, block
expansion, then freezing or a PEFT method) and is used four times: by the adapt stage and by
preflight on a weightless skeleton (meta device) to check the spec and count trainable
parameters before any heavy work, by every training worker on the real weights (same seed, same
result), and by evaluate to rebuild the base an adapter belongs to.

Methods: lora, dora, qlora (4-bit base; GPU only), ia3, prefix (PEFT); full (every weight);
freeze (full fine-tuning of what the freeze/addLayers rules leave trainable). Block expansion
follows LLaMA-Pro: each inserted block is a copy of the block before it with its output
projections zeroed, so with the residual stream it starts as the identity.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from tailor_trainer.config import Adaptation, AdaptationMethod, TrainerConfig
from tailor_trainer.errors import InvalidSpec, ModelInvalid

# Output projections of a block (zeroed in inserted blocks so they start as identity).
_OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "c_proj", "out_proj", "dense_4h_to_h", "fc2",
                       "fc_out", "wo")
# Where architectures keep their decoder blocks.
_BLOCK_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                "transformer.blocks", "transformer.layers")
# MLP activation attribute names and the config key that names the activation.
_ACT_ATTRS = ("act_fn", "act", "activation_fn", "activation")
_ACT_CONFIG_KEYS = ("hidden_act", "activation_function", "hidden_activation")


@dataclass
class AdaptPlan:
    """What adaptation did; written to ``adapt/plan.json`` and into the model card."""

    method: str
    changes: list[str] = field(default_factory=list)
    trainable_parameters: int = 0
    total_parameters: int = 0
    target_modules: Optional[list[str]] = None
    new_blocks: list[int] = field(default_factory=list)
    frozen_blocks: list[int] = field(default_factory=list)
    num_blocks: int = 0

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_parameters / max(1, self.total_parameters)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "changes": self.changes,
            "trainableParameters": self.trainable_parameters,
            "totalParameters": self.total_parameters,
            "trainablePercent": round(self.trainable_percent, 4),
            "targetModules": self.target_modules,
            "newBlocks": self.new_blocks,
            "frozenBlocks": self.frozen_blocks,
            "numBlocks": self.num_blocks,
        }


# ---------------------------------------------------------------------------------------------
# Checks that need no weights


def preflight(cfg: TrainerConfig) -> None:
    """Refuse what cannot run here before loading anything (QLoRA without a CUDA GPU)."""
    if cfg.adaptation.method is AdaptationMethod.qlora:
        import torch

        if cfg.resources.gpus_per_worker < 1 or not _cuda_visible(torch):
            raise InvalidSpec(
                "adaptation.method qlora needs a CUDA GPU (4-bit bitsandbytes kernels) and this run "
                "has none; use method lora on CPU, or set resources.gpusPerWorker >= 1 on a GPU node",
                field="spec.adaptation.method")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise InvalidSpec("adaptation.method qlora needs the bitsandbytes package in the trainer "
                              "image", field="spec.adaptation.method")


def _cuda_visible(torch: Any) -> bool:
    # The driver of a Ray cluster may have no GPU while its workers do: trust the spec there.
    return torch.cuda.is_available() or bool(os.environ.get("RAY_ADDRESS"))


# ---------------------------------------------------------------------------------------------
# Model structure helpers


def find_blocks(model: Any) -> tuple[str, Any]:
    """The decoder's ModuleList of transformer blocks, and its dotted path."""
    import torch.nn as nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in _BLOCK_LISTS:
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return path, obj
    lists = [(n, m) for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ModelInvalid("cannot find the transformer blocks of this model", field="spec.baseModel.uri")
    return max(lists, key=lambda nm: len(nm[1]))


def module_suffixes(model: Any) -> list[str]:
    """Distinct last names of the modules that hold weights (what targetModules may name)."""
    names = set()
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _matches_module(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def matched_modules(model: Any, targets: list[str]) -> list[str]:
    """Names of the modules ``targets`` select (those PEFT wraps); on an adapted model each
    wrapped target counts once (its own children are ``base_layer``, ``lora_A``, ...)."""
    return [n for n, _ in model.named_modules() if n and any(_matches_module(n, t) for t in targets)]


def check_target_modules(model: Any, targets: list[str], field_path: str) -> None:
    """Every target must name at least one module; otherwise list the ones that exist."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(_matches_module(n, t) for n in names)]
    if missing:
        raise InvalidSpec(
            f"target module(s) {', '.join(repr(t) for t in missing)} not found in the model; "
            f"modules with weights: {', '.join(module_suffixes(model))}",
            field=field_path)


def _param_matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        # 4-bit weights are stored packed two per byte.
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# ---------------------------------------------------------------------------------------------
# The changes, in the order they are applied


def swap_activation(model: Any, name: str, plan: AdaptPlan) -> None:
    from transformers.activations import ACT2FN

    _, blocks = find_blocks(model)
    swapped = 0
    for block in blocks:
        mlp = getattr(block, "mlp", None) or getattr(block, "feed_forward", None) or block
        for attr in _ACT_ATTRS:
            if hasattr(mlp, attr) and not isinstance(getattr(mlp, attr), (str, type(None))):
                setattr(mlp, attr, ACT2FN[name])
                swapped += 1
                break
    if not swapped:
        raise InvalidSpec("cannot change the activation: this architecture's MLP has no activation "
                          "module Tailor knows", field="spec.adaptation.activation")
    for key in _ACT_CONFIG_KEYS:
        if hasattr(model.config, key):
            setattr(model.config, key, name)
    plan.changes.append(f"MLP activation set to {name} in {swapped} blocks")


def insert_identity_blocks(model: Any, count: int, plan: AdaptPlan) -> list[int]:
    """LLaMA-Pro block expansion: after every ``n/count`` blocks insert a copy of the previous
    block whose output projections are zero, so the new block maps its input to itself."""
    import torch
    import torch.nn as nn

    path, blocks = find_blocks(model)
    n = len(blocks)
    if count > n:
        raise InvalidSpec(f"addLayers.count {count} is more than the model's {n} blocks",
                          field="spec.adaptation.addLayers.count")
    group = n // count
    new_list, new_idx, origin = [], [], []
    for i, block in enumerate(blocks):
        new_list.append(block)
        origin.append(i)
        if (i + 1) % group == 0 and len(new_idx) < count:
            clone = copy.deepcopy(block)
            zeroed = 0
            for mname, m in clone.named_modules():
                if isinstance(m, nn.Linear) or m.__class__.__name__ == "Conv1D":
                    if mname.rsplit(".", 1)[-1] in _OUTPUT_PROJECTIONS:
                        with torch.no_grad():
                            m.weight.zero_()
                            if getattr(m, "bias", None) is not None:
                                m.bias.zero_()
                        zeroed += 1
            if zeroed < 2:
                raise InvalidSpec("addLayers: cannot find the attention and MLP output projections "
                                  "of this architecture's blocks", field="spec.adaptation.addLayers")
            new_idx.append(len(new_list))
            new_list.append(clone)
            origin.append(i)
    parent = model.get_base_model() if hasattr(model, "get_base_model") else model
    owner_path, attr = path.rsplit(".", 1) if "." in path else ("", path)
    owner = parent.get_submodule(owner_path) if owner_path else parent
    setattr(owner, attr, nn.ModuleList(new_list))
    # Attention layers index the KV cache by layer_idx; keep them in step with the new order.
    for idx, block in enumerate(new_list):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = idx
    cfg = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, key) and isinstance(getattr(cfg, key), int):
            setattr(cfg, key, len(new_list))
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        cfg.layer_types = [layer_types[i] for i in origin]  # a copy behaves like its original
    plan.changes.append(f"inserted {count} identity block(s) at {new_idx} (LLaMA-Pro); "
                        f"{n} -> {len(new_list)} blocks")
    return new_idx


def apply_freeze(model: Any, adaptation: Adaptation, plan: AdaptPlan) -> None:
    """Full fine-tuning, then the freeze rules, then unfreezeModules, then addLayers' own rule."""
    _, blocks = find_blocks(model)
    n = len(blocks)
    for p in model.parameters():
        p.requires_grad_(True)
    rules = adaptation.freeze
    frozen_blocks: set[int] = set()
    originals = [i for i in range(n) if i not in plan.new_blocks]
    if rules is not None:
        if rules.first_layers is not None:
            if rules.first_layers > len(originals):
                raise InvalidSpec(f"freeze.firstLayers {rules.first_layers} is more than the model's "
                                  f"{len(originals)} blocks", field="spec.adaptation.freeze.firstLayers")
            frozen_blocks.update(originals[: rules.first_layers])
            if rules.first_layers:
                for p in model.get_input_embeddings().parameters():
                    p.requires_grad_(False)
        for i in rules.layers or []:
            if i >= len(originals):
                raise InvalidSpec(f"freeze.layers index {i} is out of range: the model has "
                                  f"{len(originals)} blocks (0-{len(originals) - 1})",
                                  field="spec.adaptation.freeze.layers")
            frozen_blocks.add(originals[i])
        for i in frozen_blocks:
            for p in blocks[i].parameters():
                p.requires_grad_(False)
        names = [name for name, _ in model.named_parameters()]
        for pattern in rules.modules or []:
            hits = [nm for nm in names if _param_matches(nm, pattern)]
            if not hits:
                raise InvalidSpec(f"freeze.modules pattern {pattern!r} matches no parameter; "
                                  f"parameter names look like {', '.join(names[:4])}, ...",
                                  field="spec.adaptation.freeze.modules")
            for name, p in model.named_parameters():
                if name in hits:
                    p.requires_grad_(False)
        for pattern in rules.unfreeze_modules or []:
            hits = [nm for nm in names if _param_matches(nm, pattern)]
            if not hits:
                raise InvalidSpec(f"freeze.unfreezeModules pattern {pattern!r} matches no parameter",
                                  field="spec.adaptation.freeze.unfreezeModules")
            for name, p in model.named_parameters():
                if name in hits:
                    p.requires_grad_(True)
        plan.changes.append(f"froze blocks {sorted(frozen_blocks)}"
                            + (", embeddings" if rules.first_layers else "")
                            + (f", modules {rules.modules}" if rules.modules else "")
                            + (f"; kept trainable {rules.unfreeze_modules}" if rules.unfreeze_modules else ""))
    if adaptation.add_layers is not None and adaptation.add_layers.train_only_new:
        for p in model.parameters():
            p.requires_grad_(False)
        for i in plan.new_blocks:
            for p in blocks[i].parameters():
                p.requires_grad_(True)
        plan.changes.append("trains only the inserted blocks")
    plan.frozen_blocks = sorted(frozen_blocks)


def peft_config(model: Any, adaptation: Adaptation) -> tuple[Any, Optional[list[str]]]:
    """The PEFT config for a PEFT method, with target modules checked against the model."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as IA3_FF,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3_TARGETS,
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS,
    )

    method = adaptation.method
    model_type = getattr(model.config, "model_type", "")
    if method.is_lora_family:
        lora = adaptation.lora_or_default
        targets = list(lora.target_modules) if lora.target_modules else LORA_TARGETS.get(model_type)
        if not targets:
            raise InvalidSpec(f"no default LoRA target modules for architecture {model_type!r}; set "
                              f"adaptation.lora.targetModules (modules: {', '.join(module_suffixes(model))})",
                              field="spec.adaptation.lora.targetModules")
        check_target_modules(model, targets, "spec.adaptation.lora.targetModules")
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha,
                          lora_dropout=lora.dropout, target_modules=targets,
                          use_dora=method is AdaptationMethod.dora), targets
    if method is AdaptationMethod.ia3:
        targets = list(adaptation.ia3_target_modules or IA3_TARGETS.get(model_type) or [])
        if not targets:
            raise InvalidSpec(f"no default IA3 target modules for architecture {model_type!r}; set "
                              f"adaptation.ia3TargetModules (modules: {', '.join(module_suffixes(model))})",
                              field="spec.adaptation.ia3TargetModules")
        check_target_modules(model, targets, "spec.adaptation.ia3TargetModules")
        ff_default = IA3_FF.get(model_type) or []
        feedforward = [t for t in targets
                       if t in ff_default or any(_matches_module(n, t) and ".mlp." in f".{n}."
                                                 for n, _ in model.named_modules())]
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets,
                         feedforward_modules=feedforward), targets
    if method is AdaptationMethod.prefix:
        n = (adaptation.prefix.num_virtual_tokens if adaptation.prefix else 20)
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n), None
    raise AssertionError(method)


def apply_adaptation(model: Any, adaptation: Adaptation, seed: int = 0) -> tuple[Any, AdaptPlan]:
    """Apply the whole adaptation to ``model`` (a ``*ForCausalLM``); returns the model to train
    (a ``PeftModel`` for PEFT methods) and the plan. Deterministic for a given seed."""
    import torch

    method = adaptation.method
    plan = AdaptPlan(method=method.value)
    if adaptation.activation is not None:
        swap_activation(model, adaptation.activation.value, plan)
    if adaptation.add_layers is not None:
        plan.new_blocks = insert_identity_blocks(model, adaptation.add_layers.count, plan)
    if method.is_peft:
        config, targets = peft_config(model, adaptation)
        plan.target_modules = targets
        from peft import get_peft_model

        torch.manual_seed(seed)  # adapter initialisation
        if method is AdaptationMethod.qlora:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, config)
        plan.changes.append(f"{method.value} adapter" + (f" on {targets}" if targets else "")
                            + (f" (r={config.r}, alpha={config.lora_alpha})" if method.is_lora_family else ""))
    else:
        apply_freeze(model, adaptation, plan)
        if method is AdaptationMethod.full and adaptation.freeze is None and adaptation.add_layers is None:
            plan.changes.append("all weights trainable")
    _, blocks = find_blocks(model)
    plan.num_blocks = len(blocks)
    plan.trainable_parameters, plan.total_parameters = count_parameters(model)
    if plan.trainable_parameters == 0:
        raise InvalidSpec("the adaptation leaves no trainable parameter (check freeze rules)",
                          field="spec.adaptation")
    return model, plan


# ---------------------------------------------------------------------------------------------
# Loading


def torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)


def load_base(model_dir: str, *, dtype: Any = None, device: Any = None, qlora: bool = False,
              meta: bool = False) -> Any:
    """The pretrained causal LM (or a weightless skeleton of it with ``meta=True``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if meta:
            config = AutoConfig.from_pretrained(model_dir)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
        kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
        if qlora:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
            kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelInvalid(f"cannot load the base model from {model_dir}: {e}",
                           field="spec.baseModel.uri") from e
    if device is not None and not qlora:
        model.to(device)
    return model


def build_trainable(cfg: TrainerConfig, model_dir: str, *, device: Any = None,
                    dtype: Any = None) -> tuple[Any, AdaptPlan]:
    """Base model plus adaptation, on real weights: what every training worker trains."""
    qlora = cfg.adaptation.method is AdaptationMethod.qlora
    model = load_base(model_dir, dtype=dtype, device=device, qlora=qlora)
    return apply_adaptation(model, cfg.adaptation, seed=cfg.hyperparameters.seed)


def load_trained(cfg: TrainerConfig, base_dir: str, trained_dir: str, *, device: Any = None,
                 dtype: Any = None) -> Any:
    """The fine-tuned model from ``train/model``: an adapter on the (structurally adapted) base,
    or a full model directory."""
    if os.path.exists(os.path.join(trained_dir, "adapter_config.json")):
        from peft import PeftModel

        base = load_base(base_dir, dtype=dtype, device=device,
                         qlora=cfg.adaptation.method is AdaptationMethod.qlora)
        if cfg.adaptation.activation is not None:
            swap_activation(base, cfg.adaptation.activation.value, AdaptPlan(method=""))
        return PeftModel.from_pretrained(base, trained_dir)
    return load_base(trained_dir, dtype=dtype, device=device)


def load_any(model_dir: str, *, device: Any = None, dtype: Any = None,
             base_fallback: Optional[str] = None) -> Any:
    """A model directory of either kind. An adapter goes on the base it names, or on
    ``base_fallback`` when that path is not on this machine (a champion trained elsewhere)."""
    cfg_path = os.path.join(model_dir, "adapter_config.json")
    if os.path.exists(cfg_path):
        from peft import PeftModel

        with open(cfg_path) as f:
            base_dir = json.load(f).get("base_model_name_or_path")
        if not base_dir or not os.path.isdir(base_dir):
            base_dir = base_fallback
        if not base_dir:
            raise ModelInvalid(f"adapter {model_dir} names no base model that exists here")
        return PeftModel.from_pretrained(load_base(base_dir, dtype=dtype, device=device), model_dir)
    return load_base(model_dir, dtype=dtype, device=device)
