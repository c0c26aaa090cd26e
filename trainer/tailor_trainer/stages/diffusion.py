"""prep / adapt / train / evaluate for text-to-image diffusion (Dataset schema image-caption).

The registry (``tailor_trainer.stages``) sends a run here when its Dataset's schema is
image-caption. Files (docs/image-models.md): ``prep/{train,validation,test}.parquet`` +
``status.json``; ``adapt/plan.json``; ``train/checkpoints/step-N/``, ``train/metrics.jsonl``,
``train/model/pytorch_lora_weights.safetensors``; ``evaluate/{result.json, samples.json,
report.html, grid-N.png}``. ``result.json`` has the language path's shape, so status, gates and
promotion read it unchanged: ``metrics.loss`` is the fine-tuned model's held-out denoising loss
and ``metrics.baseLoss`` the base model's on the same rows, timesteps and noise.
"""

from __future__ import annotations

import html
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from tailor_trainer import storage
from tailor_trainer.config import TrainerConfig
from tailor_trainer.contract import RESULT_FILE
from tailor_trainer.data.images import load_split, prepare_images
from tailor_trainer.data.split import SPLITS
from tailor_trainer.diffusion import model as dm
from tailor_trainer.errors import DataInvalid, GateFailed
from tailor_trainer.stages.base import StageContext

FILES = {s: f"{s}.parquet" for s in SPLITS}


# ---------------------------------------------------------------------------------------------
# prep


def run_prep(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.stages.prep import PrepFailed, build_status, check_pinned

    cfg = ctx.config
    model_dir = ctx.base_model_dir()
    resolution = dm.read_resolution(model_dir)
    tokenizer = dm.load_tokenizer(model_dir)
    prep = ctx.stage_dir("prep")
    work = tempfile.mkdtemp(prefix=".tmp-", dir=prep)
    try:
        result = prepare_images(cfg.dataset, resolution=resolution, tokenizer=tokenizer, out_dir=work,
                                progress=lambda d: ctx.progress(stage="prep", **d))
        status = build_status(cfg.dataset, result)
        storage.write_json_atomic(os.path.join(prep, "status.json"), status)
        if result.error is not None:
            e = PrepFailed(result.error.reason, result.error.message, status)
            raise DataInvalid(e.message, field="dataset") from e
        check_pinned(cfg.dataset, result)
        for name in FILES.values():
            os.replace(os.path.join(work, name), os.path.join(prep, name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ctx.progress(stage="prep", message=f"{result.rows} images (train {result.splits['train']}, validation "
                                       f"{result.splits['validation']}, test {result.splits['test']})")
    return {"revision": status["revision"], "fingerprint": result.fingerprint,
            "expectedFingerprint": cfg.dataset.content_fingerprint, "rowsRead": result.rows_read,
            "rows": result.rows, "splits": dict(result.splits), "resolution": resolution,
            "dropped": dict(sorted(result.dropped.items())), "firstErrors": result.first_errors,
            "files": dict(FILES)}


# ---------------------------------------------------------------------------------------------
# adapt


def run_adapt(ctx: StageContext) -> dict[str, Any]:
    """Check LoRA's target modules against the UNet's structure (built on the meta device)."""
    ctx.progress(stage="adapt", message="checking the adaptation")
    parts = dm.load_parts(ctx.base_model_dir(), meta=True)
    plan = dm.add_lora(parts.unet, ctx.config.adaptation.lora)
    storage.write_json_atomic(os.path.join(ctx.stage_dir("adapt"), "plan.json"), plan)
    ctx.progress(stage="adapt", trainableParameters=plan["trainableParameters"],
                 totalParameters=plan["totalParameters"],
                 message=f"{plan['trainableParameters']:,} of {plan['totalParameters']:,} UNet parameters "
                         f"trainable ({plan['trainablePercent']:.2f}%)")
    return {**plan, "plan": "plan.json", "modelType": "stable-diffusion"}


# ---------------------------------------------------------------------------------------------
# train


def diffusion_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train loop function: the language path's worker setup, the diffusion recipe."""
    from tailor_trainer.checkpoints import CHECKPOINTS
    from tailor_trainer.diffusion.recipe import fit_diffusion
    from tailor_trainer.stages.train import worker_done, worker_setup

    w = worker_setup(job)
    prep = os.path.join(w.run_dir, "prep")
    push = ((lambda: w.mirror.push(f"train/{CHECKPOINTS}", delete=True)) if (w.mirror and w.rank == 0)
            else None)
    outcome = fit_diffusion(w.cfg, w.model_dir, load_split(prep, "train"), load_split(prep, "validation"),
                            config_hash=job["configHash"], train_dir=os.path.join(w.run_dir, "train"),
                            threads=job.get("threads"), progress=w.progress, device=w.device,
                            on_checkpoint=push)
    return worker_done(job, w, outcome)


def run_train(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.stages.train import launch

    dm.check_pipeline(ctx.base_model_dir())
    return launch(ctx, diffusion_worker)


# ---------------------------------------------------------------------------------------------
# evaluate


def evaluate_models(spec: dict[str, Any]) -> dict[str, Any]:
    """Base, fine-tuned (and champion) on the same rows and noise, plus sample images (a Ray task
    on a worker, or in this process in local mode)."""
    import torch

    from tailor_trainer.batches import amp_context
    from tailor_trainer.diffusion.measure import denoising_losses, encode_rows, grid_png, sample_images

    cfg = TrainerConfig.model_validate(spec["config"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device("cuda") if cfg.resources.gpus_per_worker and torch.cuda.is_available() else \
        torch.device("cpu")
    amp, _ = amp_context(cfg.hyperparameters.precision, device)
    base_dir, rows, prompts = spec["baseDir"], spec["rows"], cfg.evaluation.sample_prompts
    pipe = dm.load_pipeline(base_dir, device=device)
    res = dm.resolution_of(pipe.unet.config, pipe.vae.config)
    latents, _, emb = encode_rows(rows, pipe.vae, pipe.text_encoder, res, device)
    out: dict[str, Any] = {}
    kinds = [("base", None)] if cfg.evaluation.compare_to_base else []
    kinds += [("tuned", spec["modelDir"])]
    if spec.get("championDir"):
        kinds.append(("champion", spec["championDir"]))
    images: dict[str, list[list[Any]]] = {}
    for kind, adapter in kinds:
        pipe.unload_lora_weights()
        if adapter is not None:
            pipe.load_lora_weights(adapter)
        losses = denoising_losses(pipe.unet, pipe.scheduler, latents, emb, amp=amp)
        out[kind] = {"kind": kind, "metrics": {"loss": statistics.fmean(losses)},
                     # weight 1 per image (significance weighs rows by "tokens")
                     "perRow": [{"id": r["id"], "loss": v, "tokens": 1} for r, v in zip(rows, losses)]}
        if prompts and kind in ("base", "tuned"):
            images[kind] = sample_images(pipe, prompts)
    grids = []
    for i, _ in enumerate(prompts):
        lines = [images[k][i] for k in ("base", "tuned") if k in images]
        labels = [("before" if k == "base" else "after") for k in ("base", "tuned") if k in images]
        grids.append(grid_png(lines, labels=labels))
    out["grids"] = grids
    return out


def run_evaluate(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer.diffusion.measure import EVAL_TIMESTEPS, SAMPLE_SEEDS, data_uri
    from tailor_trainer.render import loss_curve_png
    from tailor_trainer.runtime import use_local_mode
    from tailor_trainer.stages.evaluate import _read_metrics, _run_all, _uri, judge, prior_stages_seconds

    cfg, ev = ctx.config, ctx.config.evaluation
    started = time.monotonic()
    run_dir, out_dir = ctx.run_dir, ctx.stage_dir("evaluate")
    train_manifest = storage.read_json(os.path.join(run_dir, "train", "manifest.json")) or {}
    prep_manifest = storage.read_json(os.path.join(run_dir, "prep", "manifest.json")) or {}
    plan = storage.read_json(os.path.join(run_dir, "adapt", "plan.json")) or {}
    trained_dir = os.path.join(run_dir, "train", "model")
    if not os.path.isfile(os.path.join(trained_dir, dm.ADAPTER_FILE)):
        raise DataInvalid(f"no trained adapter at {trained_dir}; run the train stage first")
    prep = os.path.join(run_dir, "prep")
    rows, split = load_split(prep, "test"), "test"
    if not rows:
        rows, split = load_split(prep, "validation"), "validation"
    if not rows:
        raise DataInvalid("no held-out rows to evaluate on (test and validation splits are empty); raise "
                          "split.test", field="dataset.split.test")
    if ev.max_eval_rows:
        rows = rows[:ev.max_eval_rows]
    champion_dir = None
    if cfg.champion is not None:
        try:
            champion_dir = storage.resolve_model_dir(cfg.champion.model_uri)
        except storage.StorageError as e:
            raise DataInvalid(f"cannot read the champion model: {e}", field="champion.modelUri") from e
    ctx.progress(stage="evaluate", message=f"denoising loss on {len(rows)} {split} images"
                                           + (f", samples for {len(ev.sample_prompts)} prompts" if ev.sample_prompts else ""))
    spec = {"config": cfg.model_dump(mode="json", by_alias=True), "baseDir": ctx.base_model_dir(),
            "rows": rows, "modelDir": trained_dir, "championDir": champion_dir,
            "threads": max(1, int(cfg.resources.cpus_per_worker))}
    results = _run_all(evaluate_models, [spec], cfg, use_local_mode(cfg))[0]
    tuned = results["tuned"]
    metrics: dict[str, float] = {"loss": tuned["metrics"]["loss"]}
    if "base" in results:
        metrics["baseLoss"] = results["base"]["metrics"]["loss"]
        metrics["lossRatio"] = metrics["loss"] / metrics["baseLoss"] if metrics["baseLoss"] else None
    if train_manifest.get("trainLoss") is not None:
        metrics["trainLoss"] = train_manifest["trainLoss"]
    champion, comparison, gates = judge(cfg, results, tuned, metrics)
    total = prior_stages_seconds(run_dir)
    result = {
        "run": cfg.run.name, "job": cfg.run.job, "attempt": cfg.run.attempt,
        "datasetRevision": cfg.dataset.revision or prep_manifest.get("revision"),
        "datasetFingerprint": prep_manifest.get("fingerprint"), "configHash": ctx.config_hash,
        "baseModel": cfg.model.uri, "method": "lora", "modelFamily": "diffusion",
        "evaluatedOn": {"split": split, "rows": len(rows), "timesteps": list(EVAL_TIMESTEPS)},
        "metrics": metrics, "champion": champion, "comparison": comparison, "gates": gates,
        "artifacts": {"model": _uri(cfg, "train", "model"), "mergedModel": None,
                      "report": _uri(cfg, "evaluate", "report.html"), "result": _uri(cfg, "evaluate", RESULT_FILE)},
        "validationLoss": train_manifest.get("valLoss"), "bestStep": train_manifest.get("bestStep"),
        "trainableParameters": plan.get("trainableParameters"), "totalParameters": plan.get("totalParameters"),
        "steps": train_manifest.get("steps"), "stoppedBy": train_manifest.get("status"),
        "imagesTrained": train_manifest.get("imagesTrained"),
        "durationSeconds": round(total + time.monotonic() - started, 1),
    }
    grid_files = []
    for i, png in enumerate(results["grids"]):
        name = f"grid-{i}.png"
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(png)
        grid_files.append(name)
    samples = {"seeds": list(SAMPLE_SEEDS),
               "prompts": [{"prompt": p, "grid": g} for p, g in zip(ev.sample_prompts, grid_files)]}
    storage.write_json_atomic(os.path.join(out_dir, "samples.json"), samples)
    curve = loss_curve_png(_read_metrics(os.path.join(run_dir, "train", "metrics.jsonl")))
    with open(os.path.join(out_dir, "report.html"), "w", encoding="utf-8") as f:
        f.write(report_html(cfg, result, plan, [(p, data_uri(g)) for p, g in zip(ev.sample_prompts,
                                                                                   results["grids"])],
                            data_uri(curve)))
    with open(os.path.join(trained_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(cfg, result, plan))
    if ctx.mirror is not None:  # the pipeline uploads only evaluate/ after this stage
        ctx.mirror.push("train/model")
    storage.write_json_atomic(os.path.join(out_dir, RESULT_FILE), result)
    failed = [g for g in gates if not g["passed"]]
    if failed:
        g = failed[0]
        bound = "min" if "min" in g else "max"
        raise GateFailed(f"gate failed: {g['metric']} = {g['value']:.4g}, required "
                         f"{'>=' if bound == 'min' else '<='} {g[bound]:g} ({bound}); report: "
                         f"{result['artifacts']['report']}", field=f"spec.evaluation.gates[{gates.index(g)}]")
    return {"result": RESULT_FILE, "report": "report.html", "metrics": metrics, "evaluatedRows": len(rows),
            "grids": grid_files}


def model_card(cfg: TrainerConfig, result: dict[str, Any], plan: dict[str, Any]) -> str:
    m = result["metrics"]
    base = f"{m['baseLoss']:.4f} (base) -> " if m.get("baseLoss") is not None else ""
    return (f"---\nbase_model: {cfg.model.uri}\nlibrary_name: diffusers\ntags: [lora, text-to-image, tailor]\n---\n\n"
            f"# {cfg.run.job} ({cfg.run.name})\n\nA LoRA adapter (r={plan.get('r')}, "
            f"{', '.join(plan.get('targetModules', []))}) for the UNet of `{cfg.model.uri}`, fine-tuned by Tailor "
            f"on Dataset `{cfg.dataset.name}` (revision `{result.get('datasetRevision')}`) for "
            f"{result.get('steps')} steps.\n\nHeld-out denoising loss: {base}{m['loss']:.4f} (fine-tuned).\n\n"
            "```python\nfrom diffusers import StableDiffusionPipeline\n"
            f"pipe = StableDiffusionPipeline.from_pretrained({cfg.model.uri!r})\n"
            "pipe.load_lora_weights(\"<this folder>\")\n```\n")


def report_html(cfg: TrainerConfig, result: dict[str, Any], plan: dict[str, Any],
                grids: list[tuple[str, str]], curve: str) -> str:
    m = result["metrics"]
    esc = html.escape

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else esc(str(v))

    rows = "".join(f"<tr><td>{esc(k)}</td><td>{fmt(v)}</td></tr>" for k, v in m.items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Tailor report: {esc(cfg.run.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}td{padding:2px 10px}"
        "img{image-rendering:pixelated}</style></head><body>",
        f"<h1>{esc(cfg.run.name)}: LoRA on a text-to-image diffusion model</h1>",
        f"<p>Base <code>{esc(cfg.model.uri)}</code>; Dataset <code>{esc(cfg.dataset.name)}</code> "
        f"revision <code>{esc(str(result.get('datasetRevision')))}</code>; {result.get('steps')} steps; "
        f"LoRA r={plan.get('r')} on {esc(', '.join(plan.get('targetModules', [])))} "
        f"({plan.get('trainableParameters')} trainable parameters).</p>",
        f"<h2>Held-out denoising loss</h2><p>{result['evaluatedOn']['rows']} "
        f"{esc(result['evaluatedOn']['split'])} images, timesteps {result['evaluatedOn']['timesteps']}, the same "
        "noise for every model (lower is better).</p>",
        f"<table>{rows}</table>",
        f"<h2>Training loss</h2><img src='{curve}' alt='training loss' style='max-width:100%'>",
    ]
    if grids:
        parts.append("<h2>Samples before / after</h2><p>Top row: base model; bottom row: fine-tuned; the same "
                     "seeds (one per column) for both.</p>")
        for prompt, uri in grids:
            parts.append(f"<h3>{esc(prompt)}</h3><img src='{uri}' alt='{esc(prompt)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
