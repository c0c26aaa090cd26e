"""Local backend: run the trainer in a subprocess, exactly as the RayJob entrypoint does.

`python -m tailor_trainer run --config <workdir>/config.json`; progress comes back through the
file sink (`<workdir>/progress.json`), so the operator never imports the pipeline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tailor_trainer.config import TrainerConfig

CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress.json"
LOG_FILE = "trainer.log"


def read_progress(path: Path) -> Optional[dict[str, Any]]:
    """The latest progress document, or None if not written yet (written atomically)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
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

    def progress(self) -> Optional[dict[str, Any]]:
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
