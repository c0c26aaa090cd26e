"""`tailor dataset inspect`: the status Tailor would write; exit 0 Ready, 1 not Ready, 2 bad manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from tailor_operator.cli import main

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

DATASET = """\
apiVersion: tailor.dev/v1alpha1
kind: Dataset
metadata:
  name: tickets
spec:
  source:
    uri: {data}
  format: jsonl
  schema: instruction
  split:
    validation: 0.1
    test: 0.1
"""


def _tailor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tailor_operator", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **OFFLINE}, timeout=300)


def test_inspect_quickstart_is_ready_with_token_statistics() -> None:
    # The FineTuneJob in the file names the tokenizer and maxSeqLength for the token statistics.
    result = _tailor("dataset", "inspect", "examples/quickstart.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Dataset support: Ready (Validated)"
    assert any(line.strip().startswith("rows") and "kept of 2000 read" in line for line in lines)
    assert any(line.strip().startswith("tokens") and "over maxSeqLength" in line for line in lines)


def test_inspect_bad_data_is_not_ready_and_names_the_rows(tmp_path: Path) -> None:
    data = tmp_path / "broken.jsonl"
    data.write_text('not json at all\n{"instruction": 1\n')
    path = tmp_path / "dataset.yaml"
    path.write_text(DATASET.format(data=data))
    result = _tailor("dataset", "inspect", "--output", "json", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    status = json.loads(result.stdout)
    ready = status["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "TooManyBadRows")
    assert [(e["line"], e["reason"]) for e in status["firstErrors"]] == [(1, "BadJSON"), (2, "BadJSON")]


def test_inspect_invalid_manifest_exits_2_and_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "dataset.yaml"
    path.write_text(DATASET.format(data=tmp_path / "x.jsonl").replace("  format: jsonl\n", "  format: xml\n"))
    result = CliRunner().invoke(main, ["dataset", "inspect", str(path)])
    assert result.exit_code == 2, result.output
    assert "Dataset/tickets" in result.stderr and "spec.format" in result.stderr


def test_inspect_unknown_dataset_name_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "dataset.yaml"
    path.write_text(DATASET.format(data=tmp_path / "x.jsonl"))
    result = CliRunner().invoke(main, ["dataset", "inspect", "--name", "other", str(path)])
    assert result.exit_code == 2
    assert "expected one Dataset (use --name), found []" in result.stderr
