"""One Ray version everywhere: the trainer image installs ray from requirements.lock, and KubeRay is
told the same version by the operator's default and by the chart's `trainer.rayVersion`."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tailor_operator.builders.rayjob import RayJobOptions
from tailor_operator.reconcile.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]


def test_ray_version_agrees_across_lock_operator_and_chart() -> None:
    pins = re.findall(r"^ray(?:\[[^\]]*\])?==([^\s;#]+)", (ROOT / "requirements.lock").read_text(), re.M)
    assert len(set(pins)) == 1, f"requirements.lock should pin ray exactly once: {pins}"
    locked = pins[0]
    chart = yaml.safe_load((ROOT / "charts/tailor/values.yaml").read_text())["trainer"]["rayVersion"]
    found = {"requirements.lock": locked, "charts/tailor/values.yaml trainer.rayVersion": str(chart),
             "OperatorSettings.ray_version": OperatorSettings().ray_version,
             "RayJobOptions.ray_version": RayJobOptions().ray_version}
    assert len(set(found.values())) == 1, f"Ray versions disagree: {found}"
