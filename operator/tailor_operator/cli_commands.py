"""`tailor run`, `tailor dataset inspect` and `tailor operator`.

`run` and `inspect` start the trainer exactly as a RayJob does (`python -m tailor_trainer ...`
in a subprocess), so the command line and the cluster share one code path and the operator
package never imports the pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import click

from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob
from tailor_operator.backends import local
from tailor_operator.builders.naming import run_name
from tailor_operator.builders.trainer_config import build_trainer_config
from tailor_operator.cli import dataset as dataset_group
from tailor_operator.cli import main
from tailor_operator.validation import iter_documents, validate_file
from tailor_trainer.config import ResolvedDataset

STAGES = ("prep", "adapt", "train", "evaluate")


class ManifestError(click.ClickException):
    """A problem with the manifest file (exit 1, message names the object or field)."""


def _load(path: Path) -> tuple[list[Dataset], list[FineTuneJob], dict[str, dict[str, str]]]:
    _, problems = validate_file(path)
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    datasets, jobs, config_maps = [], [], {}
    for _, doc in iter_documents(path):
        if not isinstance(doc, dict):
            continue
        kind = doc.get("kind")
        if doc.get("apiVersion") == "v1" and kind == "ConfigMap":
            config_maps[doc["metadata"]["name"]] = dict(doc.get("data") or {})
        elif kind == "Dataset":
            datasets.append(Dataset.model_validate(doc))
        elif kind == "FineTuneJob":
            jobs.append(FineTuneJob.model_validate(doc))
    return datasets, jobs, config_maps


def _inline_data(ds: Dataset, config_maps: dict[str, dict[str, str]]) -> Optional[str]:
    ref = ds.spec.source.config_map_ref
    if ref is None:
        return None
    data = config_maps.get(ref.name)
    if data is None:
        raise ManifestError(
            f"Dataset/{ds.metadata.name}: spec.source.configMapRef: ConfigMap {ref.name!r} is not "
            "in this file (locally, put the ConfigMap in the same file)"
        )
    if ref.key is None:
        if len(data) != 1:
            raise ManifestError(f"Dataset/{ds.metadata.name}: spec.source.configMapRef.key: "
                                f"ConfigMap {ref.name!r} has keys {sorted(data)}; name one")
        return next(iter(data.values()))
    if ref.key not in data:
        raise ManifestError(f"Dataset/{ds.metadata.name}: spec.source.configMapRef.key: "
                            f"{ref.key!r} not in ConfigMap {ref.name!r} (keys: {sorted(data)})")
    return data[ref.key]


def _local_dir(uri: str) -> Optional[Path]:
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        return None
    return Path(uri)


def _pick_run(job: FineTuneJob, fresh: bool) -> tuple[str, int]:
    """Next run name, or the last unfinished run again (attempt + 1) so it resumes."""
    root = _local_dir(job.spec.output.uri)
    number, attempt = 1, 1
    if root is not None and (root / job.metadata.name).is_dir():
        numbers = []
        for child in (root / job.metadata.name).iterdir():
            suffix = child.name[len(job.metadata.name) + 2:]
            if child.name.startswith(f"{job.metadata.name}-r") and suffix.isdigit():
                numbers.append(int(suffix))
        if numbers:
            last = max(numbers)
            last_dir = root / job.metadata.name / run_name(job.metadata.name, last)
            finished = (last_dir / "evaluate" / "manifest.json").exists()
            if finished or fresh:
                number = last + 1
            else:
                number = last
                state = local.read_progress(last_dir / local.PROGRESS_FILE) or {}
                attempt = int(state.get("attempt", 1)) + 1
    return run_name(job.metadata.name, number), attempt


def _fmt_eta(seconds: Any) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(p: dict[str, Any]) -> str:
    stage = p.get("stage") or "starting"
    parts = [f"[{stage}]"]
    step, total = p.get("step"), p.get("totalSteps")
    if step is not None and total:
        parts.append(f"step {step}/{total} ({100 * step // max(total, 1)}%)")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("tokensPerSecond"):
        parts.append(f"{p['tokensPerSecond']:.0f} tok/s")
    if stage == "train" and p.get("etaSeconds") is not None:
        parts.append(f"ETA {_fmt_eta(p.get('etaSeconds'))}")
    if p.get("message"):
        parts.append(str(p["message"]))
    return "  ".join(parts)


def summary_table(result: dict[str, Any]) -> str:
    m = result.get("metrics") or {}
    rows = [("loss", "loss", "baseLoss"), ("perplexity", "perplexity", "basePerplexity"),
            ("accuracy", "accuracy", "baseAccuracy"), ("exact match", "exactMatch", "baseExactMatch")]
    lines = [f"{'metric':<14}{'base':>12}{'fine-tuned':>14}{'change':>12}"]
    for label, key, base_key in rows:
        if m.get(key) is None:
            continue
        tuned, base = m[key], m.get(base_key)
        change = f"{tuned - base:+.4f}" if base is not None else ""
        base_s = f"{base:.4f}" if base is not None else "-"
        lines.append(f"{label:<14}{base_s:>12}{tuned:>14.4f}{change:>12}")
    return "\n".join(lines)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--job", "job_name", default=None, help="FineTuneJob to run when the file has several.")
@click.option("--fresh", is_flag=True, help="Start a new run even if the last one did not finish.")
@click.option("--quiet", is_flag=True, help="No live progress display.")
def run(file: Path, job_name: Optional[str], fresh: bool, quiet: bool) -> None:
    """Run a FineTuneJob manifest locally (prep -> adapt -> train -> evaluate), no cluster needed.

    FILE holds the FineTuneJob and the Dataset it references (and a ConfigMap, if the Dataset
    reads inline data from one). Relative paths in the manifest resolve against the current
    directory. An unfinished run is resumed from its last finished stage and checkpoint.
    """
    datasets, jobs, config_maps = _load(file)
    if not jobs:
        raise ManifestError(f"{file}: no FineTuneJob in the file")
    if job_name:
        jobs = [j for j in jobs if j.metadata.name == job_name]
        if not jobs:
            raise ManifestError(f"{file}: no FineTuneJob named {job_name!r}")
    if len(jobs) > 1:
        raise ManifestError(f"{file}: several FineTuneJobs; pick one with --job")
    job = jobs[0]
    ref = job.spec.dataset_ref.name
    matching = [d for d in datasets if d.metadata.name == ref]
    if not matching:
        raise ManifestError(f"FineTuneJob/{job.metadata.name}: spec.datasetRef.name: Dataset {ref!r} "
                            f"is not in {file} (found: {[d.metadata.name for d in datasets]})")
    ds = matching[0]
    run_id, attempt = _pick_run(job, fresh)
    config = build_trainer_config(job, ds, run_id, attempt=attempt,
                                  inline_data=_inline_data(ds, config_maps), progress_file="progress.json")
    root = _local_dir(config.output_uri)
    workdir = root if root is not None else Path.home() / ".cache" / "tailor" / "local" / run_id
    click.echo(f"run {run_id} (attempt {attempt}) -> {config.output_uri}")
    handle = local.start(config, workdir)
    code = _follow(handle, quiet=quiet)
    state = handle.progress() or {}
    if code != 0 or state.get("state") == "Failed":
        error = state.get("error") or {}
        reason = error.get("reason", "TrainerFailed")
        message = error.get("message") or f"trainer exited with code {code}"
        field = f" (field {error['field']})" if error.get("field") else ""
        click.echo(f"\nFAILED: {reason}: {message}{field}", err=True)
        click.echo(f"trainer log: {handle.log_path}", err=True)
        if not error:
            tail = handle.log_path.read_text(errors="replace").splitlines()[-15:]
            click.echo("\n".join(tail), err=True)
        sys.exit(1)
    result = state.get("result") or {}
    click.echo("\n" + summary_table(result))
    artifacts = result.get("artifacts") or {}
    if artifacts.get("model"):
        click.echo(f"\nmodel:  {artifacts['model']}")
    if artifacts.get("report"):
        click.echo(f"report: {artifacts['report']}")
    click.echo(f"result: {config.output_uri}/evaluate/result.json")


def _follow(handle: local.LocalRun, quiet: bool) -> int:
    tty = sys.stdout.isatty()
    last_line, last_print = "", 0.0
    try:
        while True:
            code = handle.poll()
            p = handle.progress()
            if p and not quiet:
                line = progress_line(p)
                now = time.monotonic()
                if tty:
                    click.echo("\r" + line.ljust(100)[:160], nl=False)
                elif line != last_line and (now - last_print > 5 or p.get("stage") != "train"):
                    click.echo(line)
                    last_print = now
                last_line = line
            if code is not None:
                if tty and not quiet:
                    click.echo("")
                return code
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: stopping the trainer (rerun to resume from the last checkpoint)", err=True)
        handle.terminate()
        sys.exit(130)


@dataset_group.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Dataset to inspect when the file has several.")
@click.option("--output", "output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--tokenizer", default=None, help="Model/tokenizer URI for token-length statistics.")
@click.option("--max-seq-length", type=int, default=None, help="Count rows longer than this many tokens.")
def inspect(file: Path, name: Optional[str], output: str, tokenizer: Optional[str],
            max_seq_length: Optional[int]) -> None:
    """Validate a Dataset manifest locally and print the status Tailor would write.

    Exit code 0 when the Dataset would be Ready, 1 when not.
    """
    datasets, jobs, config_maps = _load(file)
    if name:
        datasets = [d for d in datasets if d.metadata.name == name]
    if len(datasets) != 1:
        raise ManifestError(f"{file}: expected one Dataset (use --name), found "
                            f"{[d.metadata.name for d in datasets]}")
    ds = datasets[0]
    if tokenizer is None:
        users = [j for j in jobs if j.spec.dataset_ref.name == ds.metadata.name]
        if users:
            tokenizer = users[0].spec.base_model.uri
            max_seq_length = max_seq_length or users[0].spec.hyperparameters.max_seq_length
    resolved = ResolvedDataset(
        **ds.spec.model_dump(exclude={"revision", "refresh_interval"}),
        name=ds.metadata.name,
        revision=ds.spec.revision,
        inline_data=_inline_data(ds, config_maps),
    )
    with tempfile.TemporaryDirectory(prefix="tailor-inspect-") as tmp:
        spec_path = Path(tmp) / "dataset.json"
        spec_path.write_text(json.dumps(resolved.model_dump(by_alias=True, mode="json", exclude_none=True)))
        cmd = [sys.executable, "-m", "tailor_trainer", "inspect", "--dataset", str(spec_path),
               "--output", output]
        if tokenizer:
            cmd += ["--tokenizer", tokenizer]
        if max_seq_length:
            cmd += ["--max-seq-length", str(max_seq_length)]
        sys.exit(subprocess.call(cmd, env=os.environ.copy()))


@main.command("operator")
@click.option("--namespace", "-n", "namespaces", multiple=True,
              help="Namespace to watch (repeatable). Default: all namespaces.")
@click.option("--metrics-port", type=int, default=8080, show_default=True, help="Prometheus /metrics port.")
@click.option("--health-port", type=int, default=8081, show_default=True, help="Liveness endpoint port.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def operator_cmd(namespaces: tuple[str, ...], metrics_port: int, health_port: int, verbose: bool) -> None:
    """Run the Tailor operator (kopf) against the current kubeconfig or in-cluster config."""
    from tailor_operator.runner import run_operator

    run_operator(namespaces=list(namespaces), all_namespaces=not namespaces,
                 metrics_port=metrics_port, health_port=health_port, verbose=verbose)
