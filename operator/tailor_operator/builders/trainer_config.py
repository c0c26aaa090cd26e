"""Pure: a FineTuneJob and its Dataset -> the TrainerConfig one run executes."""

from __future__ import annotations

from typing import Optional

from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob, PromotionMode
from tailor_operator.builders.naming import progress_config_map_name
from tailor_trainer.config import (
    ChampionRef,
    Comparison,
    ProgressSink,
    ResolvedDataset,
    RunInfo,
    TrainerConfig,
    Workers,
)


def _cpus(quantity: str) -> float:
    if quantity.endswith("m"):
        return max(float(quantity[:-1]) / 1000.0, 0.001)
    return float(quantity)


def run_output_uri(job: FineTuneJob, run: str) -> str:
    """Run directory `<output.uri>/<namespace>/<job>-<uid[:8]>/<run>`.

    The namespace and the job's UID keep apart what the job name alone would mix up: a same-named
    job of another namespace writing to the same output, and a job deleted and recreated under its
    old name (which must start from an empty run directory, not resume the old job's checkpoints
    or overwrite its promoted model). Without a UID (`tailor run`, no API server) the job name
    alone, so that running the same manifest again resumes.
    """
    namespace = job.metadata.namespace or "default"
    uid = (job.metadata.uid or "").replace("-", "")[:8]
    owner = f"{job.metadata.name}-{uid}" if uid else job.metadata.name
    return f"{job.spec.output.uri.rstrip('/')}/{namespace}/{owner}/{run}"


def _pinned_fingerprint(dataset: Dataset, revision: Optional[str]) -> Optional[str]:
    """The content fingerprint the run's prep must read: the one the Dataset's validation found
    for the revision the run is pinned to. None when the status names no fingerprint or has moved
    on to another revision (its fingerprint belongs to other rows, so it must not be paired with
    the run's revision)."""
    st = dataset.status
    if st is None or not st.content_fingerprint or revision is None or st.revision != revision:
        return None
    return st.content_fingerprint


def build_trainer_config(
    job: FineTuneJob,
    dataset: Dataset,
    run: str,
    *,
    attempt: int = 1,
    dataset_revision: Optional[str] = None,
    dataset_fingerprint: Optional[str] = None,
    inline_data: Optional[str] = None,
    progress_file: Optional[str] = None,
    champion: Optional[ChampionRef] = None,
    eval_dataset: Optional[Dataset] = None,
    eval_inline_data: Optional[str] = None,
) -> TrainerConfig:
    """Everything the trainer reads; no API calls (the caller resolves revision and inline data).

    `dataset_fingerprint` is the content fingerprint recorded when the run started (a retry after
    the Dataset moved to another revision still checks the rows against it); without it, the
    Dataset's own, when its status still names the run's revision.

    The progress sink is a file for the local backend (`progress_file`), else the ConfigMap
    `<run>-progress` that the operator watches.

    `eval_dataset`: the fixed evaluation set (spec.evaluation.datasetRef), already checked Ready by
    the caller (reconcile/evalset.py); it goes in at the revision its status names, pinned to the
    fingerprint its validation found.
    """
    spec = job.spec
    namespace = job.metadata.namespace or "default"
    data_fields = dataset.spec.model_dump(exclude={"revision", "refresh_interval"})
    revision = dataset_revision or dataset.spec.revision
    resolved = ResolvedDataset(
        **data_fields,
        name=dataset.metadata.name,
        revision=revision,
        content_fingerprint=dataset_fingerprint or _pinned_fingerprint(dataset, revision),
        inline_data=inline_data,
    )
    sink = (
        ProgressSink(file=progress_file)
        if progress_file
        else ProgressSink(config_map=progress_config_map_name(run))
    )
    return TrainerConfig(
        run=RunInfo(job=job.metadata.name, namespace=namespace, name=run, attempt=attempt),
        model=spec.base_model,
        dataset=resolved,
        adaptation=spec.adaptation,
        hyperparameters=spec.hyperparameters,
        evaluation=spec.evaluation,
        resources=Workers(
            workers=spec.resources.workers,
            gpus_per_worker=spec.resources.gpus_per_worker,
            cpus_per_worker=_cpus(spec.resources.cpus_per_worker),
            strategy=spec.resources.strategy,
        ),
        output_uri=run_output_uri(job, run),
        merged_model=spec.output.merged_model,
        progress=sink,
        champion=champion,
        search=spec.search,
        eval_dataset=_eval_dataset(eval_dataset, eval_inline_data) if spec.evaluation.dataset_ref else None,
        comparison=comparison(job),
    )


def _eval_dataset(dataset: Optional[Dataset], inline_data: Optional[str]) -> Optional[ResolvedDataset]:
    if dataset is None:
        return None
    # the revision its validation found (`tailor run`, with no API server: the spec's own)
    revision = dataset.status.revision if dataset.status else dataset.spec.revision
    return ResolvedDataset(**dataset.spec.model_dump(exclude={"revision", "refresh_interval"}),
                           name=dataset.metadata.name, revision=revision,
                           content_fingerprint=_pinned_fingerprint(dataset, revision), inline_data=inline_data)


def comparison(job: FineTuneJob) -> Optional[Comparison]:
    """What the evaluate stage compares and at which confidence: the promotion policy's metric and
    direction (continuous learning), else None (the trainer's defaults: loss, 95%)."""
    cl = job.spec.continuous_learning
    if cl is None:
        return None
    p = cl.promotion
    higher = None if p.mode is None else p.mode is PromotionMode.max
    return Comparison(metric=p.metric, higher_is_better=higher, confidence=p.confidence or 0.95)
