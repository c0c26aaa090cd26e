"""Run the stages in order, resuming at stage granularity, and report how it went.

``python -m tailor_trainer run --config F`` lands in :func:`main_run`. A stage whose
``<run>/<stage>/manifest.json`` carries this config's hash finished earlier and is skipped (the
train stage additionally resumes from its last checkpoint when it did not finish). Progress and
the final result or error go through :class:`tailor_trainer.report.Reporter`.

Exit codes: 0 succeeded; 1 the run failed for the reason in ``progress.error`` (DataInvalid,
ModelInvalid, Diverged, GateFailed, TrainingFailed, ...); 2 the config or spec is invalid
(InvalidSpec: retrying cannot help); 3 an unexpected internal error (a retry may help);
130/143 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any, Optional

from tailor_trainer import storage
from tailor_trainer.config import TrainerConfig
from tailor_trainer.contract import RESULT_FILE
from tailor_trainer.report import Reporter, utcnow
from tailor_trainer.stages import STAGES, InvalidSpec, StageContext, StageError, select

log = logging.getLogger("tailor_trainer")

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERNAL = 0, 1, 2, 3


class Interrupted(BaseException):
    """SIGTERM (the pod or the local backend stopping the run)."""


def load_config(path: str) -> TrainerConfig:
    from pydantic import ValidationError

    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidSpec(f"cannot read config {path}: {e}", field="config") from e
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise InvalidSpec(f"invalid config at {where}: {first['msg']}", field=where) from e


def run_dir_of(cfg: TrainerConfig) -> tuple[str, Optional[storage.RunMirror]]:
    """The run directory as a local path, and the mirror that syncs it when the output is remote.

    For ``s3://`` output the stages work in a local copy (``$TAILOR_RUN_CACHE``, default
    ``~/.cache/tailor/runs/<hash of the URI>``) that first receives whatever the bucket already
    holds, so a rerun on a fresh pod skips finished stages and resumes from the last checkpoint."""
    try:
        mirror = storage.RunMirror.for_output(cfg.output_uri)
        path = storage.local_path(cfg.output_uri) if mirror is None else mirror.local
        if mirror is not None:
            pulled = mirror.pull()
            if pulled:
                log.info("output %s: %d files fetched into %s", cfg.output_uri, pulled, path)
    except (storage.StorageError, PermissionError, ValueError) as e:
        # a bad URI or credentials the store refuses: retrying cannot help (other errors, such
        # as a connection that dropped, propagate and the run is retried)
        raise InvalidSpec(f"output {cfg.output_uri!r}: {e}", field="spec.output.uri") from e
    os.makedirs(path, exist_ok=True)
    return os.path.abspath(path), mirror


def finished(run_dir: str, stage: str, config_hash: str) -> Optional[dict[str, Any]]:
    manifest = storage.read_json(os.path.join(run_dir, stage, "manifest.json"))
    if isinstance(manifest, dict) and manifest.get("configHash") == config_hash:
        return manifest
    return None


def run_pipeline(cfg: TrainerConfig, reporter: Reporter, stages: Optional[str] = None) -> Optional[dict]:
    """Run the selected stages; returns evaluate's result.json (None if evaluate did not run)."""
    names = select(stages)
    run_dir, mirror = run_dir_of(cfg)
    config_hash = cfg.config_hash()
    ctx = StageContext(config=cfg, run_dir=run_dir, config_hash=config_hash, progress=reporter.update,
                       mirror=mirror)
    try:
        for name in names:
            if finished(run_dir, name, config_hash):
                log.info("stage %s: finished earlier with this config, skipped", name)
                reporter.update(stage=name, message="finished earlier; skipped")
                continue
            log.info("stage %s: starting", name)
            reporter.update(stage=name, message=None)
            started = time.monotonic()
            body = STAGES[name].run(ctx) or {}
            manifest = {**body, "stage": name, "configHash": config_hash, "finishedAt": utcnow(),
                        "durationSeconds": round(time.monotonic() - started, 3)}
            storage.write_json_atomic(os.path.join(run_dir, name, "manifest.json"), manifest)
            if mirror is not None:
                reporter.update(stage=name, message=f"uploading to {cfg.output_uri}")
                mirror.push(name)  # the stage's manifest goes last: complete in the bucket too
            log.info("stage %s: done in %.1fs", name, time.monotonic() - started)
    except BaseException:
        if mirror is not None:
            _push_after_failure(mirror)
        raise
    if "evaluate" in names or finished(run_dir, "evaluate", config_hash):
        return storage.read_json(os.path.join(run_dir, "evaluate", RESULT_FILE))
    return None


def _push_after_failure(mirror: storage.RunMirror) -> None:
    """Best effort: what a failed run wrote (its report after a failed gate, status files) also
    reaches the bucket. Checkpoints are already there (pushed as they are written)."""
    try:
        mirror.push()
    except Exception as e:  # noqa: BLE001 - never hide the run's own error behind this one
        log.warning("could not upload the failed run's files to %s: %s", mirror.uri, e)


def _cpu_friendly_threads() -> None:
    """Before torch is imported: idle OpenMP threads sleep instead of spinning. On a machine
    that is doing anything else, spinning threads fight for the cores and a CPU training step
    gets several times slower (measured 9x with 2 threads on a busy 2-core machine)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main_run(config_path: str, stages: Optional[str] = None) -> int:
    """Entry point of ``python -m tailor_trainer run``; returns the exit code."""
    _cpu_friendly_threads()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        cfg = load_config(config_path)
    except InvalidSpec as e:
        # No config means no sink; the message goes to the log (and the exit code says why).
        print(f"error: {e.reason}: {e.message}", file=sys.stderr)
        return EXIT_INVALID
    reporter = Reporter.from_config(cfg.run, cfg.progress)
    reporter.update(stage=None, message="starting")

    def on_term(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    _quiet_libraries()
    try:
        result = run_pipeline(cfg, reporter, stages)
    except StageError as e:
        log.error("%s: %s", e.reason, e.message)
        reporter.fail(e.reason, e.message, e.field)
        return e.exit_code
    except (KeyboardInterrupt, Interrupted) as e:
        reporter.fail("Interrupted", "the trainer was stopped; rerun to resume from the last checkpoint")
        return 143 if isinstance(e, Interrupted) else 130
    except Exception as e:  # noqa: BLE001 - report every failure, with the traceback in the log
        traceback.print_exc()
        reporter.fail("InternalError", f"{type(e).__name__}: {e}")
        return EXIT_INTERNAL
    finally:
        signal.signal(signal.SIGTERM, previous)
    reporter.succeed(result)
    summary = (result or {}).get("metrics", {})
    log.info("run %s succeeded: %s", cfg.run.name, ", ".join(f"{k}={v:.4g}" for k, v in summary.items()
                                                             if isinstance(v, (int, float))))
    return EXIT_OK
