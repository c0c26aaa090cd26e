"""The evaluate stage: prove on held-out data whether fine-tuning helped.

On the test split, or the fixed evaluation set ``evaluation.datasetRef`` when the job names one
(tailor_trainer.evalset; the same rows every run; at most ``evaluation.maxEvalRows``): loss,
perplexity, next-token accuracy and, for prompt/reference data, exact match of greedy
generations — for the fine-tuned model, the base model (``compareToBase``) and the current
champion (``TrainerConfig.champion``), so every comparison is on the same rows; the improvement
over the champion (else the base model) on the promotion metric comes with a paired-bootstrap
interval (tailor_trainer.significance, ``result.comparison``). Also: sample
generations before/after for ``samplePrompts``, the worst-k test examples by loss, optional
k-fold cross-validation (folds train in parallel as Ray tasks), and gates that fail the run.

Writes ``evaluate/{result.json, samples.json, loss.png, report.html, README.md}`` (and the model
card into the model directories). A missed gate raises :class:`GateFailed` after the report is
written, so the user can see why.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any, Optional

from tailor_trainer import significance, storage
from tailor_trainer.batches import IGNORE_INDEX, amp_context, collate, load_rows, token_losses
from tailor_trainer.config import DataSchema, Metric, TrainerConfig
from tailor_trainer.contract import RESULT_FILE, STAGE_ORDER
from tailor_trainer.errors import DataInvalid, GateFailed
from tailor_trainer.evalset import load_eval_set
from tailor_trainer.runtime import ensure_ray, use_local_mode
from tailor_trainer.stages.base import StageContext
from tailor_trainer.training import fit

def _normalize(text: str) -> str:
    return " ".join(text.split())


def prompt_ids(tok: Any, schema: DataSchema, text: str, rendered: bool) -> list[int]:
    """Token ids for a prompt, rendered like the training data (``rendered``: already in the
    training format, as the ``prompt`` column is)."""
    if not rendered:
        if schema is DataSchema.instruction:
            from tailor_trainer.data.tokenize import instruction_prompt

            text = instruction_prompt({"instruction": text, "input": ""})
        elif schema is DataSchema.chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    special = schema is not DataSchema.chat  # chat templates write their own BOS
    return tok(text, add_special_tokens=special)["input_ids"]


def generate(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int, device: Any,
             batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches), decoded."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, n - len(p):] = torch.tensor(p)
            mask[j, n - len(p):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tok.eos_token_id)
        for j in range(len(chunk)):
            out.append(tok.decode(gen[j, n:], skip_special_tokens=True))
    return out


def measure(model: Any, tok: Any, rows: list[dict], *, schema: DataSchema, batch_size: int,
            device: Any, amp: Any, exact_match: bool, max_new_tokens: int) -> dict[str, Any]:
    """Loss, perplexity, accuracy (and exactMatch) of ``model`` on ``rows``, plus per-row values
    (mean token loss, label tokens, correct next tokens, exact match) for the paired bootstrap."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    total = correct = 0
    loss_sum = 0.0
    per_row = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            batch = collate(chunk, pad, device)
            loss, logits = token_losses(model, batch, amp)
            target = batch["labels"][:, 1:]
            keep = target != IGNORE_INDEX
            hits = (logits.argmax(-1) == target) & keep
            row_hits = hits.sum(-1)
            for j, r in enumerate(chunk):
                n = int(keep[j].sum())
                s = float(loss[j].sum())
                per_row.append({"id": r["id"], "loss": s / n if n else None, "tokens": n,
                                "correct": int(row_hits[j])})
            total += int(keep.sum())
            correct += int(hits.sum())
            loss_sum += float(loss.sum())
    mean = loss_sum / total if total else float("nan")
    metrics: dict[str, Any] = {"loss": mean, "perplexity": math.exp(min(mean, 700.0)),
                               "accuracy": correct / total if total else float("nan")}
    predictions: dict[str, str] = {}
    if exact_match:
        judged = [r for r in rows if r.get("prompt") and r.get("reference") is not None]
        if judged:
            outs = generate(model, tok, [prompt_ids(tok, schema, r["prompt"], True) for r in judged],
                            max_new_tokens, device)
            hits = 0
            exact = {}
            for r, o in zip(judged, outs):
                predictions[r["id"]] = o
                exact[r["id"]] = int(_normalize(o) == _normalize(r["reference"]))
                hits += exact[r["id"]]
            metrics["exactMatch"] = hits / len(judged)
            for p in per_row:
                if p["id"] in exact:
                    p["exact"] = exact[p["id"]]
    return {"metrics": metrics, "perRow": per_row, "predictions": predictions}


def evaluate_model(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one model (tuned, base or champion) and measure it; runs in-process or as a Ray task."""
    import torch
    from transformers import AutoTokenizer

    from tailor_trainer.adaptation import load_any, load_base, load_trained

    cfg = TrainerConfig.model_validate(spec["config"])
    ev, hp = cfg.evaluation, cfg.hyperparameters
    device = torch.device("cuda") if (cfg.resources.gpus_per_worker and torch.cuda.is_available()) \
        else torch.device("cpu")
    if device.type == "cpu" and spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    amp, dtype = amp_context(hp.precision, device)
    kind, base_dir = spec["kind"], spec["baseDir"]
    if kind == "tuned":
        model = load_trained(cfg, base_dir, spec["modelDir"], device=device, dtype=dtype)
    elif kind == "champion":
        model = load_any(spec["modelDir"], device=device, dtype=dtype, base_fallback=base_dir)
    else:
        model = load_base(base_dir, device=device, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    schema = cfg.dataset.schema_
    rows = spec["rows"]
    out = measure(model, tok, rows, schema=schema, batch_size=hp.batch_size * 2, device=device, amp=amp,
                  exact_match=spec["exactMatch"], max_new_tokens=ev.max_new_tokens)
    out["kind"] = kind
    if ev.sample_prompts:
        ids = [prompt_ids(tok, schema, p, False) for p in ev.sample_prompts]
        out["samples"] = generate(model, tok, ids, ev.max_new_tokens, device)
    k = spec.get("worstK", 0)
    if k:
        by_id = {r["id"]: r for r in rows}
        ranked = sorted((p for p in out["perRow"] if p["loss"] is not None), key=lambda p: -p["loss"])[:k]
        worst = []
        for p in ranked:
            r = by_id[p["id"]]
            item = {"id": p["id"], "loss": p["loss"], "tokens": p["tokens"]}
            if r.get("prompt"):
                item["prompt"] = r["prompt"]
                item["reference"] = r.get("reference")
                item["output"] = out["predictions"].get(p["id"])
                if item["output"] is None:
                    item["output"] = generate(model, tok, [prompt_ids(tok, schema, r["prompt"], True)],
                                              ev.max_new_tokens, device)[0]
            else:
                item["text"] = tok.decode(r["input_ids"], skip_special_tokens=True)[:2000]
            worst.append(item)
        out["worst"] = worst
    return out


def cv_fold(spec: dict[str, Any]) -> dict[str, Any]:
    """Train on every fold but one and measure the held-out fold (a Ray task)."""
    import torch

    cfg = TrainerConfig.model_validate(spec["config"])
    fold = spec["fold"]
    train = [r for r in spec["rows"] if r["fold"] != fold]
    held = [r for r in spec["rows"] if r["fold"] == fold]
    base_dir = spec["baseDir"]
    if not os.path.isdir(base_dir):  # resolved on the driver's node: fetch it on this one too
        base_dir = storage.resolve_model_dir(cfg.model.uri, cfg.model.revision)
    model, outcome = fit(cfg, base_dir, train, [], config_hash=spec["configHash"],
                         threads=spec.get("threads"))
    device = next(model.parameters()).device
    amp, _ = amp_context(cfg.hyperparameters.precision, device)
    pad = getattr(model.config, "pad_token_id", None) or 0
    loss_sum = n = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(held), 16):
            batch = collate(held[i:i + 16], pad, device)
            loss, _ = token_losses(model, batch, amp)
            loss_sum += float(loss.sum())
            n += batch["label_tokens"]
    return {"fold": fold, "loss": loss_sum / n if n else None, "trainRows": len(train),
            "heldOutRows": len(held), "steps": outcome["steps"]}


# ---------------------------------------------------------------------------------------------
# Running the measurements (in-process in local mode, Ray tasks otherwise)


def _run_all(fn: Any, specs: list[dict], cfg: TrainerConfig, local: bool) -> list[dict]:
    if local:
        return [fn(s) for s in specs]
    import ray

    ensure_ray(cfg)
    res = cfg.resources
    task = ray.remote(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, max_retries=0)(fn)
    return ray.get([task.remote(s) for s in specs])


def _folds(rows: list[dict], k: int, seed: int) -> list[dict]:
    if rows and max(r["fold"] for r in rows) == k - 1:
        return rows
    from tailor_trainer.data.split import assign_fold

    return [dict(r, fold=assign_fold(r["id"], seed, k)) for r in rows]


def judge(cfg: TrainerConfig, results: dict[str, Any], tuned: dict[str, Any],
          metrics: dict[str, float]) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]], list[dict[str, Any]]]:
    """What every evaluate stage (language or diffusion) decides alike: the champion as this run
    re-scored it, how sure "better" is (against the champion if there is one, else the base model,
    on the same rows), and the gates."""
    champion = None
    if "champion" in results:
        champion = {"run": cfg.champion.run, "metrics": results["champion"]["metrics"],
                    "promotedMetrics": cfg.champion.metrics}
    other = ("champion", cfg.champion.run) if "champion" in results else ("base", "base")
    comparison = (significance.compare(tuned, results[other[0]], other[1], cfg.comparison)
                  if other[0] in results else None)
    return champion, comparison, _gate_results(cfg, metrics)


def prior_stages_seconds(run_dir: str) -> float:
    """Seconds the stages before evaluate took, from their manifests."""
    return sum(float((storage.read_json(os.path.join(run_dir, s, "manifest.json")) or {})
                     .get("durationSeconds") or 0) for s in STAGE_ORDER[:-1])


def _gate_results(cfg: TrainerConfig, metrics: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for g in cfg.evaluation.gates:
        value = metrics.get(g.metric.value)
        bound, limit = ("min", g.min) if g.min is not None else ("max", g.max)
        passed = value is not None and math.isfinite(value) and (
            value >= limit if bound == "min" else value <= limit)
        out.append({"metric": g.metric.value, bound: limit, "value": value, "passed": passed})
    return out


def _uri(cfg: TrainerConfig, *parts: str) -> str:
    return "/".join([cfg.output_uri.rstrip("/"), *parts])


def run_evaluate(ctx: StageContext) -> dict[str, Any]:
    from tailor_trainer import hub, render

    cfg, ev = ctx.config, ctx.config.evaluation
    started = time.monotonic()
    run_dir = ctx.run_dir
    out_dir = ctx.stage_dir("evaluate")
    train_manifest = storage.read_json(os.path.join(run_dir, "train", "manifest.json")) or {}
    prep_manifest = storage.read_json(os.path.join(run_dir, "prep", "manifest.json")) or {}
    plan = storage.read_json(os.path.join(run_dir, "adapt", "plan.json")) or {}
    trained_dir = os.path.join(run_dir, "train", "model")
    if not os.path.isdir(trained_dir):
        raise DataInvalid(f"no trained model at {trained_dir}; run the train stage first")

    rows, evaluated_on = _rows_to_score(ctx, out_dir)
    split = evaluated_on.get("split") or f"evaluation Dataset {evaluated_on['dataset']}"

    wanted = {m.value for m in ev.metrics} | {g.metric.value for g in ev.gates}
    exact = Metric.exact_match.value in wanted
    local = use_local_mode(cfg)
    threads = max(1, int(cfg.resources.cpus_per_worker))
    common = {"config": cfg.model_dump(mode="json", by_alias=True), "baseDir": ctx.base_model_dir(),
              "rows": rows, "exactMatch": exact, "threads": threads}
    specs = [dict(common, kind="tuned", modelDir=trained_dir, worstK=ev.worst_examples)]
    if ev.compare_to_base:
        specs.append(dict(common, kind="base"))
    if cfg.champion is not None:
        try:
            champion_dir = storage.resolve_model_dir(cfg.champion.model_uri)
        except storage.StorageError as e:
            raise DataInvalid(f"cannot read the champion model: {e}", field="champion.modelUri") from e
        specs.append(dict(common, kind="champion", modelDir=champion_dir))
    ctx.progress(stage="evaluate", message=f"measuring {len(specs)} model(s) on {len(rows)} {split} rows")
    results = {r["kind"]: r for r in _run_all(evaluate_model, specs, cfg, local)}

    tuned = results["tuned"]
    metrics: dict[str, float] = {k: v for k, v in tuned["metrics"].items() if k in wanted}
    if "base" in results:
        for k, v in results["base"]["metrics"].items():
            if k in wanted:
                metrics["base" + k[0].upper() + k[1:]] = v
    if train_manifest.get("trainLoss") is not None:
        metrics["trainLoss"] = train_manifest["trainLoss"]

    cv = None
    if ev.cross_validation is not None:
        k = ev.cross_validation.folds
        pool = _folds(load_rows(run_dir, "train") + load_rows(run_dir, "validation"), k,
                      cfg.dataset.split.seed)
        ctx.progress(stage="evaluate", message=f"{k}-fold cross-validation")
        fold_specs = [{"config": common["config"], "baseDir": common["baseDir"], "rows": pool, "fold": i,
                       "configHash": ctx.config_hash, "threads": max(1, int(cfg.resources.cpus_per_worker))}
                      for i in range(k)]
        cv = _run_all(cv_fold, fold_specs, cfg, local=False)
        losses = [f["loss"] for f in cv if f["loss"] is not None]
        if losses:
            metrics["cvLossMean"] = statistics.fmean(losses)
            metrics["cvLossStd"] = statistics.pstdev(losses)

    champion, comparison, gates = judge(cfg, results, tuned, metrics)
    total_duration = prior_stages_seconds(run_dir)
    result = {
        "run": cfg.run.name, "job": cfg.run.job, "attempt": cfg.run.attempt,
        "datasetRevision": cfg.dataset.revision or prep_manifest.get("revision"),
        "datasetFingerprint": prep_manifest.get("fingerprint"),
        "configHash": ctx.config_hash, "baseModel": cfg.model.uri, "method": cfg.adaptation.method.value,
        "evaluatedOn": evaluated_on,
        "metrics": {k: _clean(v) for k, v in metrics.items()},
        "champion": champion, "comparison": comparison, "gates": gates,
        "artifacts": {
            "model": _uri(cfg, "train", "model"),
            "mergedModel": _uri(cfg, "train", "merged") if train_manifest.get("mergedModel") else None,
            "report": _uri(cfg, "evaluate", "report.html"),
            "result": _uri(cfg, "evaluate", RESULT_FILE),
        },
        "validationLoss": _clean(train_manifest.get("valLoss")), "bestStep": train_manifest.get("bestStep"),
        "trainableParameters": plan.get("trainableParameters", train_manifest.get("trainableParameters")),
        "totalParameters": plan.get("totalParameters", train_manifest.get("totalParameters")),
        "steps": train_manifest.get("steps"), "tokensTrained": train_manifest.get("tokensTrained"),
        "trainTokensPerSecond": train_manifest.get("tokensPerSecond"),
        "stoppedBy": train_manifest.get("status"),
        # the trials, when the train stage ran a search (absent otherwise)
        **({"search": train_manifest["search"]} if train_manifest.get("search") else {}),
        "durationSeconds": round(total_duration + time.monotonic() - started, 1),
    }
    samples = {
        "prompts": [{"prompt": p, "before": results["base"]["samples"][i] if "base" in results else None,
                     "after": tuned["samples"][i]} for i, p in enumerate(ev.sample_prompts)],
        "worst": tuned.get("worst", []),
        "crossValidation": cv,
    }
    storage.write_json_atomic(os.path.join(out_dir, "samples.json"), samples)
    metrics_rows = _read_metrics(os.path.join(run_dir, "train", "metrics.jsonl"))
    png = render.loss_curve_png(metrics_rows)
    with open(os.path.join(out_dir, "loss.png"), "wb") as f:
        f.write(png)
    card = render.model_card(cfg, result, plan)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    # the card into train/model and train/merged; the adapter then names its base as the Hub does
    hub.write_model_dirs(cfg, os.path.join(run_dir, "train"), card,
                         render.model_card(cfg, result, plan, merged=True))
    if ctx.mirror is not None:  # the pipeline uploads only evaluate/ after this stage
        for d in ("model", "merged"):
            ctx.mirror.push(f"train/{d}")
    with open(os.path.join(out_dir, "report.html"), "w", encoding="utf-8") as f:
        f.write(render.report_html(cfg, result, samples, plan, png))
    storage.write_json_atomic(os.path.join(out_dir, RESULT_FILE), result)
    failed = [g for g in gates if not g["passed"]]
    if failed:
        g = failed[0]
        bound = "min" if "min" in g else "max"
        value = "not computed" if g["value"] is None else f"{g['value']:.4g}"
        raise GateFailed(
            f"gate failed: {g['metric']} = {value}, required {'>=' if bound == 'min' else '<='} "
            f"{g[bound]:g} ({bound}); report: {result['artifacts']['report']}",
            field=f"spec.evaluation.gates[{gates.index(g)}]")
    return {"result": RESULT_FILE, "report": "report.html", "metrics": result["metrics"],
            "evaluatedRows": len(rows)}


def _rows_to_score(ctx: StageContext, out_dir: str) -> tuple[list[dict], dict[str, Any]]:
    """The rows every model is scored on, sorted by id (the same rows every run, whatever order
    prep wrote), at most maxEvalRows: the fixed evaluation set when the job names one, else the
    run's test split (its validation split when the test split is empty)."""
    cfg, ev = ctx.config, ctx.config.evaluation
    if ev.dataset_ref is not None and cfg.eval_dataset is None:  # never fall back to another yardstick
        raise DataInvalid(f"evaluation.datasetRef names Dataset {ev.dataset_ref.name} but the run's config "
                          "carries no evalDataset (the operator resolves it)", field="spec.evaluation.datasetRef")
    if cfg.eval_dataset is not None:
        from transformers import AutoTokenizer

        rows, info = load_eval_set(cfg, out_dir, AutoTokenizer.from_pretrained(ctx.base_model_dir()))
    else:
        split = "test"
        rows = load_rows(ctx.run_dir, "test")
        if not rows:
            split, rows = "validation", load_rows(ctx.run_dir, "validation")
        if not rows:
            raise DataInvalid("the test and validation splits are empty: nothing to evaluate on "
                              "(raise dataset.split.test)", field="dataset.split.test")
        rows.sort(key=lambda r: r["id"])
        info = {"split": split}
    if ev.max_eval_rows:
        rows = rows[: ev.max_eval_rows]
    return rows, {**info, "rows": len(rows)}


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
