"""The chart's PrometheusRule (charts/tailor/templates/prometheusrule.yaml), rendered by the real
helm and checked by the real promtool (`promtool check rules`, then `promtool test rules` over
tests/data/alerts/*.test.yaml: every alert fires when it should and stays quiet when it should
not). Both binaries come from `scripts/testenv build` (docs/testenv.md); no cluster is needed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tailor"
ALERTS = REPO / "tests" / "data" / "alerts"
EXPECTED = {"TailorFineTuneJobFailed", "TailorRunStuck", "TailorDatasetNotReady", "TailorPromotionsRejected",
            "TailorChampionStale", "TailorReconcileErrors"}
# rules-custom.yaml (custom.test.yaml): every threshold moved, extra alert labels, one alert off
CUSTOM = ["--set", "prometheusRule.runStuck.minutes=5", "--set", "prometheusRule.runStuck.severity=critical",
          "--set", "prometheusRule.promotionsRejected.count=2", "--set", "prometheusRule.reconcileErrors.threshold=20",
          "--set", "prometheusRule.alertLabels.team=ml-platform", "--set", "prometheusRule.jobFailed.enabled=false"]


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    r = subprocess.run([str(REPO / "scripts" / "testenv"), "env", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"`scripts/testenv env --json` failed: {r.stderr}", pytrace=False)
    env = json.loads(r.stdout)
    found = {"helm": Path(env["bin_dir"]) / "helm", "promtool": Path(env["tools"]["promtool"])}
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        pytest.fail(f"not built: {', '.join(missing)}; run `scripts/testenv build` (docs/testenv.md)", pytrace=False)
    return found


def render(helm: Path, *args: str) -> list[dict]:
    r = subprocess.run([str(helm), "template", "tailor", str(CHART), "-n", "tailor-system", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "PrometheusRule"]


@pytest.fixture(scope="module")
def rules_dir(tools, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("alerts")
    for name, args in (("rules.yaml", []), ("rules-custom.yaml", CUSTOM)):
        docs = render(tools["helm"], "--set", "prometheusRule.enabled=true", *args)
        assert len(docs) == 1
        (d / name).write_text(yaml.safe_dump(docs[0]["spec"], sort_keys=False))
    for f in ALERTS.glob("*.test.yaml"):
        shutil.copy(f, d / f.name)
    return d


def test_rule_is_opt_in(tools) -> None:
    assert render(tools["helm"]) == []


def test_rule_metadata_and_alerts(tools) -> None:
    rule = render(tools["helm"], "--set", "prometheusRule.enabled=true",
                  "--set", "prometheusRule.labels.release=prometheus")[0]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "tailor-system"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == EXPECTED


def test_promtool_checks_the_rules(tools, rules_dir) -> None:
    r = subprocess.run([str(tools["promtool"]), "check", "rules", "rules.yaml", "rules-custom.yaml"],
                       cwd=rules_dir, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout and "SUCCESS: 5 rules found" in r.stdout, r.stdout


def test_every_alert_has_a_promtool_test() -> None:
    tested = {t["alertname"] for f in ALERTS.glob("*.test.yaml")
              for case in yaml.safe_load(f.read_text())["tests"] for t in case.get("alert_rule_test", [])
              if t.get("exp_alerts")}
    assert tested == EXPECTED


@pytest.mark.parametrize("test_file", sorted(f.name for f in ALERTS.glob("*.test.yaml")))
def test_promtool_test_rules(tools, rules_dir, test_file) -> None:
    r = subprocess.run([str(tools["promtool"]), "test", "rules", test_file], cwd=rules_dir,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout


def test_promtool_catches_a_wrong_expectation(tools, rules_dir) -> None:
    """The harness can fail: the same test with the alert expected one minute too early."""
    case = yaml.safe_load((rules_dir / "failed.test.yaml").read_text())
    case["tests"][0]["alert_rule_test"][0]["exp_alerts"] = \
        case["tests"][0]["alert_rule_test"][1]["exp_alerts"]  # at 2m it is still pending
    (rules_dir / "wrong.yaml").write_text(yaml.safe_dump(case))
    r = subprocess.run([str(tools["promtool"]), "test", "rules", "wrong.yaml"], cwd=rules_dir,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "TailorFineTuneJobFailed" in r.stdout + r.stderr


def test_values_schema_rejects_bad_thresholds(tools) -> None:
    for bad in ("prometheusRule.runStuck.minutes=0", "prometheusRule.reconcileErrors.window=soon",
                "prometheusRule.jobFailed.paged=true"):
        r = subprocess.run([str(tools["helm"]), "template", "tailor", str(CHART), "--set", bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "schema" in (r.stderr + r.stdout).lower(), (bad, r.stderr)
