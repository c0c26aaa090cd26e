"""What people look at after a run: the loss curve (PNG), the HTML report and the model card.

Pure functions from the run's JSON (result, samples, metrics.jsonl rows, adapt plan) to bytes or
text; no model, no torch. The report is a single self-contained HTML file (the PNG is inlined),
so it can be opened from a bucket, attached to a ticket or served as is.
"""

from __future__ import annotations

import base64
import io
import json
import math
from html import escape
from typing import Any, Optional

import yaml

from tailor_trainer import hub
from tailor_trainer.config import TrainerConfig

_METRICS = [("loss", "Eval loss", False), ("perplexity", "Perplexity", False),
            ("accuracy", "Token accuracy", True), ("exactMatch", "Exact match", True)]


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def loss_curve_png(rows: list[dict[str, Any]], width: float = 8.0, height: float = 3.6) -> bytes:
    """Training loss (raw and smoothed), validation loss and learning rate against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("loss") is not None]
    val = [(r["step"], r["valLoss"]) for r in rows if r.get("valLoss") is not None]
    lr = [(r["step"], r["learningRate"]) for r in rows if r.get("learningRate") is not None]
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    ax.set_facecolor("#fbfbfd")
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="#9db4e8", linewidth=0.8, alpha=0.7, label="train loss")
        alpha, ema, smooth = 2 / (1 + min(25, max(2, len(ys) // 20))), ys[0], []
        for y in ys:
            ema = alpha * y + (1 - alpha) * ema if math.isfinite(y) else ema
            smooth.append(ema)
        ax.plot(xs, smooth, color="#2952cc", linewidth=2.0, label="train loss (smoothed)")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="#e0663d", linewidth=1.8, markersize=4, label="validation loss")
    if not train and not val:
        ax.text(0.5, 0.5, "no training metrics", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, color="#e3e6ee", linewidth=0.8)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    if lr:
        ax2 = ax.twinx()
        xs, ys = zip(*lr)
        ax2.plot(xs, ys, color="#8a8f99", linewidth=1.0, linestyle=":", label="learning rate")
        ax2.set_ylabel("learning rate", color="#8a8f99")
        ax2.tick_params(axis="y", colors="#8a8f99")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        for s in ("top",):
            ax2.spines[s].set_visible(False)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, frameon=False, fontsize=8, loc="upper right")
    elif train or val:
        ax.legend(frameon=False, fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def search_pngs(search: dict[str, Any]) -> tuple[bytes, bytes]:
    """A search's trials: validation loss against step per trial (the chosen one bold, stopped
    ones dashed), and each searched parameter against the trial's objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, best = search.get("table") or [], (search.get("best") or {}).get("id")
    fig, ax = plt.subplots(figsize=(8.0, 3.6), dpi=110)
    for t in table:
        if not t.get("history"):
            continue
        xs, ys = zip(*t["history"])
        chosen = t["id"] == best
        ax.plot(xs, ys, marker="o" if chosen else ".", linewidth=2.2 if chosen else 1.0, markersize=4,
                linestyle="-" if t.get("state") == "completed" else "--", alpha=1.0 if chosen else 0.7,
                label=f"{t['id']} ({t.get('state')})" + (" chosen" if chosen else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.grid(True, color="#e3e6ee", linewidth=0.8)
    if any(t.get("history") for t in table):
        ax.legend(frameon=False, fontsize=7, loc="upper right", ncol=2)
    curves = _png(fig)
    names = sorted({k for t in table for k in (t.get("params") or {})})
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(2.6 * max(1, len(names)), 2.6), dpi=110,
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(t["params"][name], t["objective"], t["id"] == best) for t in table
               if name in (t.get("params") or {}) and t.get("objective") is not None]
        if pts:
            xs, ys, chosen = zip(*pts)
            ax.scatter(xs, ys, c=["#e0663d" if c else "#2952cc" for c in chosen], s=22)
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("best validation loss")
        ax.grid(True, color="#e3e6ee", linewidth=0.8)
    return curves, _png(fig)


def _search_section(search: dict[str, Any]) -> list[str]:
    import base64 as b64

    curves, params = search_pngs(search)
    best = (search.get("best") or {}).get("id")
    names = sorted({k for t in search.get("table") or [] for k in (t.get("params") or {})})
    counts = ", ".join(f"{search.get(k, 0)} {k}" for k in ("completed", "stopped", "failed", "pending", "running")
                       if search.get(k))
    h = [f"<section><h2>Search</h2><p style='color:var(--mute);margin-top:-6px'>{search.get('trials')} trials "
         f"({escape(counts)}); the trial with the lowest validation loss among those that trained to their "
         f"end (marked ★) is the model evaluated here.</p>",
         "<img alt='validation loss per trial' src='data:image/png;base64," + b64.b64encode(curves).decode() + "'>",
         "<img alt='parameters against objective' src='data:image/png;base64," + b64.b64encode(params).decode()
         + "'>",
         "<table><tr><th>Trial</th>" + "".join(f"<th class=num>{escape(n)}</th>" for n in names)
         + "<th class=num>Steps</th><th>State</th><th class=num>Validation loss</th></tr>"]
    for t in search.get("table") or []:
        p = t.get("params") or {}
        state = t.get("state") or "–"
        if t.get("diverged"):
            state += " (diverged)"
        h.append(f"<tr><td>{escape(str(t.get('id')))}{' ★' if t.get('id') == best else ''}</td>"
                 + "".join(f"<td class=num>{_fmt(p.get(n))}</td>" for n in names)
                 + f"<td class=num>{_fmt(t.get('steps'))} / {_fmt(t.get('totalSteps'))}</td><td>{escape(state)}</td>"
                 f"<td class=num>{_fmt(t.get('objective'))}</td></tr>")
    h.append("</table></section>")
    return h


def chosen_params(result: dict[str, Any]) -> Optional[str]:
    """``learningRate 0.01, lora.r 8`` of the search's chosen trial, when the run searched."""
    best = (result.get("search") or {}).get("best") or {}
    if not best.get("params"):
        return None
    return ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(best["params"].items()))


def _delta(tuned: Optional[float], base: Optional[float], higher_better: bool,
           points: bool = False) -> tuple[str, str]:
    """The change from base to tuned: relative, or in percentage points for rates."""
    if tuned is None or base is None or (not base and not points):
        return "", ""
    change = (tuned - base) if points else (tuned - base) / abs(base)
    better = change > 0 if higher_better else change < 0
    cls = "good" if better else ("bad" if change else "")
    return (f"{100 * change:+.1f} pp" if points else f"{change:+.1%}"), cls


_CSS = """
:root{--ink:#1d2330;--mute:#667085;--line:#e4e7ee;--bg:#f6f7fb;--card:#fff;--blue:#2952cc;
--good:#117a4a;--goodbg:#e6f6ee;--bad:#b42318;--badbg:#fdecea}
*{box-sizing:border-box}body{margin:0;font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",
Roboto,Helvetica,Arial,sans-serif;color:var(--ink);background:var(--bg)}
header{background:linear-gradient(120deg,#1f3b8f,#2952cc 60%,#4f7cf0);color:#fff;padding:30px 40px 64px}
header .in{max-width:1020px;margin:0 auto}
header h1{margin:0 0 4px;font-size:24px;font-weight:650}header .sub{opacity:.85;font-size:14px}
.badge{display:inline-block;padding:2px 10px;border-radius:999px;font-size:12px;font-weight:600;
margin-left:8px;vertical-align:middle}.pass{background:var(--goodbg);color:var(--good)}
.fail{background:var(--badbg);color:var(--bad)}main{max-width:1100px;margin:0 auto;padding:24px 40px 60px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:14px;margin:-48px 0 22px}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:16px 18px;
box-shadow:0 1px 3px rgba(16,24,40,.06)}.card .k{color:var(--mute);font-size:12px;text-transform:uppercase;
letter-spacing:.04em}.card .v{font-size:26px;font-weight:650;margin-top:2px}.card .d{font-size:13px;color:var(--mute)}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:20px 24px;margin:0 0 18px}
h2{font-size:17px;margin:0 0 14px}table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:8px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--mute);font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
td.num{font-variant-numeric:tabular-nums;text-align:right}th.num{text-align:right}
.good{color:var(--good);font-weight:600}.bad{color:var(--bad);font-weight:600}
img{max-width:100%;height:auto;display:block;margin:0 auto}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px;margin:8px 0 18px}
.pre{white-space:pre-wrap;font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,monospace;background:#f8f9fc;
border:1px solid var(--line);border-radius:8px;padding:10px 12px;max-height:260px;overflow:auto}
.lbl{font-size:12px;color:var(--mute);margin-bottom:4px;font-weight:600}.prompt{font-weight:600;margin-top:6px}
details summary{cursor:pointer;color:var(--blue);font-weight:600}dl{display:grid;grid-template-columns:220px 1fr;
gap:6px 14px;margin:0;font-size:14px}dt{color:var(--mute)}dd{margin:0;word-break:break-all}
footer{color:var(--mute);font-size:12px;text-align:center;margin-top:26px}
"""


def _evaluated_on(on: dict[str, Any]) -> str:
    """``120 rows of evaluation Dataset support-eval (revision r1)`` or ``40 held-out test rows``."""
    rows = on.get("rows", "–")
    if on.get("dataset"):
        return f"{rows} rows of evaluation Dataset {on['dataset']} (revision {on.get('revision') or '–'})"
    return f"{rows} held-out {on.get('split') or 'test'} rows"


def _comparison_section(result: dict[str, Any]) -> list[str]:
    """The improvement over the champion (else the base model) and its paired-bootstrap interval."""
    c = result.get("comparison")
    if not c:
        return []
    against = "the base model" if c["against"] == "base" else f"champion {c['against']}"
    verdict = ("the whole interval is an improvement" if c["low"] > 0 else
               "the whole interval is a regression" if c["high"] < 0 else
               "the interval includes no change: the difference may be noise")
    cls = "good" if c["low"] > 0 else ("bad" if c["high"] < 0 else "")
    pct = f"{100 * c['confidence']:g}%"
    return ["<section><h2>Compared with " + escape(against) + "</h2><table><tr><th>Metric</th>"
            "<th class=num>Improvement</th><th class=num>" + pct + " interval</th><th class=num>Rows</th>"
            "<th>Reading</th></tr>",
            f"<tr><td>{escape(c['metric'])}</td><td class='num {cls}'>{_fmt(c['improvement'])}</td>"
            f"<td class=num>[{_fmt(c['low'])}, {_fmt(c['high'])}]</td><td class=num>{c['rows']}</td>"
            f"<td>{verdict}</td></tr></table>",
            "<p style='color:var(--mute)'>Positive is better. Paired bootstrap: both models scored on "
            f"the same {escape(_evaluated_on(result.get('evaluatedOn') or {}))}, {c.get('resamples')} "
            f"resamples of those rows (seed {c.get('seed')}), the metric recomputed as reported "
            "(token-weighted for loss and accuracy) for both on each.</p></section>"]


def report_html(cfg: TrainerConfig, result: dict[str, Any], samples: dict[str, Any],
                plan: dict[str, Any], png: bytes) -> str:
    """The run report: headline cards, metrics base vs tuned (vs champion), gates, the loss
    curve, samples before/after, worst examples, lineage."""
    m = result.get("metrics", {})
    champ = (result.get("champion") or {}).get("metrics") or {}
    gates = result.get("gates", [])
    all_pass = all(g["passed"] for g in gates)
    badge = ("" if not gates else
             f'<span class="badge {"pass" if all_pass else "fail"}">gates {"passed" if all_pass else "failed"}</span>')
    h: list[str] = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>Tailor report · {escape(result.get('run', ''))}</title><style>{_CSS}</style></head><body>",
        f"<header><div class=in><h1>{escape(result.get('run', ''))}{badge}</h1><div class=sub>"
        f"{escape(cfg.adaptation.method.value)} fine-tune of <b>{escape(cfg.model.uri)}</b> on dataset "
        f"<b>{escape(cfg.dataset.name)}</b> (revision {escape(str(result.get('datasetRevision') or '–'))})"
        f" · {escape(_evaluated_on(result.get('evaluatedOn') or {}))}</div></div></header><main>",
    ]
    cards = []
    for key, label, higher in _METRICS:
        if key not in m:
            continue
        base = m.get("base" + key[0].upper() + key[1:])
        pct = key in ("accuracy", "exactMatch")
        d, cls = _delta(m[key], base, higher, points=pct)
        sub = f'base {_fmt(base, pct)} <span class="{cls}">{d}</span>' if base is not None else "&nbsp;"
        cards.append(f'<div class=card><div class=k>{label}</div><div class=v>{_fmt(m[key], pct)}</div>'
                     f'<div class=d>{sub}</div></div>')
    cards.append(f"<div class=card><div class=k>Trainable parameters</div><div class=v>"
                 f"{_fmt(result.get('trainableParameters'))}</div><div class=d>"
                 f"{plan.get('trainablePercent', '–')}% of {_fmt(result.get('totalParameters'))}</div></div>")
    cards.append(f"<div class=card><div class=k>Training</div><div class=v>{_fmt(result.get('steps'))} steps"
                 f"</div><div class=d>{_fmt(result.get('tokensTrained'))} tokens · "
                 f"{_fmt(result.get('trainTokensPerSecond'))} tok/s</div></div>")
    h.append("<div class=cards>" + "".join(cards) + "</div>")

    # Metrics table
    cols = ["Metric", "Base", "Fine-tuned", "Change"] + (["Champion"] if champ else [])
    h.append("<section><h2>Metrics</h2><table><tr>" + "".join(
        f'<th class="{"num" if i else ""}">{c}</th>' for i, c in enumerate(cols)) + "</tr>")
    for key, label, higher in _METRICS:
        if key not in m:
            continue
        pct = key in ("accuracy", "exactMatch")
        base = m.get("base" + key[0].upper() + key[1:])
        d, cls = _delta(m[key], base, higher, points=pct)
        row = (f"<tr><td>{label}</td><td class=num>{_fmt(base, pct)}</td><td class=num><b>{_fmt(m[key], pct)}</b>"
               f"</td><td class='num {cls}'>{d}</td>")
        if champ:
            row += f"<td class=num>{_fmt(champ.get(key), pct)}</td>"
        h.append(row + "</tr>")
    extra = {**m, "validationLoss": result.get("validationLoss")}
    for key, label in (("trainLoss", "Final train loss"), ("validationLoss", "Best validation loss"),
                       ("cvLossMean", "Cross-validation loss (mean)"), ("cvLossStd", "Cross-validation loss (std)")):
        if extra.get(key) is not None:
            h.append(f"<tr><td>{label}</td><td></td><td class=num>{_fmt(extra[key])}</td><td></td>"
                     + ("<td></td>" if champ else "") + "</tr>")
    h.append("</table>")
    if gates:
        h.append("<h2 style='margin-top:18px'>Gates</h2><table><tr><th>Metric</th><th class=num>Threshold</th>"
                 "<th class=num>Value</th><th>Result</th></tr>")
        for g in gates:
            bound = "min" if "min" in g else "max"
            h.append(f"<tr><td>{escape(g['metric'])}</td><td class=num>{'≥' if bound == 'min' else '≤'} "
                     f"{_fmt(g[bound])}</td><td class=num>{_fmt(g['value'])}</td><td><span class='badge "
                     f"{'pass' if g['passed'] else 'fail'}'>{'pass' if g['passed'] else 'fail'}</span></td></tr>")
        h.append("</table>")
    h.append("</section>")

    h += _comparison_section(result)
    h.append("<section><h2>Loss</h2><img alt='loss curve' src='data:image/png;base64,"
             + base64.b64encode(png).decode() + "'></section>")

    prompts = samples.get("prompts") or []
    if prompts:
        h.append("<section><h2>Samples: before and after</h2>")
        for s in prompts:
            h.append(f"<div class=prompt>{escape(s['prompt'])}</div><div class=pair>"
                     f"<div><div class=lbl>Base model</div><div class=pre>{escape(s.get('before') or '–')}</div></div>"
                     f"<div><div class=lbl>Fine-tuned</div><div class=pre>{escape(s.get('after') or '')}</div></div></div>")
        h.append("</section>")

    worst = samples.get("worst") or []
    if worst:
        h.append("<section><h2>Hardest held-out examples</h2><p style='color:var(--mute);margin-top:-6px'>"
                 "The test examples with the highest loss after fine-tuning: where to look for bad labels or "
                 "missing data.</p>")
        for w in worst:
            h.append(f"<div class=prompt>loss {_fmt(w['loss'])} · {w['tokens']} tokens · "
                     f"<span style='color:var(--mute)'>{escape(w['id'][:16])}</span></div>")
            if "prompt" in w:
                h.append(f"<div class=pre>{escape(w['prompt'])}</div><div class=pair>"
                         f"<div><div class=lbl>Reference</div><div class=pre>{escape(w.get('reference') or '')}</div></div>"
                         f"<div><div class=lbl>Model output</div><div class=pre>{escape(w.get('output') or '')}</div></div></div>")
            else:
                h.append(f"<div class=pre style='margin-bottom:14px'>{escape(w.get('text', ''))}</div>")
        h.append("</section>")

    if result.get("search"):
        h += _search_section(result["search"])

    cv = samples.get("crossValidation")
    if cv:
        h.append("<section><h2>Cross-validation</h2><table><tr><th>Fold</th><th class=num>Held-out loss</th>"
                 "<th class=num>Train rows</th><th class=num>Held-out rows</th></tr>")
        for f in cv:
            h.append(f"<tr><td>{f['fold']}</td><td class=num>{_fmt(f['loss'])}</td><td class=num>"
                     f"{_fmt(f['trainRows'])}</td><td class=num>{_fmt(f['heldOutRows'])}</td></tr>")
        h.append("</table></section>")

    hp = cfg.hyperparameters
    lineage = [("Run", result.get("run")), ("Job", result.get("job")), ("Base model", cfg.model.uri),
               ("Dataset", f"{cfg.dataset.name} @ {result.get('datasetRevision') or '–'}"),
               ("Dataset fingerprint", result.get("datasetFingerprint") or "–"),
               ("Config hash", result.get("configHash")), ("Method", cfg.adaptation.method.value),
               ("Changes", "; ".join(plan.get("changes", [])) or "–"),
               ("Learning rate", f"{hp.learning_rate:g} ({hp.scheduler.value}, warmup {hp.warmup_ratio:g})"),
               ("Batch", f"{hp.batch_size} × {hp.gradient_accumulation_steps} accumulation × "
                         f"{cfg.resources.workers} worker(s)"),
               *([("Search", f"trial {result['search']['best']['id']} of {result['search'].get('trials')}: "
                             f"{chosen_params(result)} (overrides the values above)")]
                 if chosen_params(result) else []),
               ("Stopped by", result.get("stoppedBy")), ("Model", result["artifacts"].get("model")),
               ("Merged model", result["artifacts"].get("mergedModel") or "–"),
               ("Duration", f"{_fmt(result.get('durationSeconds'))} s")]
    h.append("<section><h2>Lineage</h2><dl>" + "".join(
        f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in lineage) + "</dl>")
    body = json.dumps(cfg.model_dump(mode="json", by_alias=True, exclude={"progress"}), indent=2)
    h.append(f"<details style='margin-top:14px'><summary>Full configuration</summary><div class=pre>"
             f"{escape(body)}</div></details></section>")
    h.append("<footer>Generated by Tailor</footer></main></body></html>")
    return "\n".join(h)


def model_card(cfg: TrainerConfig, result: dict[str, Any], plan: dict[str, Any], *, merged: bool = False) -> str:
    """README.md for the model directory: Hub front matter, how to load it, lineage and metrics.
    ``merged``: the card of ``train/merged`` (a full model even when the run trained an adapter)."""
    m = result.get("metrics", {})
    peft = cfg.adaptation.method.is_peft and not merged
    meta = yaml.safe_dump(hub.front_matter(cfg, result, adapter=peft), sort_keys=False, allow_unicode=True,
                          default_flow_style=False, width=1000)
    what = f"A {cfg.adaptation.method.value} fine-tune" + (" (the adapter merged into the base's weights)"
                                                          if merged and cfg.adaptation.method.is_peft else "")
    lines = ["---", meta.rstrip("\n"), "---", "",
             f"# {result.get('run')}", "",
             f"{what} of `{cfg.model.uri}` on the `{cfg.dataset.name}` "
             f"dataset, produced by Tailor run `{result.get('run')}` (FineTuneJob `{result.get('job')}`).", "",
             "## Use", "", "```python"]
    base = hub.base_reference(cfg)
    if peft and "://" in base:  # the adapter names a base PEFT cannot fetch (s3://): load it yourself
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"base = AutoModelForCausalLM.from_pretrained(\"<a local copy of {base}>\")",
                  "model = PeftModel.from_pretrained(base, \"<this directory>\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"<this directory>\")"]
    elif peft:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f"# loads the base from {base}, named in adapter_config.json",
                  "model = AutoPeftModelForCausalLM.from_pretrained(\"<this directory>\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"<this directory>\")"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "model = AutoModelForCausalLM.from_pretrained(\"<this directory>\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"<this directory>\")"]
    if peft and cfg.adaptation.activation is not None:
        lines += [f"# The base model's MLP activation was changed to {cfg.adaptation.activation.value}: "
                  "load the merged model, or set it on the base before attaching this adapter."]
    lines += ["```", "", "## Evaluation", "",
              f"On {_evaluated_on(result.get('evaluatedOn') or {})}, never seen in training:", "",
              "| metric | base | fine-tuned |", "| --- | ---: | ---: |"]
    for key, label, _ in _METRICS:
        if key in m:
            pct = key in ("accuracy", "exactMatch")
            lines.append(f"| {label} | {_fmt(m.get('base' + key[0].upper() + key[1:]), pct)} | {_fmt(m[key], pct)} |")
    if "cvLossMean" in m:
        lines.append(f"| Cross-validation loss | | {_fmt(m['cvLossMean'])} ± {_fmt(m.get('cvLossStd'))} |")
    hp = cfg.hyperparameters
    lines += ["", "## Lineage", "",
              f"- base model: `{cfg.model.uri}`" + (f" @ `{cfg.model.revision}`" if cfg.model.revision else ""),
              f"- dataset: `{cfg.dataset.name}`, revision `{result.get('datasetRevision') or '-'}`, content "
              f"fingerprint `{result.get('datasetFingerprint') or '-'}`, schema `{cfg.dataset.schema_.value}`",
              f"- config hash: `{result.get('configHash')}`",
              f"- adaptation: {cfg.adaptation.method.value}; " + ("; ".join(plan.get("changes", [])) or "-"),
              f"- trainable parameters: {_fmt(result.get('trainableParameters'))} of "
              f"{_fmt(result.get('totalParameters'))} ({plan.get('trainablePercent', '-')}%)",
              f"- training: {result.get('steps')} steps, {_fmt(result.get('tokensTrained'))} tokens, lr "
              f"{hp.learning_rate:g} ({hp.scheduler.value}), batch {hp.batch_size}×{hp.gradient_accumulation_steps}"
              f"×{cfg.resources.workers}, seed {hp.seed}, precision {hp.precision.value}",
              f"- stopped by: {result.get('stoppedBy')}", ""]
    if chosen_params(result):
        lines.insert(-1, f"- hyperparameter search: trial {result['search']['best']['id']} of "
                         f"{result['search'].get('trials')} chosen by validation loss: {chosen_params(result)}")
    return "\n".join(lines)
