"""`tailor run`: exit codes, the summary, plain output off a terminal, the live display, Ctrl-C.

Two tests train for real (the tiny model, a few steps): one run that is interrupted with SIGINT
and then resumed with the command the CLI prints (shared by several tests), and one that misses
its evaluation gate.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from click.testing import CliRunner
from rich.console import Console

from tailor_operator.cli import main
from tailor_operator.cli_commands import exit_code
from tailor_operator.backends import local
from tailor_operator.cli_display import MAX_TRIAL_ROWS, PlainDisplay, progress_line, render_progress
from tailor_trainer.contract import ProgressDoc

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ANSI = re.compile(r"\x1b\[")

MANIFEST = """\
apiVersion: tailor.dev/v1alpha1
kind: Dataset
metadata:
  name: support
spec:
  source:
    uri: {data}
  format: jsonl
  schema: instruction
  split:
    validation: 0.1
    test: 0.1
    seed: 7
---
apiVersion: tailor.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: {job}
spec:
  backend: local
  baseModel:
    uri: {model}
  datasetRef:
    name: support
  adaptation:
    method: lora
    lora:
      r: 8
      alpha: 16
      dropout: 0.0
      targetModules: [q_proj, v_proj]
  hyperparameters:
    learningRate: 0.003
    batchSize: 16
    maxSteps: {steps}
    maxSeqLength: 128
    checkpointEverySteps: 4
    evalEverySteps: 100
    seed: 7
  evaluation:
    metrics: [loss, perplexity]
    compareToBase: true
    maxEvalRows: 8
    maxNewTokens: 4
    gates:
      - metric: loss
        max: {gate}
  resources:
    workers: 1
    gpusPerWorker: 0
    cpusPerWorker: "2"
    memoryPerWorker: 4Gi
  output:
    uri: {out}
  backoffLimit: 0
"""


def _manifest(tmp: Path, *, job: str = "cli-run", steps: int = 12, gate: float = 100.0,
              data: Optional[Path] = None) -> Path:
    path = tmp / f"{job}.yaml"
    path.write_text(MANIFEST.format(
        job=job, steps=steps, gate=gate, out=tmp / "runs",
        data=data or ROOT / "examples" / "data" / "support-instructions.jsonl",
        model=ROOT / "examples" / "models" / "tailor-tiny-llama"))
    return path


def _tailor_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tailor_operator", *args]


def _env() -> dict[str, str]:
    return {**os.environ, **OFFLINE}


def _trainer_pids(config_path: Path) -> list[int]:
    """Live processes whose command line names this run's config.json (the trainer)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(config_path) in cmdline and "tailor_trainer" in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start `tailor run`, SIGINT it once training has started, then run the printed resume
    command to the end."""
    tmp = tmp_path_factory.mktemp("cli-run")
    path = _manifest(tmp)
    run_dir = tmp / "runs" / "default" / "cli-run" / "cli-run-r1"
    # As on a terminal: a shell starts background jobs (CI's, too) with SIGINT ignored, and an
    # ignored signal stays ignored across exec, so `tailor run` would never see the Ctrl-C.
    proc = subprocess.Popen(_tailor_argv("run", str(path)), cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            progress = _read_json(run_dir / "progress.json") or {}
            if progress.get("stage") == "train" and progress.get("step") is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before training: {proc.communicate()}"
        trainers = _trainer_pids(run_dir / "config.json")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    hint = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    resume_argv = shlex.split(hint.split("with: ", 1)[1]) if "with: " in hint else []
    resumed = None
    if resume_argv[:2] == ["tailor", "run"]:
        resumed = subprocess.run(_tailor_argv(*resume_argv[1:]), cwd=ROOT, env=_env(), text=True,
                                 capture_output=True, timeout=600)
    return {"code": proc.returncode, "stdout": stdout, "stderr": stderr, "hint": hint,
            "trainers": trainers, "config": run_dir / "config.json", "path": path,
            "resume_argv": resume_argv, "resumed": resumed}


@pytest.mark.slow
def test_ctrl_c_stops_the_trainer_and_prints_the_resume_command(interrupted_then_resumed: dict) -> None:
    r = interrupted_then_resumed
    assert r["code"] == 130, r["stderr"]
    assert r["hint"].startswith("interrupted: cli-run-r1 stopped during train"), r["stderr"]
    assert r["resume_argv"] == ["tailor", "run", str(r["path"])]
    assert r["trainers"], "the trainer was not running when SIGINT was sent"
    assert not _trainer_pids(r["config"]), "a trainer process was left behind"
    for pid in r["trainers"]:
        assert not Path(f"/proc/{pid}").exists() or pid not in _trainer_pids(r["config"])
    assert "Traceback" not in r["stderr"]


@pytest.mark.slow
def test_resume_command_finishes_the_run_with_a_summary(interrupted_then_resumed: dict) -> None:
    resumed = interrupted_then_resumed["resumed"]
    assert resumed is not None, interrupted_then_resumed["stderr"]
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out = resumed.stdout
    assert "run cli-run-r1 (attempt 2)" in out  # the same run, resumed, not a new one
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "fine-tuned", "change"]
    assert re.search(r"^loss\s+\d+\.\d{4}\s+\d+\.\d{4}\s+[+-]\d+\.\d{4}$", out, re.M), out
    assert re.search(r"^result: .*/cli-run-r1/evaluate/result\.json$", out, re.M), out


@pytest.mark.slow
def test_plain_output_off_a_terminal_is_line_based(interrupted_then_resumed: dict) -> None:
    for out in (interrupted_then_resumed["stdout"], interrupted_then_resumed["resumed"].stdout):
        assert "\r" not in out and not ANSI.search(out), out
    lines = interrupted_then_resumed["stdout"].splitlines()
    assert lines[0].startswith("run cli-run-r1 (attempt 1) -> ")
    progress = [line for line in lines[1:] if line]
    assert progress and all(re.match(r"^\[(starting|prep|adapt|train|evaluate)\]", line) for line in progress)
    stages = [line.split("]")[0][1:] for line in progress]
    assert stages.index("prep") < stages.index("adapt") < stages.index("train")
    assert len(progress) == len(set(progress)), "a plain line repeats: progress is printed only on change"


@pytest.mark.slow
def test_missed_evaluation_gate_exits_1(tmp_path: Path) -> None:
    path = _manifest(tmp_path, job="cli-gate", steps=2, gate=0.01)
    result = subprocess.run(_tailor_argv("run", "--quiet", str(path)), cwd=ROOT, env=_env(), text=True,
                            capture_output=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: GateFailed: gate failed: loss = " in result.stderr
    assert "(field spec.evaluation.gates[0])" in result.stderr
    assert "[train]" not in result.stdout  # --quiet: no progress lines


def test_bad_dataset_exits_2_and_names_the_problem(tmp_path: Path) -> None:
    data = tmp_path / "broken.jsonl"
    data.write_text('not json at all\n{"instruction": 1\n')
    path = _manifest(tmp_path, job="cli-bad-data", data=data)
    result = subprocess.run(_tailor_argv("run", str(path)), cwd=ROOT, env=_env(), text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "FAILED: DataInvalid: TooManyBadRows" in result.stderr
    assert "broken.jsonl line 1: BadJSON" in result.stderr
    assert "(field dataset)" in result.stderr
    assert not (tmp_path / "runs" / "default" / "cli-bad-data" / "cli-bad-data-r1" / "train").exists()


def test_invalid_manifest_exits_2_and_names_the_field(tmp_path: Path) -> None:
    path = _manifest(tmp_path)
    path.write_text(path.read_text().replace("    maxSteps: 12\n", "    maxSteps: 12\n    epochs: 2\n"))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "FineTuneJob/cli-run" in result.stderr
    assert "spec.hyperparameters" in result.stderr
    assert "epochs and maxSteps are mutually exclusive" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_reference_exits_2(tmp_path: Path) -> None:
    path = _manifest(tmp_path)
    path.write_text(path.read_text().replace("    name: support\n  adaptation", "    name: other\n  adaptation"))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2
    assert "spec.datasetRef.name: Dataset 'other' is not in" in result.stderr


def test_help_documents_the_exit_codes() -> None:
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    for code in ("0", "1", "2", "130"):
        assert re.search(rf"^\s+{code}\s+\w", result.output, re.M), result.output
    assert "--quiet" in result.output and "--fresh" in result.output


@pytest.mark.parametrize(("trainer_code", "progress", "expected"), [
    (0, {"state": "Succeeded", "stage": "evaluate"}, 0),
    (1, {"state": "Failed", "stage": "evaluate", "error": {"reason": "GateFailed"}}, 1),
    (1, {"state": "Failed", "stage": "train", "error": {"reason": "Diverged"}}, 1),
    (1, {"state": "Failed", "stage": "prep", "error": {"reason": "DataInvalid"}}, 2),
    (1, {"state": "Failed", "stage": "adapt", "error": {"reason": "ModelInvalid"}}, 2),
    (1, {"state": "Failed", "stage": "evaluate", "error": {"reason": "DataInvalid"}}, 1),
    (2, {"state": "Failed", "stage": "adapt", "error": {"reason": "InvalidSpec"}}, 2),
    (2, None, 2),
    (3, {"state": "Failed", "stage": "train", "error": {"reason": "InternalError"}}, 1),
    (143, {"state": "Failed", "stage": "train", "error": {"reason": "Interrupted"}}, 130),
    (-9, None, 1),
])
def test_exit_code_from_the_trainer(trainer_code: int, progress: Optional[dict], expected: int) -> None:
    assert exit_code(trainer_code, ProgressDoc.read(progress)) == expected


RAW = {"state": "Running", "stage": "train", "step": 6, "totalSteps": 12, "loss": 2.34561,
       "tokensPerSecond": 2506.4, "etaSeconds": 75, "message": None}
TRAINING = ProgressDoc.read(RAW)


def _doc(**fields) -> ProgressDoc:
    return ProgressDoc.read(fields)


def test_live_display_shows_stage_steps_loss_speed_eta_and_elapsed() -> None:
    console = Console(file=io.StringIO(), width=120, color_system=None, record=True)
    console.print(render_progress(TRAINING, elapsed=42.0))
    text = console.export_text()
    assert "prep ✓ > adapt ✓ > train > evaluate" in text
    assert "step 6/12 (50%)" in text
    assert "loss 2.3456" in text
    assert "2506 tok/s" in text
    assert "ETA 1m15s" in text
    assert "elapsed 42s" in text


def test_live_display_before_the_first_step() -> None:
    console = Console(file=io.StringIO(), width=120, color_system=None, record=True)
    console.print(render_progress(_doc(stage="prep", message="reading rows"), elapsed=3.0))
    text = console.export_text()
    assert "step" not in text and "ETA" not in text
    assert "reading rows" in text and "elapsed 3s" in text


def test_plain_display_prints_stage_changes_at_once_and_training_every_few_seconds() -> None:
    lines: list[str] = []
    now = [0.0]
    display = PlainDisplay(lines.append, clock=lambda: now[0])
    display.update(None)  # nothing written yet: nothing printed
    display.update(_doc(stage="prep"))
    display.update(_doc(stage="prep"))  # unchanged: not repeated
    display.update(TRAINING)
    now[0] = 1.0
    display.update(_doc(**{**RAW, "step": 7}))  # within the interval: skipped
    now[0] = 6.0
    display.update(_doc(**{**RAW, "step": 8}))
    display.update(_doc(stage="evaluate", message="measuring"))
    assert lines == ["[prep]", progress_line(TRAINING), progress_line(_doc(**{**RAW, "step": 8})),
                     "[evaluate]  measuring"]
    assert lines[1] == "[train]  step 6/12 (50%)  loss 2.3456  2506 tok/s  ETA 1m15s"


def _trial(i: int, state: str, steps: Optional[int], objective: Optional[float], lr: float, r: int) -> dict:
    return {"id": f"t{i:02d}", "state": state, "steps": steps, "totalSteps": 40, "objective": objective,
            "params": {"learningRate": lr, "lora.r": r}}


SEARCH = {"trials": 6, "pending": 1, "running": 2, "completed": 2, "stopped": 1, "failed": 0, "objective": "valLoss",
          "best": _trial(2, "completed", 40, 1.23451, 0.003, 8),
          "table": [_trial(1, "stopped", 10, 2.9, 0.03, 16), _trial(2, "completed", 40, 1.23451, 0.003, 8),
                    _trial(3, "completed", 40, 1.9, 0.0003, 8), _trial(4, "running", 20, 1.4, 0.003, 16),
                    _trial(5, "running", 10, None, 0.0003, 16), _trial(6, "pending", None, None, 0.03, 8)]}


def test_live_display_shows_the_search_and_its_trials() -> None:
    console = Console(file=io.StringIO(), width=120, color_system=None, record=True)
    console.print(render_progress(_doc(**{**RAW, "search": SEARCH}), elapsed=42.0))
    text = console.export_text()
    assert "step 6/12 (50%)" in text  # the progress bar stays
    assert "3/6 done (2 running, 1 stopped)  best t02 valLoss 1.2345" in text
    rows = {m.group(1): line for line in text.splitlines() if (m := re.match(r"^\s*\*?\s*(t0\d)\s", line))}
    assert sorted(rows) == ["t01", "t02", "t03", "t04", "t05", "t06"]
    assert re.search(r"\* t02\s+completed\s+40/40\s+1\.2345\s+learningRate=0\.003, lora\.r=8", rows["t02"])
    assert re.search(r"t01\s+stopped\s+10/40\s+2\.9000\s+learningRate=0\.03, lora\.r=16", rows["t01"])
    assert re.search(r"t06\s+pending\s+learningRate=0\.03, lora\.r=8", rows["t06"])
    assert text.index("step 6/12") < text.index("valLoss") < text.index("t01")


def test_live_display_of_a_large_search_keeps_the_running_and_best_trials() -> None:
    table = [_trial(i, "stopped", 10, 3.0 + i, 0.01, 8) for i in range(1, 30)]
    table += [_trial(30, "running", 5, None, 0.001, 8), _trial(31, "completed", 40, 0.5, 0.002, 8)]
    search = {"trials": 31, "running": 1, "completed": 1, "stopped": 29, "objective": "valLoss",
              "best": table[-1], "table": table}
    console = Console(file=io.StringIO(), width=120, color_system=None, record=True)
    console.print(render_progress(_doc(stage="train", search=search), elapsed=1.0))
    text = console.export_text()
    shown = re.findall(r"\bt(\d\d)\s+(?:stopped|running|completed)", text)
    assert len(shown) == MAX_TRIAL_ROWS
    assert {"30", "31", "01"} <= set(shown) and "29" not in shown
    assert f"+{31 - MAX_TRIAL_ROWS} more" in text


def test_plain_line_during_a_search() -> None:
    line = progress_line(_doc(stage="train", search=SEARCH))
    assert line == "[train]  search 3/6 done (2 running, 1 stopped)  best t02 valLoss 1.2345"
    first = progress_line(_doc(stage="train", search={"trials": 6, "pending": 4, "running": 2}))
    assert first == "[train]  search 0/6 done (2 running)"


def test_run_prints_the_chosen_trial_after_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer replaced by a process that exits 0 at once, its progress document written as
    a finished search run would leave it."""
    final = {**SEARCH, "pending": 0, "running": 0, "completed": 4, "stopped": 2,
             "best": _trial(3, "completed", 40, 1.234, 0.003, 8)}
    doc = {"state": "Succeeded", "stage": "evaluate", "attempt": 1,
           "result": {"metrics": {"loss": 1.25, "baseLoss": 2.5}, "artifacts": {"model": "m"}, "search": final}}

    def fake_start(config: Any, workdir: Path, **_: Any) -> local.LocalRun:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "progress.json").write_text(json.dumps(doc))
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        return local.LocalRun(workdir=workdir, process=process, log_path=workdir / "trainer.log")

    monkeypatch.setattr(local, "start", fake_start)
    result = CliRunner().invoke(main, ["run", str(_manifest(tmp_path))])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.index("metric") < out.index("search: 6 trials, 4 completed, 2 stopped early") < out.index("model:")
    assert "chosen trial t03 (valLoss 1.2340, 40 steps): learningRate=0.003, lora.r=8" in out
