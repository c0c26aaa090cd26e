"""Hyperparameter search (``spec.search``): Ray Tune trials over the training recipe.

The train stage calls :func:`run_search` instead of one Ray Train run when the config has a
``search``. Prep ran once; every trial is :func:`tailor_trainer.training.fit` with the values it
drew (:func:`trial_config`), in its own directory ``train/trials/<id>/`` (checkpoints,
``metrics.jsonl``, ``model/``, ``trial.json``), and reports its validation loss to Tune at each
validation, where ASHA may stop it. The best trial that trained to its end (lowest validation
loss) is copied to ``train/model`` (and ``train/merged``) and goes on to evaluate like a plain
run's model; the manifest is that trial's outcome plus ``search`` (a ``contract.SearchSummary``).

Resume: Tune's experiment state lives in ``train/tune/search/``; a rerun of the stage restores it
(``Tuner.restore``), so finished trials are not trained again and an interrupted one resumes
from its own last checkpoint (fit's, keyed by the trial's config hash).

States (``contract.Trial.state``): pending, running, completed (fit returned: trained to its end,
or its own early stopping), stopped (the scheduler or the time budget ended it, or it diverged:
objective none, ``diverged: true``), failed (an error).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional

from ray import tune

from tailor_trainer import storage
from tailor_trainer.batches import load_rows
from tailor_trainer.checkpoints import CHECKPOINTS, list_checkpoints
from tailor_trainer.config import IntChoices, Range, Search, SearchScheduler, TrainerConfig
from tailor_trainer.contract import SearchSummary
from tailor_trainer.errors import DataInvalid, Diverged, TrainingFailed
from tailor_trainer.runtime import ensure_ray, stage_error_in
from tailor_trainer.training import fit

TRIALS = "trials"
"""``train/trials/<id>/``: one trial's checkpoints, metrics.jsonl, model and trial.json."""
TUNE = "tune"
"""``train/tune/``: Ray Tune's storage; the experiment (its state, for resume) is ``tune/search``."""
EXPERIMENT = "search"
OBJECTIVE = "valLoss"
PROGRESS_EVERY_S = 2.0
HISTORY_POINTS = 32


# ---------------------------------------------------------------------------------------------
# The space and one trial's config


def _spaces(cfg: TrainerConfig) -> list[tuple[str, Any]]:
    """(spec name, Range or IntChoices) of every hyperparameter the search varies."""
    s = cfg.search.space
    lora = s.lora
    named = [("learningRate", s.learning_rate), ("batchSize", s.batch_size), ("epochs", s.epochs),
             ("warmupRatio", s.warmup_ratio), ("weightDecay", s.weight_decay),
             ("lora.r", lora.r if lora else None), ("lora.alpha", lora.alpha if lora else None),
             ("lora.dropout", lora.dropout if lora else None)]
    return [(name, space) for name, space in named if space is not None]


def param_space(cfg: TrainerConfig) -> dict[str, Any]:
    """Tune's param space: logUniform -> loguniform, uniform -> uniform, choices -> choice."""
    out: dict[str, Any] = {}
    for name, space in _spaces(cfg):
        if isinstance(space, IntChoices):
            out[name] = tune.choice(list(space.choices))
        elif space.choices is not None:
            out[name] = tune.choice(list(space.choices))
        elif space.log_uniform is not None:
            out[name] = tune.loguniform(*space.log_uniform)
        else:
            out[name] = tune.uniform(*space.uniform)
    return out


def plain_params(params: dict[str, Any]) -> dict[str, Any]:
    """Tune's draws as plain Python numbers (a choice may come back as a numpy scalar)."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in params.items()}


def planned_steps(hp: Any, train_rows: int) -> int:
    """Optimizer steps fit plans for one worker (training.TrainingRun.plan_schedule)."""
    per_epoch = math.ceil(math.ceil(train_rows / hp.batch_size) / hp.gradient_accumulation_steps)
    return hp.max_steps or max(1, math.ceil(hp.epochs_or_default * per_epoch))


def trial_config(cfg: TrainerConfig, params: dict[str, Any], train_rows: int) -> tuple[TrainerConfig, int]:
    """The plain config one trial trains with (no ``search``), and its total steps.

    ``maxTrialSteps`` caps the steps (as maxSteps: epochs and maxSteps are exclusive); the
    validation cadence is ``evalEverySteps`` when set, else about 8 per trial, so ASHA has rungs.
    """
    body = cfg.model_dump(mode="json", by_alias=True, exclude={"search"})
    hp = body["hyperparameters"]
    for name, value in plain_params(params).items():
        if name.startswith("lora."):
            lora = body["adaptation"].get("lora") or {}
            lora[name.split(".", 1)[1]] = value
            body["adaptation"]["lora"] = lora
        else:
            hp[name] = value
    plain = TrainerConfig.model_validate(body)
    total = planned_steps(plain.hyperparameters, train_rows)
    cap = cfg.search.max_trial_steps
    if cap is not None and total > cap:
        total, hp["maxSteps"], hp["epochs"] = cap, cap, None
    hp["evalEverySteps"] = hp.get("evalEverySteps") or max(1, math.ceil(total / 8))
    return TrainerConfig.model_validate(body), total


def _bound_steps(cfg: TrainerConfig, train_rows: int) -> int:
    """Most steps any trial can train (ASHA's max_t): smallest batch, most epochs."""
    extreme: dict[str, Any] = {}
    for name, space in _spaces(cfg):
        if name == "batchSize":
            extreme[name] = min(space.choices)
        elif name == "epochs":
            extreme[name] = max(space.values())
    return trial_config(cfg, extreme, train_rows)[1]


def short_id(trial_id: str) -> str:
    """Tune's ``<experiment>_00003`` -> ``t03``: stable across a restore, short in the table."""
    counter = trial_id.rsplit("_", 1)[-1]
    return f"t{int(counter):02d}" if counter.isdigit() else trial_id


# ---------------------------------------------------------------------------------------------
# One trial (a Tune function trainable; runs in a Tune actor)


def run_trial(params: dict[str, Any], job: dict[str, Any]) -> None:
    cfg = TrainerConfig.model_validate(job["config"])
    tid = short_id(tune.get_context().get_trial_id())
    run_dir, model_dir = job["runDir"], job["modelDir"]
    mirror = storage.RunMirror.for_output(cfg.output_uri)
    sub = os.path.join("train", TRIALS, tid)
    if mirror is not None:  # this node's copy: the prepared data and this trial's checkpoints
        run_dir = mirror.local
        if not os.path.exists(os.path.join(run_dir, "prep", "manifest.json")):
            mirror.pull("prep")
        mirror.pull(sub)
    if not os.path.isdir(model_dir):
        model_dir = storage.resolve_model_dir(cfg.model.uri, cfg.model.revision)
    train_rows, val_rows = load_rows(run_dir, "train"), load_rows(run_dir, "validation")
    tcfg, total = trial_config(cfg, params, len(train_rows))
    trial_dir = os.path.join(run_dir, sub)
    os.makedirs(trial_dir, exist_ok=True)
    done = storage.read_json(os.path.join(trial_dir, "outcome.json"))
    known = storage.read_json(os.path.join(trial_dir, "trial.json")) or {}
    if done and known.get("configHash") == tcfg.config_hash():
        # finished before Tune's state could record it (a kill right after; s3 output on a new
        # pod): report what it has, train nothing
        _report_final(done, _val_history(os.path.join(trial_dir, "metrics.jsonl")), total)
        return
    storage.write_json_atomic(os.path.join(trial_dir, "trial.json"), {
        "id": tid, "params": plain_params(params), "totalSteps": total, "configHash": tcfg.config_hash()})
    history = _val_history(os.path.join(trial_dir, "metrics.jsonl"))  # a resumed trial's earlier validations

    def on_validation(step: int, val: float) -> None:
        history[:] = [h for h in history if h[0] < step] + [[step, val]]
        if step < total:  # the last one is reported once the model is saved: a stop then loses nothing
            tune.report({"step": step, OBJECTIVE: val, "totalSteps": total, "history": list(history),
                         "finished": False, "diverged": False})

    push = (lambda: mirror.push(os.path.join(sub, CHECKPOINTS), delete=True)) if mirror else None
    _, outcome = fit(tcfg, model_dir, train_rows, val_rows, config_hash=tcfg.config_hash(), train_dir=trial_dir,
                     threads=job["threads"], on_validation=on_validation, on_checkpoint=push)
    storage.write_json_atomic(os.path.join(trial_dir, "outcome.json"), outcome)
    if mirror is not None:
        mirror.push(sub)
    _report_final(outcome, history, total)


def _report_final(outcome: dict[str, Any], history: list[list[float]], total: int) -> None:
    """The trial's last result: ``finished`` (its model is saved) unless it diverged (objective inf)."""
    diverged = outcome["status"] == "diverged"
    last = history[-1][1] if history else None
    tune.report({"step": outcome["steps"], OBJECTIVE: math.inf if diverged or last is None else last,
                 "totalSteps": total, "history": list(history), "finished": not diverged, "diverged": diverged})


def _val_history(path: str) -> list[list[float]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(ln) for ln in f if ln.strip()]
    return [[d["step"], d[OBJECTIVE]] for d in lines if OBJECTIVE in d]


# ---------------------------------------------------------------------------------------------
# The table


def trial_row(trial_id: str, status: str, params: dict[str, Any], last: Optional[dict[str, Any]]) -> dict[str, Any]:
    """One ``contract.Trial`` from Tune's view of it (status, config, last result)."""
    last = last or {}
    history = [[int(s), float(v)] for s, v in last.get("history") or [] if math.isfinite(v)]
    objective = min((v for _, v in history), default=None)
    if len(history) > HISTORY_POINTS:  # the progress document must stay small (a ConfigMap)
        step = len(history) / HISTORY_POINTS
        history = [history[int(i * step)] for i in range(HISTORY_POINTS - 1)] + [history[-1]]
    if status == "ERROR":
        state = "failed"
    elif status == "TERMINATED":
        state = "completed" if last.get("finished") else "stopped"
    elif status in ("RUNNING", "PAUSED"):
        state = "running"
    else:
        state = "pending"
    row = {"id": short_id(trial_id), "state": state, "params": plain_params(params), "steps": last.get("step", 0),
           "totalSteps": last.get("totalSteps"), "objective": objective, "history": history}
    if last.get("diverged"):
        row["objective"], row["diverged"] = None, True
    return row


def summarize(cfg: TrainerConfig, rows: list[dict[str, Any]], best: Optional[str] = None) -> dict[str, Any]:
    """The ``contract.SearchSummary`` of these trials; ``best`` is the chosen trial (else the
    best completed or running one so far)."""
    rows = sorted(rows, key=lambda r: r["id"])
    counts = {s: sum(r["state"] == s for r in rows) for s in ("running", "completed", "stopped", "failed")}
    counts["pending"] = max(0, cfg.search.trials - sum(counts.values()))
    if best is None:
        ranked = [r for r in rows if r["objective"] is not None and r["state"] in ("completed", "running")]
        best = min(ranked, key=lambda r: r["objective"])["id"] if ranked else None
    chosen = next((r for r in rows if r["id"] == best), None)
    doc = {"trials": cfg.search.trials, **counts, "objective": OBJECTIVE, "best": chosen, "table": rows,
           "scheduler": cfg.search.scheduler.value}
    return SearchSummary.model_validate(doc).to_json_dict()


# The driver's progress callback and the trials at the end, by experiment path: Tune pickles its
# callbacks with the experiment (a progress callback may not pickle), and the restored callback
# finds this process's by the same key.
_PROGRESS: dict[str, Callable[..., None]] = {}
_FINAL: dict[str, list[dict[str, Any]]] = {}


class Watch(tune.Callback):
    """The driver's Tune callback: the search's progress at most every PROGRESS_EVERY_S seconds,
    and its trials at the end. Module-level, so Tune's pickled experiment refers to it by name."""

    def __init__(self, cfg: TrainerConfig, key: str) -> None:
        self.cfg, self.key, self.last = cfg, key, 0.0

    def update(self, trials: list[Any], force: bool = False) -> None:
        now = time.monotonic()
        progress = _PROGRESS.get(self.key)
        if progress is None or (not force and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        rows = [trial_row(t.trial_id, t.status, t.config, t.last_result) for t in trials]
        summary = summarize(self.cfg, rows)
        done = summary["completed"] + summary["stopped"] + summary["failed"]
        progress(stage="train", step=sum(r["steps"] or 0 for r in rows),
                 totalSteps=sum(r["totalSteps"] or 0 for r in rows) or None, search=summary,
                 message=f"search: {done}/{self.cfg.search.trials} trials finished, {summary['running']} running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.update(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.update(trials, force=True)

    def on_experiment_end(self, trials, **info):
        _FINAL[self.key] = [trial_row(t.trial_id, t.status, t.config, t.last_result) for t in trials]
        self.update(trials, force=True)


# ---------------------------------------------------------------------------------------------
# The search (the train stage's driver)


def tuner(cfg: TrainerConfig, job: dict[str, Any], train_rows: int, tune_dir: str) -> Any:
    """A new Tuner for this search, or the interrupted one restored from ``tune_dir``."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search: Search = cfg.search
    res = cfg.resources
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job),
                                    {"cpu": res.cpus_per_worker, **({"gpu": res.gpus_per_worker}
                                                                    if res.gpus_per_worker else {})})
    path = os.path.join(tune_dir, EXPERIMENT)
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space(cfg))
    max_t = _bound_steps(cfg, train_rows)
    if search.scheduler is SearchScheduler.asha:
        hp = cfg.hyperparameters
        grace = search.grace_period_steps or hp.eval_every_steps or max(1, math.ceil(max_t / 8))
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=min(grace, max_t),
                                  reduction_factor=search.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    budget = (search.max_gpu_hours * 3600 / (search.concurrent_trials * max(res.gpus_per_worker, 1))
              if search.max_gpu_hours else None)
    return tune.Tuner(
        trainable, param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode="min", scheduler=scheduler, num_samples=search.trials,
            time_budget_s=budget, reuse_actors=False,
            # seeded draws: the same spec draws the same trials. The generator itself caps the
            # trials at once (Tune ignores TuneConfig.max_concurrent_trials with a generator).
            search_alg=BasicVariantGenerator(random_state=search.seed, max_concurrent=search.concurrent_trials)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=tune_dir, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[Watch(cfg, path)]))


def run_search(cfg: TrainerConfig, run_dir: str, model_dir: str, *, progress: Callable[..., None],
               mirror: Any = None) -> dict[str, Any]:
    """Run (or resume) the search, keep the best trial's model; returns the train manifest."""
    train_dir = os.path.join(run_dir, "train")
    train_rows = len(load_rows(run_dir, "train"))
    if not load_rows(run_dir, "validation"):
        raise DataInvalid("a search ranks trials by validation loss: the validation split is empty "
                          "(raise dataset.split.validation)", field="spec.dataset.split.validation")
    # Tune saves its experiment state every few seconds instead of its default 10+: a run killed
    # just after a trial finished then does not train that trial again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    ensure_ray(cfg)
    job = {"config": cfg.model_dump(mode="json", by_alias=True), "runDir": os.path.abspath(run_dir),
           "modelDir": model_dir, "threads": max(1, int(cfg.resources.cpus_per_worker))}
    tune_dir = os.path.abspath(os.path.join(train_dir, TUNE))
    progress(stage="train", message=f"search: {cfg.search.trials} trials, {cfg.search.concurrent_trials} at once")
    key = os.path.join(tune_dir, EXPERIMENT)
    _PROGRESS[key] = progress
    try:
        grid = tuner(cfg, job, train_rows, tune_dir).fit()
    except Exception as e:  # noqa: BLE001 - Tune's own failures; a trial's error is in its result
        raise TrainingFailed(f"search failed: {type(e).__name__}: {str(e)[-2000:]}") from e
    finally:
        _PROGRESS.pop(key, None)
    rows = _FINAL.pop(key, None)
    if rows is None:  # the callback did not run here (a restored experiment under another path)
        rows = [trial_row(r.metrics.get("trial_id", "?"), "ERROR" if r.error else "TERMINATED", r.config or {},
                          r.metrics) for r in grid if r.metrics]
    if mirror is not None:
        mirror.pull(os.path.join("train", TRIALS))  # trials may have run on other nodes
    return choose(cfg, train_dir, rows, [r.error for r in grid if r.error])


def choose(cfg: TrainerConfig, train_dir: str, rows: list[dict[str, Any]],
           errors: list[BaseException]) -> dict[str, Any]:
    """Copy the best completed trial's model into ``train/``; its outcome plus the search summary."""
    done = [r for r in rows if r["state"] == "completed" and r["objective"] is not None]
    if not done:
        inner = next((e for e in map(stage_error_in, errors) if e is not None), None)
        if inner is not None:  # e.g. InvalidSpec from a trial: the user's to fix, as in a plain run
            raise inner
        if rows and all(r.get("diverged") for r in rows):
            raise Diverged("every trial of the search diverged; lower search.space.learningRate",
                           field="spec.search.space.learningRate")
        why = f"; first error: {str(errors[0])[-1000:]}" if errors else ""
        raise TrainingFailed(f"no trial of the search trained to its end ({len(rows)} trials: "
                             + ", ".join(f"{r['id']} {r['state']}" for r in sorted(rows, key=lambda r: r['id']))
                             + f"){why}; raise search.maxGpuHours or search.trials")
    best = min(done, key=lambda r: r["objective"])
    src = os.path.join(train_dir, TRIALS, best["id"])
    outcome = storage.read_json(os.path.join(src, "outcome.json")) or {}
    for name in ("model", "merged"):
        target = os.path.join(train_dir, name)
        if os.path.exists(target):
            shutil.rmtree(target)
        if os.path.isdir(os.path.join(src, name)):
            shutil.copytree(os.path.join(src, name), target)
    shutil.copyfile(os.path.join(src, "metrics.jsonl"), os.path.join(train_dir, "metrics.jsonl"))
    trial_hash = (storage.read_json(os.path.join(src, "trial.json")) or {}).get("configHash")
    checkpoints = [os.path.relpath(p, train_dir) for _, p in
                   list_checkpoints(os.path.join(src, CHECKPOINTS), trial_hash)] if trial_hash else []
    return {**outcome, "checkpoints": checkpoints, "metrics": "metrics.jsonl", "mode": "search",
            "workers": cfg.resources.workers, "python": sys.version.split()[0], "trial": best["id"],
            "search": summarize(cfg, rows, best=best["id"])}
