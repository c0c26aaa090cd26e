"""tailor.dev/v1alpha1: the FineTuneJob and Dataset APIs as pydantic models.

These models are the source of truth: ``tailor_operator.crdgen`` generates the CRDs from them
(each docstring becomes ``kubectl explain`` text, each cross-field validator has a CEL twin).
The pipeline blocks (data, adaptation, hyperparameters, evaluation) come from
``tailor_trainer.config`` so the spec and the trainer contract share one definition.
"""

from __future__ import annotations


from datetime import datetime
from enum import Enum
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from tailor_trainer._base import (
    CamelModel,
    Duration,
    FieldError,
    K8sLabel,
    K8sName,
    OutputUri,
    Quantity,
    SecretRef,
    ShortStr,
    Text,
    cel,
    with_cel,
)
from tailor_trainer.config import (
    FSDP_NEEDS_WORKERS,
    QLORA_NOT_WITH_FSDP,
    SEARCH_EPOCHS_NOT_WITH_MAX_STEPS,
    SEARCH_LORA_NEEDS_LORA,
    SEARCH_ONE_WORKER,
    Adaptation,
    AdaptationMethod,
    DataSpec,
    Evaluation,
    Hyperparameters,
    Metric,
    ModelSource,
    Search,
    Strategy,
    check_search,
)

GROUP = "tailor.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Five-field cron, e.g. "0 3 * * 1"; each field a number, range, list, step or '*'.
_CRON_FIELD = r"(\*|[0-9]+(-[0-9]+)?)(/[0-9]+)?(,(\*|[0-9]+(-[0-9]+)?)(/[0-9]+)?)*"
CRON_PATTERN = rf"^{_CRON_FIELD}( {_CRON_FIELD}){{4}}$"

# =============================================================================================
# Shared status pieces


class ConditionStatus(str, Enum):
    true = "True"
    false = "False"
    unknown = "Unknown"


class Condition(CamelModel):
    """A metav1.Condition: one aspect of the object's state, with reason and message."""

    type: ShortStr
    """Condition type, e.g. Ready, DataValidated, Running, Evaluated, Promoted, Failed, Suspended."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: ShortStr = ""
    """One-word CamelCase reason."""
    message: Text = ""
    """Human-readable detail."""
    last_transition_time: Optional[datetime] = None
    """When status last changed."""
    observed_generation: Optional[int] = None
    """metadata.generation this condition was computed from."""


class ObjectMeta(CamelModel):
    """The part of metadata Tailor reads; the rest is accepted and ignored."""

    model_config = {"extra": "allow"}

    name: K8sName
    """Object name."""
    namespace: Optional[K8sLabel] = None
    """Namespace."""
    generation: Optional[int] = None
    uid: Optional[str] = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# =============================================================================================
# Dataset


class DatasetSpec(DataSpec):
    """A versioned dataset: where it lives, its layout, cleaning and split."""

    revision: Optional[ShortStr] = None
    """Pin the revision (any string, e.g. a date or commit). When unset, the revision is a hash of
    the files' content when the operator can read the source itself (a local path or file://
    under the allowed roots), else the fingerprint of the rows the validation kept (other
    sources: pvc://, s3://, http(s)://, hf://, a ConfigMap), re-read every refreshInterval."""
    refresh_interval: Optional[Duration] = None
    """How often to re-check the source for a new revision, e.g. 1h. Never by default."""




class RowError(CamelModel):
    """One rejected input row."""

    line: int = Field(ge=0)
    """1-based line (or row) number in its file."""
    file: Optional[str] = None
    """File the row came from, when the source has several."""
    reason: ShortStr
    """Why the row was rejected, e.g. BadJSON, WrongType, MissingField, InvalidUTF8."""
    message: Text = ""
    """Detail, naming the field when one is at fault."""


class SplitCounts(CamelModel):
    """Rows in each split after cleaning."""

    train: int = 0
    """Rows in the train split."""
    validation: int = 0
    """Rows in the validation split (validation loss, early stopping)."""
    test: int = 0
    """Rows in the test split (held-out evaluation; validation is used when it is empty)."""


class DatasetStatus(CamelModel):
    """What the operator observed and validated. Written by the operator only."""

    revision: Optional[str] = None
    """Revision that was validated (spec.revision or the content fingerprint)."""
    content_fingerprint: Optional[str] = None
    """Fingerprint of the rows the validation kept (order-independent, tokenizer-independent).
    A run is pinned to it: its prep fails with DatasetChanged if it reads other rows."""
    rows: Optional[int] = None
    """Rows kept after cleaning."""
    rows_read: Optional[int] = None
    """Rows read from the source before cleaning."""
    splits: Optional[SplitCounts] = None
    """Rows per split."""
    dropped: dict[str, int] = Field(default_factory=dict)
    """Rows dropped, by reason: empty, tooShort, tooLong, duplicate, nearDuplicate, evalOverlap,
    overlong, and malformed rows as badJson, badCsv, invalidUtf8, wrongType, missingField."""
    first_errors: list[RowError] = Field(default_factory=list, max_length=20)
    """The first malformed rows, with line numbers."""
    tokens: dict[str, float] = Field(default_factory=dict)
    """Token-length statistics when a tokenizer was available (mean, p50, p95, max, overLimit)."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready (data validated and usable by jobs), Reconciling (a validation in flight), Stalled
    (validation failed or refused) and Validating."""
    observed_generation: Optional[int] = None
    """metadata.generation last acted on."""
    last_updated: Optional[datetime] = None
    """When the status was last written."""


class Dataset(CamelModel):
    """A Dataset: versioned training data, validated on CPUs before any GPU is requested."""

    api_version: Literal["tailor.dev/v1alpha1"] = API_VERSION
    kind: Literal["Dataset"] = "Dataset"
    metadata: ObjectMeta
    spec: DatasetSpec
    status: Optional[DatasetStatus] = None


# =============================================================================================
# FineTuneJob


class DatasetRef(CamelModel):
    """A Dataset in the same namespace."""

    name: K8sName
    """Name of the Dataset."""


class Toleration(CamelModel):
    """A core/v1 Toleration (taints of the GPU node pool)."""

    key: Optional[ShortStr] = None
    """Taint key to tolerate; empty with operator Exists tolerates everything."""
    operator: Optional[Literal["Exists", "Equal"]] = None
    """Exists or Equal (default Equal)."""
    value: Optional[ShortStr] = None
    """Taint value (operator Equal)."""
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    """Taint effect to match; empty matches all."""
    toleration_seconds: Optional[int] = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class Resources(
    CamelModel,
    json_schema_extra=with_cel(
        cel("!has(self.strategy) || self.strategy != 'fsdp' || (has(self.workers) && self.workers >= 2)",
            FSDP_NEEDS_WORKERS, ".workers"),
    ),
):
    """Where and on what the run executes (the Ray worker group)."""

    workers: int = Field(1, ge=1, le=256)
    """Ray Train workers, one per pod (ranks). Defaults to 1."""
    strategy: Strategy = Strategy.ddp
    """ddp: every worker holds the whole model (DistributedDataParallel); fsdp: weights, gradients
    and optimizer state are sharded across the workers (PyTorch FSDP2), for models that do not
    fit one GPU; needs workers >= 2. Defaults to ddp."""
    gpus_per_worker: int = Field(1, ge=0, le=16)
    """nvidia.com/gpu per worker; 0 trains on CPU. Defaults to 1."""
    cpus_per_worker: Quantity = "4"
    """CPU request/limit per worker. Defaults to 4."""
    memory_per_worker: Quantity = "16Gi"
    """Memory request/limit per worker. Defaults to 16Gi."""
    node_selector: dict[str, ShortStr] = Field(default_factory=dict, max_length=32)
    """Node labels the worker pods must match (the GPU node pool)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations for tainted GPU nodes."""
    affinity: Optional[dict[str, Any]] = Field(
        None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"}
    )
    """A core/v1 Affinity for the worker pods, passed through unchanged."""
    image: Optional[Text] = None
    """Trainer image. Defaults to the operator's configured trainer image."""
    priority_class_name: Optional[K8sName] = None
    """PriorityClass of the pods."""

    @model_validator(mode="after")
    def _fsdp_needs_workers(self) -> "Resources":
        if self.strategy is Strategy.fsdp and self.workers < 2:
            raise FieldError("workers", FSDP_NEEDS_WORKERS)
        return self


class OutputSpec(CamelModel):
    """Where models, checkpoints and reports go."""

    uri: OutputUri
    """Output root; each run writes under `<uri>/<namespace>/<job>-<uid[:8]>/<run>/`. A path or
    file://, pvc://<claim>/<path>, s3://<bucket>/<prefix>."""
    secret_ref: Optional[SecretRef] = None
    """Secret with credentials for the output store. Names only, never values."""
    merged_model: bool = False
    """Also save the adapter merged into the base model. Defaults to false."""


class Trigger(CamelModel):
    """What starts the next run."""

    on_dataset_revision: bool = True
    """Start a new run when the Dataset's revision changes. Defaults to true."""
    schedule: Optional[str] = Field(None, max_length=128, pattern=CRON_PATTERN)
    """Also start a run on this cron schedule (5 fields, UTC), e.g. "0 3 * * 1"."""


class ConfigMapTarget(CamelModel):
    """Write the champion's model URI into a ConfigMap key."""

    name: K8sName
    """ConfigMap name (same namespace); created if missing."""
    key: ShortStr = "model-uri"
    """Key to write. Defaults to model-uri."""


class InferenceServiceTarget(CamelModel):
    """Point a KServe InferenceService's predictor storageUri at the champion, optionally as a
    canary first (KServe's spec.predictor.canaryTrafficPercent)."""

    name: K8sName
    """InferenceService name (same namespace)."""
    canary_traffic_percent: Optional[int] = Field(None, ge=1, le=99)
    """Staged rollout: a new champion first gets this share of traffic (KServe
    canaryTrafficPercent; the previous model keeps the rest), and all of it once the
    InferenceService has reported it Ready for canaryHoldSeconds. Unset: straight to 100%."""
    canary_hold_seconds: int = Field(300, ge=0, le=604_800)
    """How long the canary must stay Ready at canaryTrafficPercent before it gets all traffic.
    Defaults to 300."""
    progress_deadline_seconds: int = Field(600, ge=1, le=604_800)
    """Roll back a canary that is not Ready this long after it started (it is rolled back at
    once when the InferenceService reports Ready False for it). Defaults to 600."""


class RolloutTarget(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "has(self.configMap) != has(self.inferenceService)",
            "target sets exactly one of configMap and inferenceService",
        )
    ),
):
    """Where a promotion is applied."""

    config_map: Optional[ConfigMapTarget] = None
    """A ConfigMap key receiving the model URI."""
    inference_service: Optional[InferenceServiceTarget] = None
    """A KServe InferenceService whose storageUri is updated."""

    @model_validator(mode="after")
    def _one_target(self) -> "RolloutTarget":
        if (self.config_map is None) == (self.inference_service is None):
            raise FieldError("configMap", "target sets exactly one of configMap and inferenceService")
        return self


class PromotionMode(str, Enum):
    min = "min"
    max = "max"


class Promotion(CamelModel):
    """When a candidate replaces the champion (compared on the same held-out data)."""

    metric: Metric = Metric.loss
    """Metric compared: loss, perplexity, accuracy, exactMatch. Defaults to loss."""
    mode: Optional[PromotionMode] = None
    """min (lower is better) or max. Defaults to the metric's natural direction."""
    min_improvement: float = Field(0.0, ge=0.0)
    """Smallest improvement over the champion (absolute) that promotes. Defaults to 0."""
    confidence: Optional[float] = Field(None, gt=0.5, lt=1.0)
    """Promote only when the improvement is significant: the lower bound of its paired-bootstrap
    interval at this confidence (e.g. 0.95), computed on the rows both models were scored on,
    clears minImprovement. Unset: the point estimate decides (the interval is still reported)."""
    pinned_run: Optional[K8sName] = None
    """Rollback / pinning: while set, the champion and the target are this recorded run
    (`<job>-r<N>`, a Succeeded run in status.history with a model) and stay there; new runs still
    train and are compared with it but are never promoted. Remove it to let the next better run
    promote."""
    target: Optional[RolloutTarget] = None
    """Where the promotion is applied. Only status.champion changes when unset."""


class ContinuousLearning(CamelModel):
    """Retrain on new data and promote only when better than the current champion."""

    trigger: Trigger = Field(default_factory=Trigger)
    """What starts the next run."""
    promotion: Promotion = Field(default_factory=Promotion)
    """Promotion policy."""
    history_limit: int = Field(10, ge=1, le=100)
    """Runs kept in status.history. Defaults to 10."""


class Backend(str, Enum):
    kuberay = "kuberay"
    local = "local"


class FineTuneJobSpec(
    CamelModel,
    json_schema_extra=with_cel(
        cel(
            "!has(self.adaptation) || !has(self.adaptation.method) || self.adaptation.method != 'qlora'"
            " || !has(self.resources) || !has(self.resources.gpusPerWorker) || self.resources.gpusPerWorker >= 1",
            "adaptation.method qlora needs GPUs: resources.gpusPerWorker must be at least 1",
            ".resources.gpusPerWorker",
        ),
        cel(
            "!has(self.adaptation) || !has(self.adaptation.method) || self.adaptation.method != 'qlora'"
            " || !has(self.resources) || !has(self.resources.strategy) || self.resources.strategy != 'fsdp'",
            QLORA_NOT_WITH_FSDP,
            ".resources.strategy",
        ),
        cel(
            "!has(self.search) || !has(self.search.space.lora) || !has(self.adaptation)"
            " || !has(self.adaptation.method) || self.adaptation.method in ['lora', 'dora', 'qlora']",
            SEARCH_LORA_NEEDS_LORA,
            ".search.space.lora",
        ),
        cel(
            "!has(self.search) || !has(self.search.space.epochs) || !has(self.hyperparameters)"
            " || !has(self.hyperparameters.maxSteps)",
            SEARCH_EPOCHS_NOT_WITH_MAX_STEPS,
            ".search.space.epochs",
        ),
        cel(
            "!has(self.search) || !has(self.resources) || !has(self.resources.workers) || self.resources.workers == 1",
            SEARCH_ONE_WORKER,
            ".resources.workers",
        ),
        # Transition rule (no Python twin: it needs the old object). Runs of the old backend would
        # be orphaned by a change; see docs/operator.md "Spec changes while a run is active".
        cel(
            "(has(self.backend) ? self.backend : 'kuberay') == (has(oldSelf.backend) ? oldSelf.backend : 'kuberay')",
            "backend is immutable: create a new FineTuneJob to use another backend",
            ".backend",
        ),
    ),
):
    """A fine-tuning job: base model + dataset + adaptation + hyperparameters + evaluation."""

    base_model: ModelSource
    """The pretrained model to start from."""
    dataset_ref: DatasetRef
    """The Dataset to train on (same namespace); runs wait until it is Ready."""
    adaptation: Adaptation = Field(default_factory=Adaptation)
    """How the model is adapted: PEFT method or full fine-tuning, freezing, added layers,
    activation."""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    """Training hyperparameters."""
    evaluation: Evaluation = Field(default_factory=Evaluation)
    """Evaluation on the held-out split, gates and samples."""
    resources: Resources = Field(default_factory=Resources)
    """Workers, GPUs and placement."""
    output: OutputSpec
    """Where models, checkpoints and reports go."""
    continuous_learning: Optional[ContinuousLearning] = None
    """Retrain on new data and promote only if better. Off by default (one run)."""
    backend: Backend = Backend.kuberay
    """kuberay (a RayJob on the cluster) or local (embedded Ray in the operator's pod, for
    laptops and CI). Defaults to kuberay."""
    backoff_limit: int = Field(2, ge=0, le=100)
    """Retries of a failed run (each resumes from the last checkpoint, with exponential
    backoff). Defaults to 2."""
    active_deadline_seconds: Optional[int] = Field(None, ge=1, le=31_536_000)
    """Fail a run that has been running longer than this (reason DeadlineExceeded)."""
    progress_deadline_seconds: int = Field(1800, ge=30, le=31_536_000)
    """Fail an attempt whose trainer reports no progress (a step, a stage) for this long, as a
    hung collective or a lost worker group would (reason ProgressDeadlineExceeded); it is retried
    from its last checkpoint within backoffLimit. Raise it for models whose download or
    checkpoint takes longer. Defaults to 1800."""
    suspend: bool = False
    """Suspend: stop the running run (its checkpoints stay) and start nothing until unset."""
    ttl_seconds_after_finished: Optional[int] = Field(None, ge=0, le=31_536_000)
    """Delete the finished run's children (RayJob, ConfigMaps) this long after it finishes; the
    FineTuneJob and its artifacts stay."""
    queue_name: Optional[K8sLabel] = None
    """Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label on the RayJob."""
    registry: Optional[RegistrySpec] = None
    """Register successful runs in the installation's model registry (MLflow). Off by default."""
    search: Optional[Search] = None
    """A bounded hyperparameter search inside the run (Ray Tune): trials with values drawn from
    search.space, hopeless ones stopped early (ASHA), the best one evaluated and promoted like a
    plain run's model. Off by default."""

    @model_validator(mode="after")
    def _search_fits(self) -> "FineTuneJobSpec":
        check_search(self.search, self.adaptation, self.hyperparameters, self.resources.workers)
        return self

    @model_validator(mode="after")
    def _qlora_needs_gpu(self) -> "FineTuneJobSpec":
        if self.adaptation.method is AdaptationMethod.qlora and self.resources.gpus_per_worker < 1:
            raise FieldError(
                "resources.gpusPerWorker",
                "adaptation.method qlora needs GPUs: resources.gpusPerWorker must be at least 1"
            )
        if self.adaptation.method is AdaptationMethod.qlora and self.resources.strategy is Strategy.fsdp:
            raise FieldError("resources.strategy", QLORA_NOT_WITH_FSDP)
        return self


class Phase(str, Enum):
    """Lifecycle of a FineTuneJob; each phase knows whether it is final."""

    pending = "Pending"
    validating = "Validating"
    queued = "Queued"
    running = "Running"
    evaluating = "Evaluating"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"

    @property
    def is_terminal(self) -> bool:
        return self in (Phase.succeeded, Phase.failed)

    @property
    def is_active(self) -> bool:
        """A run exists and may be consuming resources."""
        return self in (Phase.queued, Phase.running, Phase.evaluating)


class Progress(CamelModel):
    """Training progress of the current run."""

    summary: Optional[str] = None
    """Short form for `kubectl get`, e.g. "42% 120/300"."""
    percent: Optional[int] = Field(None, ge=0, le=100)
    """Percent of training steps done."""
    step: Optional[int] = None
    """Optimizer steps done."""
    total_steps: Optional[int] = None
    """Optimizer steps the run will take (maxSteps, else epochs x steps per epoch)."""
    epoch: Optional[float] = None
    """Epochs done (fractional)."""
    loss: Optional[float] = None
    """Latest training loss."""
    tokens_per_second: Optional[float] = None
    """Training throughput since the stage started, over all workers."""
    eta_seconds: Optional[int] = None
    """Estimated seconds until training ends, from the pace so far."""


class EvalMetrics(CamelModel):
    """Held-out metrics of the fine-tuned model (and the base model, for comparison)."""

    loss: Optional[float] = None
    """Mean cross-entropy per label token on the held-out rows (test split, else validation)."""
    perplexity: Optional[float] = None
    """exp(loss)."""
    accuracy: Optional[float] = None
    """Fraction of label tokens whose most likely next token is the label."""
    exact_match: Optional[float] = None
    """Fraction of held-out prompts whose greedy generation equals the reference (whitespace
    collapsed); only for data with prompts and references."""
    base_loss: Optional[float] = None
    """loss of the base model on the same rows (evaluation.compareToBase)."""
    base_perplexity: Optional[float] = None
    """perplexity of the base model on the same rows."""
    base_accuracy: Optional[float] = None
    """accuracy of the base model on the same rows."""
    base_exact_match: Optional[float] = None
    """exactMatch of the base model on the same rows."""
    train_loss: Optional[float] = None
    """Training loss of the last step."""
    cv_loss_mean: Optional[float] = None
    """Mean held-out loss over the cross-validation folds (evaluation.crossValidation)."""
    cv_loss_std: Optional[float] = None
    """Population standard deviation of the folds' held-out losses."""


class Artifacts(CamelModel):
    """Where the run's outputs are."""

    model: Optional[str] = None
    """Adapter (or full model) directory."""
    merged_model: Optional[str] = None
    """Base model with the adapter merged in (output.mergedModel; not for prefix tuning)."""
    report: Optional[str] = None
    """HTML report."""
    result: Optional[str] = None
    """result.json."""


class ChampionStatus(CamelModel):
    """The model currently promoted."""

    run: str
    """The run whose model is the champion."""
    dataset_revision: Optional[str] = None
    """Dataset revision it was trained on."""
    model: Optional[str] = None
    """Its model directory (what a promotion target points to)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Its held-out metrics when it was promoted (later candidates re-score it on their rows)."""
    promoted_at: Optional[datetime] = None
    """When it was promoted."""


class EvaluatedOn(CamelModel):
    """Where a run was evaluated."""

    dataset: Optional[str] = None
    """The fixed evaluation Dataset (spec.evaluation.datasetRef); unset: the run's own split."""
    revision: Optional[str] = None
    """Its revision."""
    split: Optional[str] = None
    """The run's held-out split (test, else validation) when no fixed set is used."""
    rows: Optional[int] = None
    """Rows scored."""


class ImprovementInterval(CamelModel):
    """The improvement of a candidate over another model on the same rows (positive: better, in
    the metric's direction) and its paired-bootstrap confidence interval."""

    metric: str
    """The metric compared (continuousLearning.promotion.metric)."""
    against: str
    """The model compared with: the champion's run, or `base`."""
    improvement: float
    """Point estimate on all the rows."""
    low: float
    """Lower bound of the interval."""
    high: float
    """Upper bound of the interval."""
    confidence: float
    """Two-sided confidence of the interval, e.g. 0.95."""
    rows: int
    """Rows resampled (paired: both models on each)."""


class HistoryEntry(CamelModel):
    """One finished run, or a rollback (reason Pinned / Unpinned)."""

    run: str
    """Run name, `<job>-r<N>`."""
    phase: Phase
    """Succeeded or Failed."""
    dataset_revision: Optional[str] = None
    """Dataset revision the run trained on."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Its held-out metrics (empty when it failed before evaluation)."""
    promoted: bool = False
    """Whether it became the champion."""
    reason: Optional[str] = None
    """Why it was or was not promoted (Improved, NotBetter, ...), or why it failed."""
    completion_time: Optional[datetime] = None
    """When it finished."""
    model: Optional[str] = None
    """Its model directory (succeeded runs), what a model registry version points at."""
    evaluated_on: Optional[EvaluatedOn] = None
    """The rows its metrics were measured on: the fixed evaluation set and its revision, or the
    run's own held-out split."""
    interval: Optional[ImprovementInterval] = None
    """Its improvement over the model it was compared with (the champion, else the base model) on
    those rows, with a paired-bootstrap confidence interval."""
    config_hash: Optional[str] = None
    """Hash of the TrainerConfig it ran with."""


class RolloutPhase(str, Enum):
    progressing = "Progressing"
    succeeded = "Succeeded"
    failed = "Failed"


class RolloutStatus(CamelModel):
    """Where the staged rollout (canary) of the latest champion into its InferenceService stands."""

    phase: RolloutPhase
    """Progressing (canary at canaryTrafficPercent), Succeeded (all traffic) or Failed (rolled
    back to the previous champion)."""
    run: str
    """The run being rolled out."""
    model: str
    """Its model directory."""
    canary_traffic_percent: Optional[int] = None
    """Traffic share the canary has while Progressing."""
    started_at: datetime
    """When the canary started."""
    ready_since: Optional[datetime] = None
    """Since when the InferenceService reports the canary Ready (canaryHoldSeconds count from here)."""
    finished_at: Optional[datetime] = None
    """When it got all traffic or was rolled back."""
    message: Optional[Text] = None
    """What the last step found."""
    previous: Optional[ChampionStatus] = None
    """The champion before it: restored on rollback."""


class RegistrySpec(CamelModel):
    """Register each successful run as a model version in the installation's MLflow model
    registry; promotions and rollbacks move its `champion` alias. Needs the operator's registry
    settings (the tenant never chooses the registry's address)."""

    model_name: Optional[K8sName] = None
    """Registered model name, always prefixed with the namespace: `<namespace>.<modelName>`.
    Defaults to the job's name."""


class JobError(CamelModel):
    """Why the job failed or is blocked (OpenAI-style error{code, message, param})."""

    reason: ShortStr
    """CamelCase reason, e.g. DatasetNotFound, Diverged, DeadlineExceeded, GateFailed."""
    message: Text
    """What happened and what to change, in words."""
    field: Optional[ShortStr] = None
    """Spec field at fault, when one is."""


class SearchBest(CamelModel):
    """The best trial of a hyperparameter search (when the run finished: the chosen one)."""

    trial: Optional[ShortStr] = None
    """Trial id, e.g. t03."""
    params: dict[str, float] = Field(default_factory=dict)
    """The values it trained with, by spec name (learningRate, lora.r, ...)."""
    objective: Optional[float] = None
    """Its objective (validation loss: lower is better)."""
    steps: Optional[int] = None
    """Optimizer steps it trained."""


class SearchStatus(CamelModel):
    """Where the current run's hyperparameter search (spec.search) stands."""

    summary: Optional[ShortStr] = None
    """Short form for `kubectl get -o wide`: finished trials / planned trials, e.g. "4/6"."""
    trials: Optional[int] = None
    """Trials the search runs in all."""
    pending: int = 0
    """Trials not started yet."""
    running: int = 0
    """Trials training now."""
    completed: int = 0
    """Trials that trained to their end."""
    stopped: int = 0
    """Trials stopped early: by the scheduler (behind at a rung), by the maxGpuHours budget, or
    because they diverged."""
    failed: int = 0
    """Trials that failed."""
    objective: Optional[ShortStr] = None
    """What trials are ranked by (valLoss: lower is better)."""
    best: Optional[SearchBest] = None
    """The best trial so far; once the run finished, the one whose model was evaluated."""


class FineTuneJobStatus(CamelModel):
    """Observed state. Written by the operator only."""

    phase: Phase = Phase.pending
    """Pending, Validating, Queued, Running, Evaluating, Succeeded, Failed or Suspended."""
    stage: Optional[Literal["prep", "adapt", "train", "evaluate"]] = None
    """Pipeline stage the current run is in (or finished in)."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready, Reconciling and Stalled (the kstatus summary GitOps tools read), then DataValidated,
    ModelChecked, Running, Retrying, Evaluated, Promoted, Failed, Suspended."""
    progress: Optional[Progress] = None
    """Training progress of the current run."""
    search: Optional[SearchStatus] = None
    """The current run's hyperparameter search (spec.search): trials by state and the best one."""
    metrics: Optional[EvalMetrics] = None
    """Held-out metrics of the last evaluated run."""
    current_run: Optional[str] = None
    """Name of the current (or last) run, `<job>-r<N>`; its RayJob or work directory has this name."""
    run_count: int = 0
    """Runs started so far (the N of the next `<job>-r<N>` is runCount + 1)."""
    attempts: int = 0
    """Attempts of the current run (1 + retries)."""
    dataset_revision: Optional[str] = None
    """Dataset revision the current run trains on."""
    dataset_fingerprint: Optional[str] = None
    """Content fingerprint of the rows the current run is pinned to (the Dataset's
    status.contentFingerprint when the run started). Every attempt's prep checks what it reads
    against it and fails with DatasetChanged rather than train on other rows."""
    artifacts: Optional[Artifacts] = None
    """Where the last evaluated run's outputs are."""
    champion: Optional[ChampionStatus] = None
    """The promoted model (continuous learning: only a better candidate replaces it)."""
    rollout: Optional[RolloutStatus] = None
    """The staged rollout of the latest champion (InferenceService target with canaryTrafficPercent)."""
    history: list[HistoryEntry] = Field(default_factory=list, max_length=100)
    """Finished runs, oldest first (continuousLearning.historyLimit entries)."""
    start_time: Optional[datetime] = None
    """When the current run started."""
    completion_time: Optional[datetime] = None
    """When the current run finished."""
    observed_generation: Optional[int] = None
    """metadata.generation the operator last reconciled (kstatus: the status describes that spec)."""
    run_generation: Optional[int] = None
    """metadata.generation the current run started from (or the latest spec the operator had
    nothing to do for, or refused). A training-field edit during a run waits for the next run;
    a Failed job whose generation differs from it starts a new run."""
    error: Optional[JobError] = None
    """Why the job failed or is blocked (also while an attempt waits to be retried)."""


class FineTuneJob(CamelModel):
    """A FineTuneJob: fine-tune a pretrained model on a Dataset, evaluate it, and (optionally)
    keep retraining and promoting the best model."""

    api_version: Literal["tailor.dev/v1alpha1"] = API_VERSION
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: Optional[FineTuneJobStatus] = None


KINDS: dict[str, type[CamelModel]] = {"FineTuneJob": FineTuneJob, "Dataset": Dataset}


def parse_object(obj: dict[str, Any]) -> CamelModel:
    """Parse one manifest (dict) into its model; raises ValueError for unknown kinds."""
    kind = obj.get("kind")
    api_version = obj.get("apiVersion")
    if api_version != API_VERSION or kind not in KINDS:
        raise ValueError(f"unsupported object apiVersion={api_version!r} kind={kind!r}")
    return KINDS[kind].model_validate(obj)


__all__ = [
    "API_VERSION",
    "Backend",
    "Condition",
    "Dataset",
    "DatasetSpec",
    "DatasetStatus",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "GROUP",
    "KINDS",
    "Phase",
    "VERSION",
    "parse_object",
]
