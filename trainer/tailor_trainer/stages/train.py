"""The train stage: Ray Train ``TorchTrainer`` running the recipe, :func:`tailor_trainer.training.fit`.

Where it runs:
- ``resources.workers`` > 1, or inside a Ray cluster (``RAY_ADDRESS`` set, the RayJob case): a
  Ray Train worker group, DDP (or FSDP) over gloo on CPU or NCCL on GPU. Rank 0 sends progress to
  a small relay actor that the driver forwards to the reporter.
- one worker and no cluster (laptop, CI, ``tailor run``): Ray Train's local mode
  (``ScalingConfig(num_workers=0)``), the same function in this process without starting Ray.
  ``TAILOR_RAY_LOCAL_MODE=0`` forces a worker group.

Files (docs/stage-contracts.md): ``train/checkpoints/step-N/`` (written to a temporary name, then
renamed, with a manifest), ``train/metrics.jsonl``, ``train/model/`` (adapter or full model) and,
with ``mergedModel``, ``train/merged/``; the manifest is the outcome of ``fit`` plus file names.

With ``search``: Ray Tune trials of the same recipe (``tailor_trainer.search``), each in
``train/trials/<id>/``; the best one's model becomes ``train/model``.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import uuid
from typing import Any, Callable, NamedTuple, Optional

from tailor_trainer import storage
from tailor_trainer.adaptation import preflight
from tailor_trainer.batches import load_rows
from tailor_trainer.checkpoints import CHECKPOINTS, list_checkpoints
from tailor_trainer.config import AdaptationMethod, TrainerConfig
from tailor_trainer.errors import Diverged, InvalidSpec, StageError, TrainingFailed
from tailor_trainer.runtime import ensure_ray, stage_error_in, start_relay, use_local_mode
from tailor_trainer.search import run_search
from tailor_trainer.stages.base import StageContext
from tailor_trainer.training import fit

_LOCAL_PROGRESS: dict[str, Callable[..., None]] = {}


# ---------------------------------------------------------------------------------------------
# Ray Train entry point (each worker; or this process in local mode)


def train_worker(job: dict[str, Any]) -> dict[str, Any]:
    w = worker_setup(job)
    cfg, rank, progress, device, run_dir, model_dir, mirror = w
    train_rows = load_rows(run_dir, "train")
    val_rows = load_rows(run_dir, "validation")
    push = (lambda: mirror.push(f"train/{CHECKPOINTS}", delete=True)) if (mirror and rank == 0) else None
    _, outcome = fit(cfg, model_dir, train_rows, val_rows, config_hash=job["configHash"],
                     train_dir=os.path.join(run_dir, "train"), threads=job.get("threads"),
                     progress=progress, device=device, on_checkpoint=push)
    return worker_done(job, w, outcome)


class WorkerSetup(NamedTuple):
    cfg: TrainerConfig
    rank: int
    progress: Optional[Callable[..., None]]
    device: Any
    run_dir: str
    model_dir: str
    mirror: Any


def worker_setup(job: dict[str, Any]) -> WorkerSetup:
    """What every train worker needs before its recipe: the config, rank, progress callback (rank
    0), device, this node's run directory (s3: prep and checkpoints pulled) and base model."""
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
    return WorkerSetup(cfg, rank, progress, device, run_dir, model_dir, mirror)


def worker_done(job: dict[str, Any], w: WorkerSetup, outcome: dict[str, Any]) -> dict[str, Any]:
    """After the recipe: upload (s3) and hand rank 0's outcome to the driver."""
    mirror, rank, relay = w.mirror, w.rank, job.get("relay")
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
    cfg = ctx.config
    preflight(cfg)
    if cfg.hyperparameters.packing and cfg.adaptation.method is AdaptationMethod.prefix:
        raise InvalidSpec("prefix tuning cannot be combined with packing (virtual tokens would be "
                          "shared by all packed examples); set hyperparameters.packing false",
                          field="spec.hyperparameters.packing")
    train_dir = ctx.stage_dir("train")
    if cfg.search is not None:  # trials over the same recipe, as Ray Tune trials (search.py)
        return run_search(cfg, ctx.run_dir, ctx.base_model_dir(), progress=ctx.progress, mirror=ctx.mirror)
    return launch(ctx, train_worker)


def launch(ctx: StageContext, worker: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Run ``worker`` (a Ray Train loop function taking the job dict) as this stage does: local mode
    or a worker group, progress relayed, restarts bounded, errors surfaced; returns the manifest.
    The diffusion recipe (``tailor_trainer.stages.diffusion``) runs through here too."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = ctx.config
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
        trainer = TorchTrainer(worker, train_loop_config=job,
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
            worker, train_loop_config=job,
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
