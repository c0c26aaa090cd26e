"""`tailor validate`: names the field path and exits non-zero on a broken manifest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BROKEN = """\
apiVersion: tailor.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: broken
spec:
  baseModel:
    uri: examples/models/tailor-tiny-llama
  datasetRef:
    name: support
  output:
    uri: /tmp/out
  hyperparameters:
    epochs: 2
    maxSteps: 10
"""


def _tailor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tailor_operator", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_validate_broken_manifest_names_field_and_fails(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = _tailor("validate", str(path))
    assert result.returncode == 1
    assert "spec.hyperparameters" in result.stderr
    assert "epochs and maxSteps are mutually exclusive" in result.stderr
    assert "FineTuneJob/broken" in result.stderr


def test_validate_typo_is_not_silently_ignored(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(BROKEN.replace("    epochs: 2\n    maxSteps: 10\n", "    learnignRate: 0.1\n"))
    result = _tailor("validate", str(path))
    assert result.returncode == 1
    assert "spec.hyperparameters.learnignRate: unknown field" in result.stderr


def test_validate_examples_pass() -> None:
    result = _tailor("validate", *map(str, sorted((ROOT / "examples").rglob("*.yaml"))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")


def test_validate_bad_yaml_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: tailor.dev/v1alpha1\nkind: Dataset\nspec: [\n")
    result = _tailor("validate", str(path))
    assert result.returncode == 1
    assert "not valid YAML" in result.stderr and "line" in result.stderr
