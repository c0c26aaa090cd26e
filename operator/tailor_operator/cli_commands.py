"""`tailor run`, `tailor dataset inspect` and `tailor operator`.

`run` and `inspect` start the trainer exactly as a RayJob does (`python -m tailor_trainer ...`
in a subprocess), so the command line and the cluster share one code path and the operator
package never imports the pipeline. The commands are plain `click` commands; `cli.py` adds them
to its groups, so imports go one way (cli -> cli_commands -> cli_display).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
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
from tailor_operator.builders.trainer_config import build_trainer_config, run_output_uri
from tailor_operator.cli_display import Display, make_display, search_result, summary_table
from tailor_operator.validation import iter_documents, validate_file
from tailor_trainer.config import ResolvedDataset
from tailor_trainer.contract import PROGRESS_FILE, RESULT_FILE, ProgressDoc, RunResult

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130

INVALID_INPUT = ("InvalidSpec", "DataInvalid", "ModelInvalid")
"""Trainer error reasons that mean the input is wrong (exit 2) when raised before training."""


class ManifestError(click.ClickException):
    """A problem with the manifest file (exit 2, message names the object or field)."""

    exit_code = EXIT_INVALID


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


def load_progress(run_dir: Path) -> Optional[ProgressDoc]:
    """The trainer's progress document of a run (state, stage, step, loss, result, error, ...),
    or None before the trainer wrote one. The one place the CLI reads it."""
    return local.read_progress(run_dir / PROGRESS_FILE)


def _pick_run(job: FineTuneJob, fresh: bool) -> tuple[str, int]:
    """Next run name, or the last unfinished run again (attempt + 1) so it resumes."""
    root = _local_dir(run_output_uri(job, run_name(job.metadata.name, 1)))
    job_dir = root.parent if root is not None else None
    number, attempt = 1, 1
    if job_dir is not None and job_dir.is_dir():
        prefix = f"{job.metadata.name}-r"
        numbers = [int(c.name[len(prefix):]) for c in job_dir.iterdir()
                   if c.name.startswith(prefix) and c.name[len(prefix):].isdigit()]
        if numbers:
            last = max(numbers)
            last_dir = job_dir / run_name(job.metadata.name, last)
            finished = (last_dir / "evaluate" / "manifest.json").exists()
            if finished or fresh:
                number = last + 1
            else:
                number = last
                attempt = ((load_progress(last_dir) or ProgressDoc()).attempt or 1) + 1
    return run_name(job.metadata.name, number), attempt


def exit_code(trainer_code: int, progress: Optional[ProgressDoc]) -> int:
    """`tailor run`'s exit code from the trainer's: 0 succeeded, 2 invalid input caught before
    training, 130 interrupted, 1 any other failure (a missed evaluation gate included)."""
    state = progress or ProgressDoc()
    if trainer_code == 0 and state.state != "Failed":
        return EXIT_OK
    reason = state.error.reason if state.error else None
    if reason == "Interrupted" or trainer_code in (130, 143):
        return EXIT_INTERRUPTED
    if trainer_code == EXIT_INVALID or reason == "InvalidSpec":
        return EXIT_INVALID
    if reason in INVALID_INPUT and state.stage in (None, "prep", "adapt"):
        return EXIT_INVALID
    return EXIT_FAILED


RUN_EPILOG = """\b
Exit codes:
  0    the run succeeded (and passed its evaluation gates)
  1    the run failed, or an evaluation gate was missed
  2    invalid input: a bad manifest, a validation error, or a bad dataset or
       base model found before training
  130  interrupted (Ctrl-C); rerun the same command to resume from the last
       checkpoint, or add --fresh to start over
"""


@click.command(epilog=RUN_EPILOG)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--job", "job_name", default=None, help="FineTuneJob to run when the file has several.")
@click.option("--fresh", is_flag=True, help="Start a new run even if the last one did not finish.")
@click.option("--quiet", is_flag=True, help="No progress display (the result is still printed).")
def run(file: Path, job_name: Optional[str], fresh: bool, quiet: bool) -> None:
    """Run a FineTuneJob manifest locally (prep -> adapt -> train -> evaluate), no cluster needed.

    FILE holds the FineTuneJob and the Dataset it references (and a ConfigMap, if the Dataset
    reads inline data from one). Relative paths in the manifest resolve against the current
    directory. An unfinished run is resumed from its last finished stage and checkpoint.

    On a terminal the progress is a live display; otherwise (CI, a pipe) one plain line per
    stage and every few seconds while training.
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
    eval_ref, eval_ds = job.spec.evaluation.dataset_ref, None
    if eval_ref is not None:  # the fixed evaluation set, from the same file
        eval_ds = next((d for d in datasets if d.metadata.name == eval_ref.name), None)
        if eval_ds is None:
            raise ManifestError(f"FineTuneJob/{job.metadata.name}: spec.evaluation.datasetRef.name: Dataset "
                                f"{eval_ref.name!r} is not in {file}")
    run_id, attempt = _pick_run(job, fresh)
    try:
        config = build_trainer_config(job, ds, run_id, attempt=attempt, inline_data=_inline_data(ds, config_maps),
                                      progress_file=PROGRESS_FILE, eval_dataset=eval_ds,
                                      eval_inline_data=_inline_data(eval_ds, config_maps) if eval_ds else None)
    except ValueError as e:  # a cross-field check of the trainer config (pydantic ValidationError)
        raise ManifestError(f"FineTuneJob/{job.metadata.name}: {e}") from e
    root = _local_dir(config.output_uri)
    workdir = root if root is not None else Path.home() / ".cache" / "tailor" / "local" / run_id
    resume = " ".join(["tailor", "run", shlex.quote(str(file))]
                      + (["--job", shlex.quote(job_name)] if job_name else []))
    click.echo(f"run {run_id} (attempt {attempt}) -> {config.output_uri}")
    display = make_display(quiet, click.echo)
    handle: Optional[local.LocalRun] = None
    try:
        handle = local.start(config, workdir)
        code = _follow(handle, display)
    except KeyboardInterrupt:
        display.close()
        if handle is not None:
            _stop(handle)
        state = load_progress(workdir) or ProgressDoc()
        click.echo(f"\ninterrupted: {run_id} stopped{_where(state)}; resume from its last checkpoint "
                   f"with: {resume}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    display.close()
    state = load_progress(workdir) or ProgressDoc()
    status = exit_code(code, state)
    if status == EXIT_INTERRUPTED:
        click.echo(f"\ninterrupted: the trainer of {run_id} was stopped{_where(state)}; resume from its "
                   f"last checkpoint with: {resume}", err=True)
        sys.exit(status)
    if status != EXIT_OK:
        _report_failure(handle, code, state)
        sys.exit(status)
    result = state.result or RunResult()
    click.echo("\n" + summary_table(result))
    if result.search is not None:
        click.echo("\n" + search_result(result.search))
    artifacts = result.artifacts
    if artifacts.get("model"):
        click.echo(f"\nmodel:  {artifacts['model']}")
    if artifacts.get("report"):
        click.echo(f"report: {artifacts['report']}")
    click.echo(f"result: {config.output_uri}/evaluate/{RESULT_FILE}")


def _where(state: ProgressDoc) -> str:
    stage, step, total = state.stage, state.step, state.total_steps
    if stage and step is not None and total:
        return f" during {stage} (step {step}/{total})"
    return f" during {stage}" if stage else ""


def _report_failure(handle: local.LocalRun, code: int, state: ProgressDoc) -> None:
    error = state.error
    reason = (error.reason if error else None) or "TrainerFailed"
    message = (error.message if error else None) or f"trainer exited with code {code}"
    field = f" (field {error.field})" if error and error.field else ""
    click.echo(f"\nFAILED: {reason}: {message}{field}", err=True)
    click.echo(f"trainer log: {handle.log_path}", err=True)
    if error is None:
        tail = handle.log_path.read_text(errors="replace").splitlines()[-15:]
        click.echo("\n".join(tail), err=True)


def _follow(handle: local.LocalRun, display: Display) -> int:
    """Show the progress until the trainer exits; returns its exit code."""
    while True:
        code = handle.poll()
        display.update(load_progress(handle.workdir))
        if code is not None:
            return code
        time.sleep(0.5)


def _stop(handle: local.LocalRun) -> None:
    """Stop the trainer's process group (SIGTERM: it records the interruption and exits); a
    second Ctrl-C while it winds down kills it at once. Checkpoints stay for the resume."""
    try:
        handle.terminate()
    except KeyboardInterrupt:
        try:
            os.killpg(handle.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        handle.process.wait()


@click.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Dataset to inspect when the file has several.")
@click.option("--output", "output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--tokenizer", default=None, help="Model/tokenizer URI for token-length statistics.")
@click.option("--max-seq-length", type=int, default=None, help="Count rows longer than this many tokens.")
def inspect(file: Path, name: Optional[str], output: str, tokenizer: Optional[str],
            max_seq_length: Optional[int]) -> None:
    """Validate a Dataset manifest locally and print the status Tailor would write.

    Exit code 0 when the Dataset would be Ready, 1 when not (the status names the problem),
    2 when the manifest itself is invalid.
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


@click.command("operator")
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
