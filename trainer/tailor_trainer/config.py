"""TrainerConfig: the whole contract from the operator to the trainer (pydantic, no torch).

The operator renders one JSON file from a FineTuneJob and its Dataset
(``tailor_operator.builders.trainer_config``); the trainer reads nothing else. The pipeline
blocks below (data, adaptation, hyperparameters, evaluation) are also the ``FineTuneJob`` /
``Dataset`` spec fields: the CRD reuses them, so the spec a user writes and the config the
trainer reads can never drift apart. Each cross-field check exists twice on purpose: as a
pydantic validator (``tailor validate``, the trainer) and as a CEL rule (the API server).
"""

from __future__ import annotations

import hashlib
import json
import math
from enum import Enum
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    field_validator,
    model_serializer,
    model_validator,
)

from tailor_trainer._base import (
    CamelModel,
    DataUri,
    FieldError,
    K8sLabel,
    K8sName,
    ModelUri,
    OutputUri,
    SecretRef,
    ShortStr,
    Text,
    cel,
    with_cel,
)

# ---------------------------------------------------------------------------------------------
# Data


class DataFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"
    parquet = "parquet"
    text = "text"


class DataSchema(str, Enum):
    text = "text"
    completion = "completion"
    instruction = "instruction"
    chat = "chat"
    image_caption = "image-caption"
    """Images with captions (Hugging Face imagefolder: metadata.jsonl with file_name and text) for
    text-to-image diffusion models (docs/image-models.md)."""


# Canonical columns each schema reads; columnMap renames source columns onto these.
SCHEMA_COLUMNS: dict[DataSchema, tuple[str, ...]] = {
    DataSchema.text: ("text",),
    DataSchema.completion: ("prompt", "completion"),
    DataSchema.instruction: ("instruction", "input", "output"),
    DataSchema.chat: ("messages",),
    DataSchema.image_caption: ("file_name", "text"),
}
ALL_COLUMNS = sorted({c for cols in SCHEMA_COLUMNS.values() for c in cols})


class Dedupe(str, Enum):
    none = "none"
    exact = "exact"
    near = "near"


class ConfigMapDataRef(CamelModel):
    """Small inline data kept in a ConfigMap of the same namespace."""

    name: K8sName
    """Name of the ConfigMap."""
    key: Optional[ShortStr] = None
    """Key holding the data. Defaults to the only key of the ConfigMap."""


class DatasetSource(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "has(self.uri) != has(self.configMapRef)",
            "exactly one of source.uri and source.configMapRef must be set",
        )
    ),
):
    """Where the raw data lives."""

    uri: Optional[DataUri] = None
    """Location: a path or file://, pvc://<claim>/<path>, s3://<bucket>/<key>, hf://<org>/<name>,
    http(s)://. Globs (`*.jsonl`) select several files."""
    secret_ref: Optional[SecretRef] = None
    """Secret with credentials for the source (S3 keys, HF_TOKEN). Names only, never values."""
    config_map_ref: Optional[ConfigMapDataRef] = None
    """Small inline data kept in a ConfigMap instead of `uri`."""

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetSource":
        if (self.uri is None) == (self.config_map_ref is None):
            raise FieldError("uri", "exactly one of source.uri and source.configMapRef must be set")
        return self


class Preprocessing(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "!has(self.maxChars) || !has(self.minChars) || self.minChars <= self.maxChars",
            "minChars must not exceed maxChars",
            ".minChars",
        )
    ),
):
    """Cleaning applied before splitting; every step reports how many rows it dropped."""

    normalize_unicode: bool = True
    """Apply Unicode NFC normalization to every text field. Defaults to true."""
    strip_whitespace: bool = True
    """Trim leading/trailing whitespace and collapse runs of blank lines. Defaults to true."""
    drop_empty: bool = True
    """Drop rows whose required fields are missing or empty. Defaults to true."""
    dedupe: Dedupe = Dedupe.exact
    """Duplicate removal: none, exact (same normalized content) or near (MinHash similarity
    above nearDuplicateThreshold). Defaults to exact."""
    near_duplicate_threshold: float = Field(0.9, ge=0.5, le=1.0)
    """Jaccard similarity above which two rows count as near duplicates (dedupe: near).
    Defaults to 0.9."""
    min_chars: int = Field(1, ge=0, le=10_000_000)
    """Drop rows shorter than this many characters (all fields together). Defaults to 1."""
    max_chars: Optional[int] = Field(None, ge=1, le=100_000_000)
    """Drop rows longer than this many characters (all fields together). No limit by default."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Largest fraction of malformed rows (bad JSON, wrong types, invalid UTF-8, missing fields)
    tolerated; above it the Dataset is not Ready. Defaults to 0.01 (1%)."""
    remove_eval_overlap: bool = True
    """Remove validation/test rows whose content also appears in train. Defaults to true."""

    @model_validator(mode="after")
    def _min_le_max(self) -> "Preprocessing":
        if self.max_chars is not None and self.min_chars > self.max_chars:
            raise FieldError("minChars", "minChars must not exceed maxChars")
        return self


class Split(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "(has(self.validation) ? self.validation : 0.1) + (has(self.test) ? self.test : 0.1) < 1.0",
            "validation + test must be below 1 (something must be left to train on)",
        )
    ),
):
    """Deterministic train/validation/test split by a stable hash of each row's content and the seed:
    adding rows never moves old rows between splits."""

    validation: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of rows for validation (early stopping, checkpoint choice). Defaults to 0.1."""
    test: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of rows held out for the final evaluation and champion comparison. Defaults to 0.1."""
    seed: int = Field(42, ge=0, le=2**31 - 1)
    """Seed mixed into the split hash. Defaults to 42."""

    @model_validator(mode="after")
    def _sum_below_one(self) -> "Split":
        if self.validation + self.test >= 1.0:
            raise FieldError("test", "validation + test must be below 1 (something must be left to train on)")
        return self


ColumnName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class DataSpec(CamelModel):
    """What to read and how to clean, format and split it (the Dataset spec's pipeline part)."""

    source: DatasetSource
    """Where the raw data lives."""
    format: Optional[DataFormat] = None
    """File format: jsonl, csv, parquet or text. Defaults to the file extension, else jsonl."""
    schema_: DataSchema = Field(DataSchema.text, alias="schema")
    """Row layout: text (raw domain text), completion (prompt/completion), instruction
    (instruction/input/output, Alpaca-style), chat (messages with roles) or image-caption (images
    with captions, for text-to-image diffusion models). Defaults to text."""
    column_map: dict[Annotated[str, StringConstraints(max_length=64)], ColumnName] = Field(
        default_factory=dict, max_length=8
    )
    """Renames source columns onto the schema's columns, e.g. {prompt: question, completion: answer}.
    Keys: text, prompt, completion, instruction, input, output, messages, file_name."""
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    """Cleaning steps, each reported with a count of dropped rows."""
    split: Split = Field(default_factory=Split)
    """Train/validation/test split."""

    @field_validator("column_map")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(ALL_COLUMNS))
        if unknown:
            raise ValueError(f"unknown column {unknown[0]!r}; expected one of {', '.join(ALL_COLUMNS)}")
        return value


# ---------------------------------------------------------------------------------------------
# Adaptation


class AdaptationMethod(str, Enum):
    lora = "lora"
    dora = "dora"
    qlora = "qlora"
    ia3 = "ia3"
    prefix = "prefix"
    full = "full"
    freeze = "freeze"

    @property
    def is_lora_family(self) -> bool:
        return self in (AdaptationMethod.lora, AdaptationMethod.dora, AdaptationMethod.qlora)

    @property
    def is_peft(self) -> bool:
        return self not in (AdaptationMethod.full, AdaptationMethod.freeze)


class Activation(str, Enum):
    relu = "relu"
    gelu = "gelu"
    gelu_new = "gelu_new"
    gelu_pytorch_tanh = "gelu_pytorch_tanh"
    silu = "silu"
    mish = "mish"
    tanh = "tanh"
    sigmoid = "sigmoid"


ModulePattern = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class LoraConfig(CamelModel):
    """LoRA-family settings (lora, dora, qlora), in PEFT's vocabulary."""

    r: int = Field(8, ge=1, le=1024)
    """Rank of the update matrices. Defaults to 8."""
    alpha: int = Field(16, ge=1, le=4096)
    """Scaling numerator (lora_alpha); the update is scaled by alpha/r. Defaults to 16."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA path. Defaults to 0.05."""
    target_modules: Optional[list[ModulePattern]] = Field(None, min_length=1, max_length=64)
    """Module names (suffixes) to adapt, e.g. [q_proj, v_proj]. Defaults to the attention projections
    of the model's architecture. Names that match nothing are an error listing the ones that exist."""


class PrefixConfig(CamelModel):
    """Prefix tuning settings."""

    num_virtual_tokens: int = Field(20, ge=1, le=1024)
    """Number of trained virtual tokens prepended at every layer. Defaults to 20."""


class FreezeConfig(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "has(self.firstLayers) || has(self.layers) || has(self.modules)",
            "freeze needs at least one of firstLayers, layers, modules",
        )
    ),
):
    """Which weights to freeze (method full or freeze). Everything else trains."""

    first_layers: Optional[int] = Field(None, ge=0, le=1024)
    """Freeze the embeddings and the first N transformer blocks."""
    layers: Optional[list[Annotated[int, Field(ge=0, le=1023)]]] = Field(None, max_length=1024)
    """Freeze these transformer blocks by index (0-based)."""
    modules: Optional[list[ModulePattern]] = Field(None, max_length=64)
    """Freeze parameters whose name matches one of these glob patterns, e.g. ["*.mlp.*", "lm_head"]."""
    unfreeze_modules: Optional[list[ModulePattern]] = Field(None, max_length=64)
    """Keep parameters matching these glob patterns trainable even if a rule above froze them,
    e.g. ["*.norm.*"]."""

    @model_validator(mode="after")
    def _something(self) -> "FreezeConfig":
        if self.first_layers is None and self.layers is None and self.modules is None:
            raise FieldError("firstLayers", "freeze needs at least one of firstLayers, layers, modules")
        return self


class AddLayersConfig(CamelModel):
    """Block expansion (LLaMA-Pro style): new transformer blocks inserted as identity mappings."""

    count: int = Field(1, ge=1, le=64)
    """How many blocks to insert, spread evenly through the stack. Defaults to 1."""
    train_only_new: bool = True
    """Freeze every original weight and train only the inserted blocks. Defaults to true."""


class Adaptation(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "!has(self.lora) || !has(self.method) || self.method in ['lora', 'dora', 'qlora']",
            "lora settings apply only to method lora, dora or qlora",
            ".lora",
        ),
        cel(
            "!has(self.prefix) || (has(self.method) && self.method == 'prefix')",
            "prefix settings apply only to method prefix",
            ".prefix",
        ),
        cel(
            "!has(self.freeze) || (has(self.method) && self.method in ['full', 'freeze'])",
            "freeze applies only to method full or freeze (PEFT methods already freeze the base model)",
            ".freeze",
        ),
        cel(
            "!has(self.addLayers) || (has(self.method) && self.method in ['full', 'freeze'])",
            "addLayers applies only to method full or freeze",
            ".addLayers",
        ),
        cel(
            "!has(self.method) || self.method != 'freeze' || has(self.freeze) || has(self.addLayers)",
            "method freeze needs a freeze block or addLayers",
            ".method",
        ),
    ),
):
    """How the pretrained model is adapted before training."""

    method: AdaptationMethod = AdaptationMethod.lora
    """lora, dora, qlora (4-bit base, GPU only), ia3, prefix, full (all weights), or freeze (full
    fine-tuning of what the freeze/addLayers rules leave trainable). Defaults to lora."""
    lora: Optional[LoraConfig] = None
    """Settings for lora, dora and qlora. Defaults apply when omitted."""
    prefix: Optional[PrefixConfig] = None
    """Settings for prefix tuning."""
    ia3_target_modules: Optional[list[ModulePattern]] = Field(None, min_length=1, max_length=64)
    """IA3: modules to rescale. Defaults to the architecture's attention and MLP projections."""
    freeze: Optional[FreezeConfig] = None
    """Layers or modules to freeze (method full or freeze)."""
    add_layers: Optional[AddLayersConfig] = None
    """Insert new identity-initialized transformer blocks (method full or freeze)."""
    activation: Optional[Activation] = None
    """Replace the MLP activation function of every block, e.g. gelu. Unchanged by default."""

    @model_validator(mode="after")
    def _blocks_match_method(self) -> "Adaptation":
        m = self.method
        if self.lora is not None and not m.is_lora_family:
            raise FieldError("lora", "lora settings apply only to method lora, dora or qlora")
        if self.prefix is not None and m is not AdaptationMethod.prefix:
            raise FieldError("prefix", "prefix settings apply only to method prefix")
        if self.freeze is not None and m not in (AdaptationMethod.full, AdaptationMethod.freeze):
            raise FieldError("freeze", "freeze applies only to method full or freeze")
        if self.add_layers is not None and m not in (AdaptationMethod.full, AdaptationMethod.freeze):
            raise FieldError("addLayers", "addLayers applies only to method full or freeze")
        if m is AdaptationMethod.freeze and self.freeze is None and self.add_layers is None:
            raise FieldError("method", "method freeze needs a freeze block or addLayers")
        return self

    @property
    def lora_or_default(self) -> LoraConfig:
        return self.lora or LoraConfig()


# ---------------------------------------------------------------------------------------------
# Hyperparameters


class Scheduler(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Overlong(str, Enum):
    truncate = "truncate"
    drop = "drop"


class FusedLoss(str, Enum):
    """How the training loss is computed from the last hidden states (see Hyperparameters.fused_loss)."""

    auto = "auto"
    none = "none"
    chunked = "chunked"
    liger = "liger"


class Attention(str, Enum):
    """The attention kernel (transformers' ``attn_implementation``)."""

    auto = "auto"
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"
    flex_attention = "flex_attention"


class EarlyStopping(CamelModel):
    """Stop when validation loss stops improving."""

    patience: int = Field(3, ge=1, le=1000)
    """Evaluations without improvement before stopping. Defaults to 3."""
    min_delta: float = Field(0.0, ge=0.0)
    """Smallest decrease in validation loss that counts as improvement. Defaults to 0."""


SPEED_LEVERS = ("fused_loss", "compile", "attention")
"""Hyperparameters that change speed and memory, not the result (within rounding)."""


class Hyperparameters(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "!(has(self.epochs) && has(self.maxSteps))",
            "epochs and maxSteps are mutually exclusive: set one",
            ".maxSteps",
        )
    ),
):
    """Training hyperparameters (Hugging Face names in camelCase)."""

    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    """Peak learning rate; must be > 0 and finite. Defaults to 2e-4."""
    batch_size: int = Field(8, ge=1, le=4096)
    """Sequences per worker per step (before gradient accumulation). Defaults to 8."""
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    """Micro-batches accumulated per optimizer step. Defaults to 1."""
    epochs: Optional[float] = Field(None, gt=0.0, le=1000.0)
    """Passes over the training split. Mutually exclusive with maxSteps; when neither is set,
    1 epoch."""
    max_steps: Optional[int] = Field(None, ge=1, le=10_000_000)
    """Total optimizer steps. Mutually exclusive with epochs."""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of steps spent warming the learning rate up from 0. Defaults to 0."""
    scheduler: Scheduler = Scheduler.linear
    """Learning-rate schedule after warmup. Defaults to linear."""
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    """AdamW weight decay. Defaults to 0."""
    max_grad_norm: float = Field(1.0, gt=0.0, le=1000.0)
    """Gradient clipping norm. Defaults to 1.0."""
    max_seq_length: int = Field(512, ge=8, le=131072)
    """Longest tokenized sequence; longer rows are truncated or dropped (see overlong).
    Defaults to 512."""
    overlong: Overlong = Overlong.truncate
    """What to do with rows longer than maxSeqLength: truncate or drop (counted either way).
    Defaults to truncate."""
    packing: bool = False
    """Pack several short rows into one sequence of at most maxSeqLength tokens (best-fit
    decreasing, so little room is left for padding; attention never crosses rows). Defaults to
    false."""
    fused_loss: FusedLoss = FusedLoss.auto
    """How the loss is computed from the last hidden states: none (the model's full logits, as
    float32, for every position), chunked (lm_head and cross-entropy over chunks of the labelled
    positions, recomputed in the backward pass: the full-vocabulary logits never exist at once)
    or liger (Liger Kernel's fused linear cross-entropy; needs a CUDA GPU and the liger-kernel
    package, else chunked). auto: liger on a GPU when installed, else chunked (on the CPU too,
    where skipping unlabelled positions pays for the recomputation). Models whose logits are
    more than lm_head of the hidden states (soft-capping, logit scales) and prefix tuning always
    use none. Defaults to auto."""
    compile: Optional[bool] = None
    """Compile each transformer block with torch.compile (the blocks, not the whole model: faster
    steps after a compile of seconds to minutes). Unset (auto): on with a CUDA GPU, off on the CPU,
    where compiling takes longer than a short run saves. Falls back to uncompiled blocks, with a
    logged reason, where compiling is not possible."""
    attention: Attention = Attention.auto
    """Attention kernel: sdpa, eager, flash_attention_2 (needs the flash-attn package and a GPU)
    or flex_attention. With flash_attention_2 or flex_attention each micro-batch is one padding-free
    sequence whose documents attend only within themselves. auto: flash_attention_2 on a GPU when
    flash-attn is installed, else sdpa. Defaults to auto."""
    precision: Precision = Precision.auto
    """Numeric precision: auto (bf16 on GPUs that support it, else fp32), fp32, bf16, fp16."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them: much less activation memory (larger batches or sequences) for extra compute (each
    block's forward runs twice). Defaults to false."""
    seed: int = Field(42, ge=0, le=2**31 - 1)
    """Seed for initialization, shuffling and dropout; a CPU run with the same seed repeats
    exactly. Defaults to 42."""
    eval_every_steps: Optional[int] = Field(None, ge=1, le=10_000_000)
    """Validation-loss evaluation interval in steps. Defaults to once per epoch (or every
    checkpoint with maxSteps)."""
    checkpoint_every_steps: int = Field(100, ge=1, le=10_000_000)
    """Write a checkpoint every N optimizer steps (and at the end). Defaults to 100."""
    checkpoints_to_keep: int = Field(2, ge=1, le=100)
    """Newest complete checkpoints kept; older ones are deleted. Defaults to 2."""
    early_stopping: Optional[EarlyStopping] = None
    """Stop on a validation-loss plateau. Off by default."""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "Hyperparameters":
        if self.epochs is not None and self.max_steps is not None:
            raise FieldError("maxSteps", "epochs and maxSteps are mutually exclusive: set one")
        if not math.isfinite(self.learning_rate):
            raise FieldError("learningRate", "learningRate must be finite")
        return self

    @property
    def epochs_or_default(self) -> float:
        return self.epochs if self.epochs is not None else 1.0


# ---------------------------------------------------------------------------------------------
# Hyperparameter search


class Range(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "(has(self.logUniform) ? 1 : 0) + (has(self.uniform) ? 1 : 0) + (has(self.choices) ? 1 : 0) == 1",
            "a search space sets exactly one of logUniform, uniform, choices",
        ),
        cel(
            "!has(self.logUniform) || (self.logUniform[0] > 0.0 && self.logUniform[0] < self.logUniform[1])",
            "logUniform is [low, high] with 0 < low < high",
            ".logUniform",
        ),
        cel(
            "!has(self.uniform) || self.uniform[0] < self.uniform[1]",
            "uniform is [low, high] with low < high",
            ".uniform",
        ),
    ),
):
    """One real-valued hyperparameter's search space: sampled log-uniformly or uniformly in
    [low, high], or one of a list of values."""

    log_uniform: Optional[list[float]] = Field(None, min_length=2, max_length=2)
    """[low, high] sampled uniformly in log space (learning rates), 0 < low < high."""
    uniform: Optional[list[float]] = Field(None, min_length=2, max_length=2)
    """[low, high] sampled uniformly, low < high."""
    choices: Optional[list[float]] = Field(None, min_length=1, max_length=32)
    """Values to choose from."""

    @model_validator(mode="after")
    def _one_kind(self) -> "Range":
        kinds = [k for k in ("log_uniform", "uniform", "choices") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise FieldError("choices", "a search space sets exactly one of logUniform, uniform, choices")
        if self.log_uniform is not None and not 0 < self.log_uniform[0] < self.log_uniform[1]:
            raise FieldError("logUniform", "logUniform is [low, high] with 0 < low < high")
        if self.uniform is not None and not self.uniform[0] < self.uniform[1]:
            raise FieldError("uniform", "uniform is [low, high] with low < high")
        return self

    def values(self) -> list[float]:
        """Every value the space can yield, as far as it is finite (the bounds of a range)."""
        return list(self.choices or self.log_uniform or self.uniform or [])


class IntChoices(CamelModel):
    """An integer hyperparameter's search space: one of a list of values."""

    choices: list[Annotated[int, Field(ge=1, le=4096)]] = Field(min_length=1, max_length=32)
    """Values to choose from."""


class LoraSpace(CamelModel):
    """Search spaces of the LoRA settings (methods lora, dora, qlora)."""

    r: Optional[IntChoices] = None
    """Ranks to try."""
    alpha: Optional[IntChoices] = None
    """lora_alpha values to try."""
    dropout: Optional[Range] = None
    """Dropout on the LoRA path."""


# The ranges the plain hyperparameters allow: (low test, high test, words, CEL condition on v).
_SPACE_BOUNDS = {
    "learningRate": (lambda v: v > 0, lambda v: v <= 1, "in (0, 1]", "v > 0.0 && v <= 1.0"),
    "epochs": (lambda v: v > 0, lambda v: v <= 1000, "in (0, 1000]", "v > 0.0 && v <= 1000.0"),
    "warmupRatio": (lambda v: v >= 0, lambda v: v < 1, "in [0, 1)", "v >= 0.0 && v < 1.0"),
    "weightDecay": (lambda v: v >= 0, lambda v: v <= 10, "in [0, 10]", "v >= 0.0 && v <= 10.0"),
    "lora.dropout": (lambda v: v >= 0, lambda v: v < 1, "in [0, 1)", "v >= 0.0 && v < 1.0"),
}


def _bounds_rule(wire: str) -> dict[str, Any]:
    x = "self." + wire
    values = f"(has({x}.choices) ? {x}.choices : has({x}.logUniform) ? {x}.logUniform : {x}.uniform)"
    guard = f"!has({x})" if "." not in wire else f"!has(self.lora) || !has({x})"
    return cel(f"{guard} || {values}.all(v, {_SPACE_BOUNDS[wire][3]})",
               f"search.space.{wire} values must be {_SPACE_BOUNDS[wire][2]}", "." + wire)


class SearchSpace(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "has(self.learningRate) || has(self.batchSize) || has(self.epochs) || has(self.warmupRatio)"
            " || has(self.weightDecay) || has(self.lora)",
            "search.space names no hyperparameter: set at least one of learningRate, batchSize, epochs, "
            "warmupRatio, weightDecay, lora",
        ),
        *[_bounds_rule(w) for w in _SPACE_BOUNDS],
    ),
):
    """What the search varies; everything else comes from spec.hyperparameters and spec.adaptation.
    Each trial draws one value per named parameter."""

    learning_rate: Optional[Range] = None
    """Peak learning rate, e.g. {logUniform: [1e-5, 1e-2]}."""
    batch_size: Optional[IntChoices] = None
    """Sequences per worker per step."""
    epochs: Optional[Range] = None
    """Passes over the training split (not with hyperparameters.maxSteps)."""
    warmup_ratio: Optional[Range] = None
    """Fraction of steps spent warming up, in [0, 1)."""
    weight_decay: Optional[Range] = None
    """AdamW weight decay."""
    lora: Optional[LoraSpace] = None
    """LoRA rank, alpha and dropout."""

    @model_validator(mode="after")
    def _something_and_in_bounds(self) -> "SearchSpace":
        if not any(getattr(self, k) is not None for k in type(self).model_fields):
            raise FieldError("learningRate", "search.space names no hyperparameter: set at least one of "
                             "learningRate, batchSize, epochs, warmupRatio, weightDecay, lora")
        spaces = [(self.learning_rate, "learningRate"), (self.epochs, "epochs"),
                  (self.warmup_ratio, "warmupRatio"), (self.weight_decay, "weightDecay"),
                  (self.lora.dropout if self.lora else None, "lora.dropout")]
        for space, wire in spaces:
            low, high, text, _ = _SPACE_BOUNDS[wire]
            if space is not None and not all(low(v) and high(v) for v in space.values()):
                raise FieldError(wire, f"search.space.{wire} values must be {text}")
        return self


class SearchScheduler(str, Enum):
    """How hopeless trials are stopped."""

    asha = "asha"
    """Asynchronous successive halving: at each rung only the best 1/reductionFactor go on."""
    fifo = "fifo"
    """Every trial runs to its end."""


class SearchObjective(str, Enum):
    """What the search minimizes, measured on the validation split during training."""

    val_loss = "valLoss"


class Search(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "!has(self.concurrentTrials) || self.concurrentTrials <= (has(self.trials) ? self.trials : 8)",
            "concurrentTrials cannot exceed trials",
            ".concurrentTrials",
        ),
    ),
):
    """A bounded hyperparameter search inside the run (Ray Tune): prep once, `trials` trainings with
    values drawn from `space`, hopeless ones stopped early, and the best trial (lowest validation
    loss) goes on to evaluation and promotion like a plain run's model."""

    space: SearchSpace
    """What to vary."""
    trials: int = Field(8, ge=1, le=256)
    """Trials in all. Defaults to 8."""
    concurrent_trials: int = Field(1, ge=1, le=64)
    """Trials trained at once, each with the run's resources.workers x gpusPerWorker. Defaults to 1."""
    objective: SearchObjective = SearchObjective.val_loss
    """What picks the best trial: validation loss (lower is better)."""
    scheduler: SearchScheduler = SearchScheduler.asha
    """asha (stop trials that are behind at each rung) or fifo (run every trial to the end)."""
    grace_period_steps: Optional[int] = Field(None, ge=1, le=10_000_000)
    """Steps every trial trains before ASHA may stop it. Defaults to the first validation."""
    reduction_factor: int = Field(3, ge=2, le=10)
    """ASHA keeps the best 1/reductionFactor of the trials at each rung. Defaults to 3."""
    max_trial_steps: Optional[int] = Field(None, ge=1, le=10_000_000)
    """Budget: no trial trains more optimizer steps than this (caps maxSteps / epochs)."""
    max_gpu_hours: Optional[float] = Field(None, gt=0.0, le=100_000.0)
    """Budget: the search stops starting and running trials once trials x their GPUs x wall time
    reach this (on CPU, counted per worker as if each were one GPU)."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Seed of the search algorithm's draws (each trial trains with hyperparameters.seed)."""

    @model_validator(mode="after")
    def _concurrency(self) -> "Search":
        if self.concurrent_trials > self.trials:
            raise FieldError("concurrentTrials", "concurrentTrials cannot exceed trials")
        return self


# ---------------------------------------------------------------------------------------------
# Evaluation


class Metric(str, Enum):
    """Evaluation metrics on the held-out test split."""

    loss = "loss"
    perplexity = "perplexity"
    accuracy = "accuracy"
    exact_match = "exactMatch"

    @property
    def higher_is_better(self) -> bool:
        return self in (Metric.accuracy, Metric.exact_match)


class Gate(
    CamelModel,
    json_schema_extra=with_cel(
        cel("has(self.min) != has(self.max)", "a gate sets exactly one of min and max"),
    ),
):
    """A threshold the fine-tuned model must meet, or the run fails (metric and threshold in the
    message)."""

    metric: Metric
    """Metric to check: loss, perplexity, accuracy, exactMatch."""
    min: Optional[float] = None
    """The metric must be at least this."""
    max: Optional[float] = None
    """The metric must be at most this."""

    @model_validator(mode="after")
    def _one_bound(self) -> "Gate":
        if (self.min is None) == (self.max is None):
            raise FieldError("max", "a gate sets exactly one of min and max")
        return self


class CrossValidation(CamelModel):
    """k-fold cross-validation over train+validation (folds run in parallel on Ray)."""

    folds: int = Field(5, ge=2, le=20)
    """Number of folds. Defaults to 5."""


class EvalDatasetRef(CamelModel):
    """A Dataset (same namespace) used as a fixed evaluation set."""

    name: K8sName
    """Name of the Dataset."""
    revision: Optional[ShortStr] = None
    """Use only this revision of it (its status.revision): a run does not start while the Dataset
    is at another one. Unset: whatever revision it is at when the run starts (recorded with the
    run's decision)."""


class Evaluation(CamelModel):
    """What to measure after training, on the held-out test split (or a fixed evaluation set)."""

    metrics: list[Metric] = Field(
        default_factory=lambda: [Metric.loss, Metric.perplexity, Metric.accuracy], max_length=8
    )
    """Metrics to compute: loss, perplexity, accuracy (next-token), exactMatch (greedy generation
    against references; completion/instruction data). Defaults to loss, perplexity, accuracy."""
    compare_to_base: bool = True
    """Evaluate the base model on the same data so the improvement is explicit. Defaults to true."""
    cross_validation: Optional[CrossValidation] = None
    """Run k-fold cross-validation as well. Off by default."""
    sample_prompts: list[Text] = Field(default_factory=list, max_length=32)
    """Prompts to generate from, before and after fine-tuning, for the report."""
    max_new_tokens: int = Field(64, ge=1, le=4096)
    """Generation length for samples and exactMatch. Defaults to 64."""
    worst_examples: int = Field(5, ge=0, le=100)
    """How many highest-loss test examples to list in the report. Defaults to 5."""
    max_eval_rows: Optional[int] = Field(None, ge=1, le=10_000_000)
    """Evaluate on at most this many test rows (the same rows every run). All by default."""
    gates: list[Gate] = Field(default_factory=list, max_length=16)
    """Thresholds that fail the run when missed, e.g. [{metric: loss, max: 2.5}]."""
    dataset_ref: Optional[EvalDatasetRef] = None
    """A fixed evaluation set: every row this Dataset's validation keeps (all its splits, at most
    maxEvalRows) replaces the run's own test split for every measurement, so each candidate and
    the champion it is compared with are scored on the same rows whatever the training Dataset's
    revision. The Dataset must be Ready (and at datasetRef.revision when set)."""

    @model_serializer(mode="wrap")
    def _omit_unset_ref(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than null when unset: config hashes of jobs without one stay what they were.
        out = handler(self)
        if self.dataset_ref is None:
            out.pop("datasetRef", None)
            out.pop("dataset_ref", None)
        return out


# ---------------------------------------------------------------------------------------------
# The contract


class RunInfo(CamelModel):
    """Which run this is."""

    job: K8sName
    """FineTuneJob name."""
    namespace: K8sLabel = "default"
    """Namespace of the FineTuneJob."""
    name: K8sName
    """Run name, `<job>-r<N>`."""
    attempt: int = Field(1, ge=1)
    """Attempt number (1 + retries so far); retries resume from the last checkpoint."""


class ModelSource(CamelModel):
    """The pretrained model to start from."""

    uri: ModelUri
    """Model location: a local directory or file://, pvc://<claim>/<path>, s3://<bucket>/<prefix>,
    hf://<org>/<name>."""
    revision: Optional[ShortStr] = None
    """Revision (branch, tag or commit) for hf:// models."""
    secret_ref: Optional[SecretRef] = None
    """Secret with credentials (HF_TOKEN, or S3 keys). Names only, never values."""


class ResolvedDataset(DataSpec):
    """The Dataset as the trainer sees it: its spec plus the revision the operator observed."""

    name: K8sName = "dataset"
    """Dataset name."""
    revision: Optional[ShortStr] = None
    """Revision validated by the operator; the trainer records it in its lineage."""
    content_fingerprint: Optional[ShortStr] = None
    """Fingerprint of the rows the validation kept (Dataset status.contentFingerprint). When set,
    prep fails with DatasetChanged if the rows it reads have another fingerprint, so a run never
    trains on data other than the revision it was started on."""
    inline_data: Optional[str] = None
    """Contents of source.configMapRef, copied in by the operator (small data only)."""

    @model_serializer(mode="wrap")
    def _omit_unpinned(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than null when unset: configs (and so config hashes) of runs without a
        # pinned fingerprint stay what they were, and their finished stages are still reused.
        out = handler(self)
        if self.content_fingerprint is None:
            out.pop("contentFingerprint", None)
            out.pop("content_fingerprint", None)
        return out


class Strategy(str, Enum):
    """How the workers share the model."""

    ddp = "ddp"
    fsdp = "fsdp"


FSDP_NEEDS_WORKERS = "resources.strategy fsdp shards the model across workers: set resources.workers to at least 2"
QLORA_NOT_WITH_FSDP = ("adaptation.method qlora cannot be combined with resources.strategy fsdp (4-bit base "
                       "weights are not sharded); use method lora with fsdp, or strategy ddp")


class Workers(CamelModel):
    """How many Ray Train workers, and what each one gets."""

    workers: int = Field(1, ge=1, le=1024)
    """Ray Train workers (ranks)."""
    gpus_per_worker: int = Field(0, ge=0, le=16)
    """GPUs per worker; 0 trains on CPU with gloo."""
    cpus_per_worker: float = Field(1.0, gt=0.0, le=1024)
    """CPUs per worker."""
    strategy: Strategy = Strategy.ddp
    """ddp: every worker holds the whole model; fsdp: weights, gradients and optimizer state are
    sharded across the workers (PyTorch FSDP2), for models that do not fit one GPU."""

    @model_validator(mode="after")
    def _fsdp_needs_workers(self) -> "Workers":
        if self.strategy is Strategy.fsdp and self.workers < 2:
            raise FieldError("workers", FSDP_NEEDS_WORKERS)
        return self


class ProgressSink(CamelModel):
    """Where the trainer reports progress and the final result."""

    file: Optional[str] = None
    """A JSON file, rewritten atomically (local backend)."""
    config_map: Optional[K8sName] = None
    """A ConfigMap `<run>-progress` in run.namespace (kuberay backend)."""


class ChampionRef(CamelModel):
    """The current champion, evaluated on the same held-out data for a fair comparison."""

    run: K8sName
    """Run that produced the champion."""
    model_uri: str
    """Where its model (adapter or full weights) lives."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Its metrics when promoted (for the report)."""


class Comparison(CamelModel):
    """How the evaluate stage compares the candidate with the champion (else the base model):
    the promotion metric's improvement and a paired-bootstrap interval for it
    (tailor_trainer.significance). Filled by the operator from continuousLearning.promotion."""

    metric: Metric = Metric.loss
    """The metric compared."""
    higher_is_better: Optional[bool] = None
    """Direction; defaults to the metric's natural one."""
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    """Two-sided confidence of the interval."""
    resamples: int = Field(2000, ge=100, le=100_000)
    """Bootstrap resamples."""
    seed: int = 0
    """Seed of the resampling (the same rows and seed give the same interval)."""

    @property
    def higher(self) -> bool:
        return self.metric.higher_is_better if self.higher_is_better is None else self.higher_is_better


SEARCH_LORA_NEEDS_LORA = "search.space.lora applies only to adaptation.method lora, dora or qlora"
SEARCH_EPOCHS_NOT_WITH_MAX_STEPS = ("search.space.epochs cannot be combined with hyperparameters.maxSteps (they are "
                                    "mutually exclusive); cap trials with search.maxTrialSteps instead")


SEARCH_ONE_WORKER = ("search trains each trial on one worker (with resources.gpusPerWorker GPUs): set "
                     "resources.workers to 1; trials run side by side with search.concurrentTrials")


def check_search(search: Optional[Search], adaptation: Adaptation, hp: Hyperparameters, workers: int) -> None:
    """The search's cross-field rules (twins of FineTuneJobSpec's CEL rules)."""
    if search is None:
        return
    if workers != 1:
        raise FieldError("resources.workers", SEARCH_ONE_WORKER)
    if search.space.lora is not None and adaptation.method not in (AdaptationMethod.lora, AdaptationMethod.dora,
                                                                   AdaptationMethod.qlora):
        raise FieldError("search.space.lora", SEARCH_LORA_NEEDS_LORA)
    if search.space.epochs is not None and hp.max_steps is not None:
        raise FieldError("search.space.epochs", SEARCH_EPOCHS_NOT_WITH_MAX_STEPS)


class TrainerConfig(CamelModel):
    """Everything the trainer needs for one run; rendered by the operator into config.json."""

    version: Literal[1] = 1
    """Contract version."""
    run: RunInfo
    model: ModelSource
    dataset: ResolvedDataset
    adaptation: Adaptation = Field(default_factory=Adaptation)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    resources: Workers = Field(default_factory=Workers)
    output_uri: OutputUri
    """Run directory: every stage writes `<outputUri>/<stage>/` plus a manifest.json there."""
    merged_model: bool = False
    """Also save the adapter merged into the base model (a plain from_pretrained directory)."""
    progress: ProgressSink = Field(default_factory=ProgressSink)
    champion: Optional[ChampionRef] = None
    search: Optional[Search] = None
    """A hyperparameter search in the train stage (FineTuneJob spec.search)."""
    eval_dataset: Optional[ResolvedDataset] = None
    """The fixed evaluation set (evaluation.datasetRef) as the operator resolved it: its spec, the
    revision and content fingerprint its validation found. The evaluate stage prepares it like a
    held-out split and scores every model on it."""
    comparison: Optional[Comparison] = None
    """How the candidate is compared with the champion (defaults: loss, 95%)."""

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than null when unset: configs of runs without them render as before.
        out = handler(self)
        for name, alias in (("eval_dataset", "evalDataset"), ("comparison", "comparison")):
            if getattr(self, name) is None:
                out.pop(name, None)
                out.pop(alias, None)
        return out

    def config_hash(self) -> str:
        """Hash of what determines the result (run identity and sinks excluded), for lineage and
        for deciding whether a finished stage can be reused. A config without a search hashes as
        it did before searches existed; the speed levers (SPEED_LEVERS) are left out: they change
        how fast, not what, a run computes, so a run may resume with them changed."""
        # The evaluation set and the comparison change only what evaluate measures, never the
        # prep/train stages this hash lets a retry reuse (evaluation.datasetRef, a spec field, does).
        exclude: dict[str, Any] = {k: True for k in ("run", "progress", "champion", "output_uri",
                                                      "eval_dataset", "comparison")}
        if self.search is None:
            exclude["search"] = True
        exclude["hyperparameters"] = set(SPEED_LEVERS)
        body = self.model_dump(by_alias=True, mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    @model_validator(mode="after")
    def _search_fits(self) -> "TrainerConfig":
        check_search(self.search, self.adaptation, self.hyperparameters, self.resources.workers)
        return self

    @model_validator(mode="after")
    def _cpu_checks(self) -> "TrainerConfig":
        if self.adaptation.method is AdaptationMethod.qlora and self.resources.strategy is Strategy.fsdp:
            raise FieldError("resources.strategy", QLORA_NOT_WITH_FSDP)
        if self.adaptation.method is AdaptationMethod.qlora and self.resources.gpus_per_worker < 1:
            raise FieldError(
                "resources.gpusPerWorker",
                "adaptation.method qlora needs a GPU (4-bit bitsandbytes kernels); "
                "set resources.gpusPerWorker >= 1 or use method lora"
            )
        return self

    @model_validator(mode="after")
    def _image_caption_fits(self) -> "TrainerConfig":
        if self.dataset.schema_ is DataSchema.image_caption:
            problem = image_caption_unsupported(self)
            if problem is not None:
                raise FieldError(*problem)
        return self


def image_caption_unsupported(cfg: "TrainerConfig") -> Optional[tuple[str, str]]:
    """(field, message) for the first setting a Dataset of schema image-caption (a text-to-image
    diffusion model, docs/image-models.md) cannot honour yet, else None: rejected up front, never
    half-applied."""
    why = "with a Dataset of schema image-caption (a text-to-image diffusion model)"
    ad, ev, hp = cfg.adaptation, cfg.evaluation, cfg.hyperparameters
    if ad.method is not AdaptationMethod.lora:
        return "adaptation.method", f"only method lora is supported {why}; got {ad.method.value}"
    if ad.activation is not None:
        return "adaptation.activation", f"activation cannot be changed {why}"
    if cfg.search is not None:
        return "search", f"search is not supported {why}"
    if cfg.merged_model:
        return "mergedModel", f"mergedModel is not supported {why}; the LoRA adapter loads with load_lora_weights"
    if cfg.resources.strategy is Strategy.fsdp:
        return "resources.strategy", f"strategy fsdp is not supported {why}; use ddp"
    if hp.packing:
        return "hyperparameters.packing", f"packing applies to token sequences, not {why}"
    if cfg.dataset.preprocessing.dedupe is Dedupe.near:
        return "dataset.preprocessing.dedupe", f"dedupe near is not supported {why}; use exact or none"
    others = [m.value for m in ev.metrics if m is not Metric.loss]
    if others:
        return "evaluation.metrics", (f"{', '.join(others)} cannot be measured {why}: its metric is the held-out "
                                      "denoising loss; set metrics: [loss]")
    for i, g in enumerate(ev.gates):
        if g.metric is not Metric.loss:
            return f"evaluation.gates[{i}].metric", f"only loss gates apply {why}"
    if ev.cross_validation is not None:
        return "evaluation.crossValidation", f"crossValidation is not supported {why}"
    if ev.dataset_ref is not None:
        return "evaluation.datasetRef", f"a fixed evaluation set is not supported {why} yet"
    if cfg.comparison is not None and cfg.comparison.metric is not Metric.loss:
        return "comparison.metric", f"only loss can be compared {why}"
    return None
