"""Local backend: run the trainer in a subprocess, exactly as the RayJob entrypoint does.

`python -m tailor_trainer run --config <workdir>/config.json`; progress comes back through the
file sink (`<workdir>/progress.json`), so the operator never imports the pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob
from tailor_operator.builders.inspect_job import render_dataset
from tailor_operator.reconcile.observe import RunObservation, ValidationObservation, observe_local_run
from tailor_operator.reconcile.plan import StartRun, StartValidation
from tailor_trainer.config import TrainerConfig
from tailor_trainer.contract import PROGRESS_FILE, ProgressDoc


CONFIG_FILE = "config.json"
LOG_FILE = "trainer.log"


def read_progress(path: Path) -> Optional[ProgressDoc]:
    """The latest progress document, or None if not written yet (written atomically)."""
    try:
        return ProgressDoc.read(path.read_text())
    except OSError:
        return None


@dataclass
class LocalRun:
    """One trainer subprocess and its files."""

    workdir: Path
    process: subprocess.Popen
    log_path: Path
    _log: Any = field(default=None, repr=False)

    @property
    def progress_path(self) -> Path:
        return self.workdir / PROGRESS_FILE

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> Optional[int]:
        """Exit code, or None while running."""
        code = self.process.poll()
        if code is not None and self._log is not None:
            self._log.close()
            self._log = None
        return code

    def progress(self) -> Optional[ProgressDoc]:
        return read_progress(self.progress_path)

    def terminate(self, grace_seconds: float = 10.0) -> None:
        """Stop the trainer and everything it started (it leads its own process group)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace_seconds)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        self.poll()


def prepare_config(config: TrainerConfig, workdir: Path) -> Path:
    """Write config.json for the run, pointing the progress sink at the workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"progress": config.progress.model_copy(
        update={"file": str(workdir / PROGRESS_FILE), "config_map": None})})
    path = workdir / CONFIG_FILE
    path.write_text(json.dumps(config.model_dump(by_alias=True, mode="json", exclude_none=True),
                               indent=2, sort_keys=True))
    return path


def start(config: TrainerConfig, workdir: Path, *, env: Optional[dict[str, str]] = None,
          python: str = sys.executable) -> LocalRun:
    """Start `python -m tailor_trainer run --config <workdir>/config.json` in its own process
    group; stdout/stderr go to `<workdir>/trainer.log`."""
    config_path = prepare_config(config, workdir)
    progress = workdir / PROGRESS_FILE
    if progress.exists():
        progress.unlink()  # a retry starts a fresh progress document (checkpoints stay)
    log_path = workdir / LOG_FILE
    log = log_path.open("ab")
    process = subprocess.Popen(
        [python, "-m", "tailor_trainer", "run", "--config", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    return LocalRun(workdir=workdir, process=process, log_path=log_path, _log=log)


# =============================================================================================
# The operator's local backend: runs and Dataset validations as subprocesses, found again after
# a restart through `run.json` in each work directory.

RUN_INFO = "run.json"
RESULT_FILE = "status.json"


class NoCapacity(Exception):
    """Every local slot is busy; the run waits (phase Queued) and is retried."""


def _read_proc(pid: int) -> tuple[bytes, str]:
    """(/proc/<pid>/cmdline, one-letter state); OSError when there is no such process."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    stat = Path(f"/proc/{pid}/stat").read_text()
    return cmdline, stat.rsplit(")", 1)[1].split()[0]


def _pid_alive(pid: int, needle: str) -> bool:
    """The process exists, is not a zombie, and its command line mentions `needle`.

    An empty command line counts as alive: Linux shows one while a new process is still inside
    exec (the parent's ``Popen`` has already returned), and on a busy machine that lasts long
    enough to be seen (measured: 36 of 200 reads right after ``Popen`` under load). Judging it
    "gone" there would fail a live run (seen as a flaky adoption test)."""
    try:
        raw, state = _read_proc(pid)
    except OSError:
        return False
    if state == "Z":
        return False
    return not raw or needle in raw.replace(b"\0", b" ").decode(errors="replace")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, path)


class LocalBackend:
    """Trainer subprocesses under `<root>/<namespace>/<job>/<run>/`, at most `max_concurrent` at once."""

    def __init__(self, root: Path, max_concurrent: int = 1, python: str = sys.executable) -> None:
        self.root = Path(root)
        self.max_concurrent = max_concurrent
        self.python = python
        self._children: dict[Path, LocalRun] = {}
        self._lock = threading.Lock()

    def _job_dir(self, job: FineTuneJob) -> Path:
        return self.root / (job.metadata.namespace or "default") / job.metadata.name

    def _alive(self, workdir: Path, info: dict[str, Any]) -> tuple[bool, Optional[int]]:
        """(running, exit code if known). Our own children are polled; adopted ones (started by an
        earlier operator process) are checked through /proc."""
        child = self._children.get(workdir)
        if child is not None:
            code = child.poll()
            if code is None:
                return True, None
            if info.get("exitCode") is None:
                info["exitCode"] = code
                _write_json(workdir / RUN_INFO, info)
            return False, code
        if info.get("exitCode") is not None:
            return False, int(info["exitCode"])
        pid = info.get("pid")
        return bool(pid and _pid_alive(int(pid), str(workdir / CONFIG_FILE))), None

    def running_count(self) -> int:
        count = 0
        for info_path in self.root.glob(f"*/*/*/{RUN_INFO}"):
            info = _read_json(info_path) or {}
            if not info.get("stopped") and self._alive(info_path.parent, info)[0]:
                count += 1
        return count

    def free_slots(self) -> int:
        return max(self.max_concurrent - self.running_count(), 0)

    def observe(self, job: FineTuneJob, current: Optional[str] = None, following: Optional[str] = None,
                everything: bool = False) -> dict[str, RunObservation]:
        """Every run of the job that has a work directory (a directory scan is cheap)."""
        runs: dict[str, RunObservation] = {}
        for info_path in sorted(self._job_dir(job).glob(f"*/{RUN_INFO}")):
            info = _read_json(info_path) or {}
            if info.get("uid") != job.metadata.uid or info.get("stopped"):
                continue  # a same-named earlier job, or a stopped run (like a deleted RayJob)
            workdir = info_path.parent
            running, code = self._alive(workdir, info)
            runs[workdir.name] = observe_local_run(
                workdir.name, number=int(info.get("number", 0)), attempt=int(info.get("attempt", 1)),
                running=running, exit_code=code, progress=read_progress(workdir / PROGRESS_FILE),
                log_tail=_tail(workdir / LOG_FILE) if not running and code else "",
                dataset_revision=info.get("datasetRevision"))
        return runs

    def start(self, job: FineTuneJob, action: StartRun) -> bool:
        """Start the trainer for this attempt unless it already runs; False if it was adopted."""
        workdir = self._job_dir(job) / action.run
        with self._lock:
            info = _read_json(workdir / RUN_INFO) or {}
            if info.get("uid") == job.metadata.uid and int(info.get("attempt", 0)) == action.attempt \
                    and not info.get("stopped") and self._alive(workdir, info)[0]:
                return False
            if self.running_count() >= self.max_concurrent:
                raise NoCapacity(f"all {self.max_concurrent} local slot(s) busy")
            run = start(action.config, workdir, python=self.python)
            self._children[workdir] = run
            _write_json(workdir / RUN_INFO, {
                "uid": job.metadata.uid, "job": job.metadata.name, "run": action.run, "number": action.number,
                "attempt": action.attempt, "pid": run.pid, "datasetRevision": action.config.dataset.revision,
                "startedAt": time.time(), "exitCode": None, "stopped": False})
            return True

    def stop(self, job: FineTuneJob, run: str) -> None:
        """Terminate the trainer (its checkpoints stay in the output directory)."""
        workdir = self._job_dir(job) / run
        with self._lock:
            info = _read_json(workdir / RUN_INFO)
            if info is None:
                return
            child = self._children.pop(workdir, None)
            if child is not None:
                child.terminate()
            elif info.get("pid") and _pid_alive(int(info["pid"]), str(workdir / CONFIG_FILE)):
                try:
                    os.killpg(int(info["pid"]), signal.SIGTERM)
                except ProcessLookupError:
                    pass
            info["stopped"] = True
            _write_json(workdir / RUN_INFO, info)

    def delete(self, job: FineTuneJob, run: str) -> None:
        self.stop(job, run)
        shutil.rmtree(self._job_dir(job) / run, ignore_errors=True)

    def cleanup(self, namespace: str, name: str) -> None:
        """Finalizer: stop every run of the job and remove its work directories."""
        job_dir = self.root / namespace / name
        for info_path in job_dir.glob(f"*/{RUN_INFO}"):
            info = _read_json(info_path) or {}
            workdir = info_path.parent
            child = self._children.pop(workdir, None)
            if child is not None:
                child.terminate(grace_seconds=5.0)
            elif info.get("pid") and _pid_alive(int(info["pid"]), str(workdir / CONFIG_FILE)):
                try:
                    os.killpg(int(info["pid"]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(job_dir, ignore_errors=True)


class LocalValidation:
    """`python -m tailor_trainer inspect` subprocesses under `<root>/<namespace>/.datasets/<dataset>/<key>/`."""

    def __init__(self, root: Path, python: str = sys.executable) -> None:
        self.root = Path(root)
        self.python = python
        self._children: dict[Path, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def _dir(self, dataset: Dataset) -> Path:
        return self.root / (dataset.metadata.namespace or "default") / ".datasets" / dataset.metadata.name

    def observe(self, dataset: Dataset, key: str) -> tuple[ValidationObservation, tuple[str, ...]]:
        base = self._dir(dataset)
        others = tuple(sorted(p.name for p in base.glob("*") if p.is_dir() and p.name != key
                              and (_read_json(p / RUN_INFO) or {}).get("uid") == dataset.metadata.uid))
        workdir = base / key
        info = _read_json(workdir / RUN_INFO)
        if info is None or info.get("uid") != dataset.metadata.uid:
            return ValidationObservation(key=key), others
        result = _read_json(workdir / RESULT_FILE)
        if result is not None:
            return ValidationObservation(key=key, exists=True, finished=True, result=result), others
        child = self._children.get(workdir)
        running = child.poll() is None if child is not None else bool(
            info.get("pid") and _pid_alive(int(info["pid"]), str(workdir / "dataset.json")))
        if running:
            return ValidationObservation(key=key, exists=True), others
        if child is None:
            return ValidationObservation(key=key), others  # left by an earlier operator process: redo
        code = child.returncode if child is not None else None
        return ValidationObservation(key=key, exists=True, finished=True, failure=(
            f"validation exited with code {code} and wrote no result: {_tail(workdir / 'inspect.log', 3)}")), others

    def start(self, dataset: Dataset, action: StartValidation) -> None:
        workdir = self._dir(dataset) / action.key
        with self._lock:
            child = self._children.get(workdir)
            if child is not None and child.poll() is None:
                return
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "dataset.json").write_text(render_dataset(action.dataset))
            (workdir / RESULT_FILE).unlink(missing_ok=True)
            log = (workdir / "inspect.log").open("ab")
            process = subprocess.Popen(
                [self.python, "-m", "tailor_trainer", "inspect", "--dataset", str(workdir / "dataset.json"),
                 "--output", "json", "--result-file", str(workdir / RESULT_FILE)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            self._children[workdir] = process
            _write_json(workdir / RUN_INFO, {"uid": dataset.metadata.uid, "pid": process.pid, "key": action.key})

    def delete(self, dataset: Dataset, key: str) -> None:
        workdir = self._dir(dataset) / key
        child = self._children.pop(workdir, None)
        if child is not None and child.poll() is None:
            child.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    def cleanup(self, namespace: str, name: str) -> None:
        base = self.root / namespace / ".datasets" / name
        for workdir in list(self._children):
            if workdir.parent == base:
                child = self._children.pop(workdir)
                if child.poll() is None:
                    child.kill()
        shutil.rmtree(base, ignore_errors=True)
