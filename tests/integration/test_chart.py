"""The Helm chart (charts/tailor): one named test per behaviour, rendered with the real helm, then
installed on the control plane; the operator then runs under exactly the identity and RBAC the
chart grants (ServiceAccount tailor-system/tailor) through a kuberay run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from operator_fixtures import (REPO, TESTENV, ControlPlane, Kube, OperatorProcess, dataset_manifest, job_manifest, ready_result,
                               wait_until)
from tailor_operator import crdgen

pytestmark = pytest.mark.integration

CHART = REPO / "charts" / "tailor"
RELEASE_NS = "tailor-system"


def _render(cp, *args: str) -> list[dict]:
    r = cp.helm("template", "tailor", str(CHART), "-n", RELEASE_NS, *args, check=True)
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def test_chart_lints_clean(control_plane) -> None:
    r = control_plane.helm("lint", str(CHART), "--strict")
    assert r.returncode == 0, r.stdout + r.stderr


def test_default_install_is_cluster_wide_with_probes_and_metrics(control_plane) -> None:
    docs = _render(control_plane)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
                                         "Service", "ConfigMap", "Role", "RoleBinding",  # Role: the Lease
                                         "CustomResourceDefinition", "Pod"}  # Pod: the `helm test` hook
    deploy = _find(docs, "Deployment")[0]
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["python", "-m", "tailor_operator.runner"]
    assert "--all-namespaces" in c["args"] and "--metrics-port=8080" in c["args"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TAILOR_TRAINER_IMAGE"] == "ghcr.io/tailor-dev/tailor-trainer:0.1.0"
    assert env["TAILOR_TRAINER_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert env["TAILOR_RAY_VERSION"] == "2.60.0"  # tests/contract/test_versions.py: = requirements.lock
    assert (env["TAILOR_VALIDATION_CPU"], env["TAILOR_VALIDATION_MEMORY"]) == ("1", "2Gi")
    assert env["TAILOR_TRAINER_SERVICE_ACCOUNT"] == "tailor-trainer"
    assert env["TAILOR_DATASET_BACKEND"] == "kuberay"
    assert pod["serviceAccountName"] == "tailor" and deploy["spec"]["replicas"] == 1
    # a read-only root filesystem: HOME, the workdir and /tmp are emptyDirs; no .pyc writes
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert env["HOME"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp", env["TAILOR_WORKDIR"]}
    assert deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8080"
    svc = _find(docs, "Service")[0]
    assert svc["spec"]["ports"][0]["name"] == "metrics"
    rules = _find(docs, "ClusterRole")[0]["rules"]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    assert any("finetunejobs/status" in r["resources"] for r in rules)
    # the trainer's ServiceAccount/Role/RoleBinding, created by the operator where missing
    assert {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "create"]} in rules
    assert {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
            "verbs": ["get", "create"]} in rules
    # the chart owns no trainer Role by default; the only Role is the leader election's Lease access
    assert [r["metadata"]["name"] for r in _find(docs, "Role")] == ["tailor-leader-election"]
    assert not _find(docs, "ServiceAccount", "tailor-trainer")


def test_trainer_pod_settings_are_values(control_plane) -> None:
    docs = _render(control_plane, "--set", "trainer.imagePullPolicy=Always", "--set", "trainer.validation.cpu=250m",
                   "--set", "trainer.validation.memory=1Gi", "--set", "trainer.headCpu=500m")
    env = {e["name"]: e.get("value")
           for e in _find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TAILOR_TRAINER_IMAGE_PULL_POLICY"] == "Always"
    assert (env["TAILOR_VALIDATION_CPU"], env["TAILOR_VALIDATION_MEMORY"], env["TAILOR_HEAD_CPU"]) == (
        "250m", "1Gi", "500m")


def test_watch_namespaces_use_roles_instead_of_cluster_rules(control_plane) -> None:
    docs = _render(control_plane, "--set", "watchNamespaces={team-a,team-b}")
    roles = [r for r in _find(docs, "Role") if not r["metadata"]["name"].endswith("-leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in _find(docs, "RoleBinding")
                  if not b["metadata"]["name"].endswith("-leader-election")) == ["team-a", "team-b"]
    cluster_rules = [r for cr in _find(docs, "ClusterRole") for r in cr["rules"]]
    assert all("finetunejobs" not in r["resources"] for r in cluster_rules)
    args = _find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_leader_election_allows_replicas_and_a_rolling_update(control_plane) -> None:
    docs = _render(control_plane, "--set", "replicas=2")
    deploy = _find(docs, "Deployment")[0]
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TAILOR_LEADER_ELECTION"] == "true" and env["TAILOR_LEASE_NAME"] == "tailor"
    assert (env["TAILOR_LEASE_DURATION_SECONDS"], env["TAILOR_LEASE_RENEW_DEADLINE_SECONDS"],
            env["TAILOR_LEASE_RETRY_PERIOD_SECONDS"]) == ("15", "10", "2")
    assert "POD_NAME" in env and "POD_NAMESPACE" in env
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"  # a follower is Ready: the rollout never stalls
    role = _find(docs, "Role", "tailor-leader-election")[0]
    assert role["metadata"]["namespace"] == RELEASE_NS
    assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                              "verbs": ["get", "list", "watch", "create", "update"]}]
    single = _find(_render(control_plane, "--set", "leaderElection.enabled=false"), "Deployment")[0]
    assert single["spec"]["replicas"] == 1 and single["spec"]["strategy"] == {"type": "Recreate"}
    r = control_plane.helm("template", "tailor", str(CHART), "--set", "leaderElection.enabled=false",
                           "--set", "replicas=2")
    assert r.returncode != 0 and "needs leaderElection.enabled" in r.stderr


def test_trainer_service_account_per_namespace(control_plane) -> None:
    docs = _render(control_plane, "--set", "trainer.serviceAccount.namespaces={ml}")
    sa = _find(docs, "ServiceAccount", "tailor-trainer")
    assert [s["metadata"]["namespace"] for s in sa] == ["ml"]
    role = _find(docs, "Role", "tailor-trainer")[0]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "verbs": ["get", "create", "update", "patch"]}]


def test_service_monitor_is_opt_in(control_plane) -> None:
    assert not _find(_render(control_plane), "ServiceMonitor")
    docs = _render(control_plane, "--set", "metrics.serviceMonitor.enabled=true",
                   "--set", "metrics.serviceMonitor.labels.release=prometheus")
    sm = _find(docs, "ServiceMonitor")[0]
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s", "honorLabels": True}]


def test_values_schema_rejects_bad_values(control_plane) -> None:
    for bad in ("operator.datasetBackend=gpu", "operator.workers=0", "trainer.headMemory=lots", "unknownKey=1",
                "trainer.imagePullPolicy=Sometimes", "trainer.validation.cpu=lots", "trainer.validation.gpu=1"):
        r = control_plane.helm("template", "tailor", str(CHART), "--set", bad)
        assert r.returncode != 0 and "schema" in (r.stderr + r.stdout).lower(), (bad, r.stderr)


def test_dashboard_is_valid_and_queries_documented_metrics(control_plane) -> None:
    cm = _find(_render(control_plane), "ConfigMap", "tailor-dashboard")[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["tailor.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"tailor_[a-z_]+", e)}
    documented = set(re.findall(r"^\| `(tailor_[a-z_]+)`", (REPO / "docs/operator.md").read_text(), re.M))
    assert used and used <= documented, used - documented
    assert len(dashboard["panels"]) >= 10


def test_chart_crds_are_the_generated_ones(control_plane) -> None:
    """The chart renders exactly the generated CRDs (templates, so `helm upgrade` upgrades them;
    Helm never upgrades a chart's crds/ folder, which the chart no longer has), owned by the release
    and kept by `helm uninstall`; crds/ at the top stays plain YAML for kubectl."""
    assert not (CHART / "crds").exists()
    rendered = {d["metadata"]["name"]: d for d in _find(_render(control_plane), "CustomResourceDefinition")}
    generated = {c["metadata"]["name"]: c for c in crdgen.build_crds().values()}
    assert sorted(rendered) == sorted(generated)
    for name, crd in generated.items():
        got = rendered[name]
        assert {k: v for k, v in got.items() if k != "metadata"} == {k: v for k, v in crd.items() if k != "metadata"}, name
        assert crd["metadata"]["labels"].items() <= got["metadata"]["labels"].items()
        assert got["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert got["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert (REPO / "crds" / f"{crd['spec']['group']}_{crd['spec']['names']['plural']}.yaml").read_text() == \
            crdgen.render(crd)


def test_crds_install_and_keep_are_values(control_plane) -> None:
    assert not _find(_render(control_plane, "--set", "crds.install=false"), "CustomResourceDefinition")
    unkept = _find(_render(control_plane, "--set", "crds.keep=false"), "CustomResourceDefinition")
    assert len(unkept) == 2 and all("annotations" not in c["metadata"] for c in unkept)
    r = control_plane.helm("template", "tailor", str(CHART), "--set", "crds.enabled=true")
    assert r.returncode != 0 and "schema" in (r.stderr + r.stdout).lower(), r.stderr


def test_helm_test_pod_checks_health_and_crds_with_minimal_rights(control_plane) -> None:
    toleration = '[{"key":"gpu","operator":"Exists","effect":"NoSchedule"}]'
    docs = _render(control_plane, "--set-json", f"tolerations={toleration}", "--set", "image.tag=dev")
    pod = _find(docs, "Pod", "tailor-test")[0]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    operator = _find(docs, "Deployment")[0]["spec"]["template"]["spec"]
    spec, c = pod["spec"], pod["spec"]["containers"][0]
    # the operator's image and security settings, and it goes where the operator goes
    assert c["image"] == operator["containers"][0]["image"] == "ghcr.io/tailor-dev/tailor-operator:dev"
    assert spec["securityContext"] == operator["securityContext"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == operator["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert spec["tolerations"] == operator["tolerations"] and spec["restartPolicy"] == "Never"
    script = c["args"][0]
    assert "http://tailor-health.tailor-system.svc:8081/healthz" in script
    assert '"finetunejobs.tailor.dev", "datasets.tailor.dev"' in script
    compile(script, "helm-test", "exec")
    health = _find(docs, "Service", "tailor-health")[0]
    assert health["spec"]["ports"] == [{"name": "health", "port": 8081, "targetPort": "health", "protocol": "TCP"}]
    assert health["spec"]["selector"] == _find(docs, "Deployment")[0]["spec"]["selector"]["matchLabels"]
    # its identity may read the two CRDs, nothing else
    assert spec["serviceAccountName"] == "tailor-test" and _find(docs, "ServiceAccount", "tailor-test")
    assert _find(docs, "ClusterRole", "tailor-test")[0]["rules"] == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "resourceNames": ["finetunejobs.tailor.dev", "datasets.tailor.dev"], "verbs": ["get"]}]
    binding = _find(docs, "ClusterRoleBinding", "tailor-test")[0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tailor-test", "namespace": RELEASE_NS}]
    assert "Pod" not in {d["kind"] for d in _render(control_plane, "--skip-tests")}


# The previous chart (0.1.0, CRDs in crds/), vendored: see tests/data/charts/README.md.
PREVIOUS_CHART = REPO / "tests" / "data" / "charts" / "tailor-0.1.0.tgz"
TAILOR_CRDS = ("finetunejobs.tailor.dev", "datasets.tailor.dev")
# The one-time step of docs/operator.md ("Upgrading the chart"), verbatim.
ADOPT_CRDS = [
    "kubectl label crd finetunejobs.tailor.dev datasets.tailor.dev app.kubernetes.io/managed-by=Helm --overwrite",
    "kubectl annotate crd finetunejobs.tailor.dev datasets.tailor.dev meta.helm.sh/release-name=tailor "
    "meta.helm.sh/release-namespace=tailor-system --overwrite",
]


@pytest.fixture
def bare_control_plane(control_plane, tmp_path):
    """A second control plane, with no CRDs at all (about 4 s): chart 0.1.0 installs its CRDs from
    crds/ only where they are missing, and the session's CRDs (with other tests' objects) stay
    untouched. Same binaries as the session's."""
    empty = tmp_path / "no-crds"
    empty.mkdir()
    cp = ControlPlane.up(tmp_path / "testenv", control_plane.bin_dir, "--crds", str(empty), "--no-kuberay-crds")
    try:
        yield cp
    finally:
        subprocess.run([str(TESTENV), "down", "--dir", str(cp.dir)], capture_output=True, text=True, timeout=120)


def _queue_name_in_schema(cp) -> bool:
    crd = json.loads(cp.kubectl("get", "crd", "finetunejobs.tailor.dev", "-o", "json", check=True).stdout)
    return "queueName" in crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


@pytest.mark.parametrize("adopt", ["kubectl", "take-ownership"])
def test_upgrade_from_0_1_0_upgrades_the_crds_and_uninstall_keeps_them(bare_control_plane, adopt) -> None:
    """0.1.0 (its FineTuneJob CRD lacks spec.queueName) -> the working tree's chart: Helm refuses to
    adopt the CRDs 0.1.0 created from crds/ until they carry its ownership metadata (the documented
    one-time step, or --take-ownership with Helm >= 3.17); then the upgrade brings the new schema,
    and `helm uninstall` leaves the CRDs and the objects in them."""
    cp = bare_control_plane
    cp.helm("install", "tailor", str(PREVIOUS_CHART), "-n", RELEASE_NS, "--create-namespace", check=True)
    assert not _queue_name_in_schema(cp)
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in TAILOR_CRDS),
               check=True)
    cp.kubectl("create", "namespace", "team", check=True)
    cp.kubectl("apply", "-n", "team", "-f", "-", input=json.dumps(dataset_manifest("tickets")), check=True)

    r = cp.helm("upgrade", "tailor", str(CHART), "-n", RELEASE_NS)
    assert r.returncode != 0 and "invalid ownership metadata" in r.stderr, r.stderr
    assert not _queue_name_in_schema(cp)
    docs = (REPO / "docs" / "operator.md").read_text()
    if adopt == "kubectl":
        for command in ADOPT_CRDS:
            assert command in docs, command
            cp.kubectl(*command.split()[1:], check=True)
        r = cp.helm("upgrade", "tailor", str(CHART), "-n", RELEASE_NS)
    else:
        assert "helm upgrade tailor charts/tailor -n tailor-system --take-ownership" in docs
        r = cp.helm("upgrade", "tailor", str(CHART), "-n", RELEASE_NS, "--take-ownership")
    assert r.returncode == 0, r.stderr
    assert _queue_name_in_schema(cp)
    for name in TAILOR_CRDS:
        meta = json.loads(cp.kubectl("get", "crd", name, "-o", "json", check=True).stdout)["metadata"]
        assert meta["labels"]["helm.sh/chart"] == f"tailor-{yaml.safe_load((CHART / 'Chart.yaml').read_text())['version']}"
        assert meta["annotations"]["helm.sh/resource-policy"] == "keep"
    # a job using the new field is accepted by the upgraded schema (strict field validation)
    job = job_manifest("queued")
    job["spec"]["queueName"] = "team-queue"
    cp.kubectl("apply", "-n", "team", "--validate=strict", "-f", "-", input=json.dumps(job), check=True)
    # later upgrades need no step: the release owns the CRDs now
    cp.helm("upgrade", "tailor", str(CHART), "-n", RELEASE_NS, "--set", "operator.workers=4", check=True)

    r = cp.helm("uninstall", "tailor", "-n", RELEASE_NS, "--wait", "--timeout", "60s", check=True)
    assert "kept due to the resource policy" in r.stdout, r.stdout
    for name in TAILOR_CRDS:
        assert cp.kubectl("get", "crd", name).returncode == 0, name
    assert cp.kubectl("get", "datasets.tailor.dev", "tickets", "-n", "team").returncode == 0
    assert cp.kubectl("get", "finetunejobs.tailor.dev", "queued", "-n", "team").returncode == 0


def _install(cp, *args: str):
    # testenv applied crds/ with kubectl: here they are managed outside the release (crds.install=false)
    r = cp.helm("install", "tailor", str(CHART), "-n", RELEASE_NS, "--create-namespace", "--set", "crds.install=false",
                *args)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def installed(control_plane, namespace):
    """The chart owns the trainer ServiceAccount in `namespace` (trainer.serviceAccount.namespaces)."""
    _install(control_plane, "--set", f"trainer.serviceAccount.namespaces={{{namespace}}}")
    yield control_plane
    control_plane.helm("uninstall", "tailor", "-n", RELEASE_NS, "--wait", "--timeout", "60s")


@pytest.fixture
def installed_default(control_plane):
    """The chart as users install it: no trainer ServiceAccount anywhere until the operator makes one."""
    r = _install(control_plane)
    yield control_plane, r.stdout
    control_plane.helm("uninstall", "tailor", "-n", RELEASE_NS, "--wait", "--timeout", "60s")


def test_operator_runs_with_exactly_the_charts_rbac(installed, k8s_client, namespace, tmp_path) -> None:
    """Install the chart, then run the operator as system:serviceaccount:tailor-system:tailor (the
    chart's ServiceAccount): validation Job, RayJob (its owner reference needs the chart's
    `finetunejobs/finalizers` update), status, events and garbage collection all work."""
    cp = installed
    assert cp.kubectl("get", "deployment", "tailor", "-n", RELEASE_NS).returncode == 0
    assert cp.kubectl("get", "serviceaccount", "tailor-trainer", "-n", namespace).returncode == 0
    cp.stop_kuberay()
    kube = Kube(k8s_client, namespace)
    operator = OperatorProcess(cp.kubeconfigs["tailor"], tmp_path / "op",
                               env={"TAILOR_TRAINER_SERVICE_ACCOUNT": "tailor-trainer",
                                    # the chart's leader election, under the chart's RBAC
                                    "TAILOR_LEADER_ELECTION": "true", "TAILOR_LEASE_NAME": "tailor",
                                    "TAILOR_LEASE_NAMESPACE": RELEASE_NS}).start()
    try:
        lease = wait_until(lambda: kube.cluster.get("Lease", RELEASE_NS, "tailor"), 30, what="Lease",
                           on_timeout=operator.log_tail)
        assert lease["spec"]["holderIdentity"]
        kube.apply(dataset_manifest("tickets"))
        job = wait_until(lambda: next(iter(kube.list("Job", {"tailor.dev/dataset": "tickets"})), None), 30,
                         what="validation Job", on_timeout=operator.log_tail)
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == "tailor-trainer"
        kube.publish_validation("tickets", ready_result())
        wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 30,
                   what="Ready", on_timeout=operator.log_tail)
        kube.apply(job_manifest("rbac"))
        wait_until(lambda: kube.get("RayJob", "rbac-r1"), 30, what="RayJob", on_timeout=operator.log_tail)
        # the run's Ray pods are fenced by a NetworkPolicy created with them
        policy = kube.get("NetworkPolicy", "rbac-r1")
        assert policy["spec"]["podSelector"] == {"matchLabels": {"tailor.dev/run": "rbac-r1"}}, policy
        kube.set_rayjob_status("rbac-r1", "Running", "RUNNING")
        wait_until(lambda: kube.status("FineTuneJob", "rbac").get("phase") == "Running", 30, what="Running",
                   on_timeout=operator.log_tail)
        assert "Running" in wait_until(lambda: kube.event_reasons("rbac"), 10, what="events")
        kube.delete("FineTuneJob", "rbac")
        wait_until(lambda: kube.get("FineTuneJob", "rbac") is None and kube.get("RayJob", "rbac-r1") is None
                   and kube.get("NetworkPolicy", "rbac-r1") is None, 60, what="children garbage-collected",
                   on_timeout=operator.log_tail)
        # the operator's identity reads no Secret anywhere (it hands secretRefs to pods by name)
        sa = f"system:serviceaccount:{RELEASE_NS}:tailor"
        for ns in (namespace, "kube-system", RELEASE_NS):
            for verb in ("get", "list", "watch"):
                r = cp.kubectl("auth", "can-i", verb, "secrets", "-n", ns, "--as", sa)
                assert r.stdout.strip() == "no", (ns, verb, r.stdout, r.stderr)
        assert "Forbidden" not in Path(operator.log_path).read_text()
        # the chart owns the trainer's ServiceAccount here: the operator found it and left it alone
        for kind in ("ServiceAccount", "Role", "RoleBinding"):
            assert kube.get(kind, "tailor-trainer")["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert "TrainerAccessCreated" not in kube.event_reasons("tickets") + kube.event_reasons("rbac")
    finally:
        operator.stop()


def test_operator_creates_the_trainer_account_with_the_charts_rbac(installed_default, k8s_client, namespace,
                                                                    tmp_path) -> None:
    """Default install (trainer.serviceAccount.namespaces empty), a namespace nobody prepared: the
    operator, as the chart's ServiceAccount, creates the trainer's ServiceAccount, Role and
    RoleBinding before the validation Job. The API server lets it create a Role granting
    configmaps get/create/update/patch only because it holds those itself."""
    cp, install_output = installed_default
    assert "examples/cluster" in install_output and "quickstart" not in install_output  # NOTES.txt
    cp.stop_kuberay()
    kube = Kube(k8s_client, namespace)
    assert kube.get("ServiceAccount", "tailor-trainer") is None
    operator = OperatorProcess(cp.kubeconfigs["tailor"], tmp_path / "op",
                               env={"TAILOR_TRAINER_SERVICE_ACCOUNT": "tailor-trainer",
                                    # the chart's leader election, under the chart's RBAC
                                    "TAILOR_LEADER_ELECTION": "true", "TAILOR_LEASE_NAME": "tailor",
                                    "TAILOR_LEASE_NAMESPACE": RELEASE_NS}).start()
    try:
        lease = wait_until(lambda: kube.cluster.get("Lease", RELEASE_NS, "tailor"), 30, what="Lease",
                           on_timeout=operator.log_tail)
        assert lease["spec"]["holderIdentity"]
        kube.apply(dataset_manifest("tickets"))
        job = wait_until(lambda: next(iter(kube.list("Job", {"tailor.dev/dataset": "tickets"})), None), 30,
                         what="validation Job", on_timeout=operator.log_tail)
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == "tailor-trainer"
        sa, role, binding = (kube.get(k, "tailor-trainer") for k in ("ServiceAccount", "Role", "RoleBinding"))
        for obj in (sa, role, binding):
            assert obj is not None and obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tailor"
        assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                                  "verbs": ["get", "create", "update", "patch"]}]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tailor-trainer", "namespace": namespace}]
        assert binding["roleRef"]["name"] == "tailor-trainer"
        kube.wait_event("tickets", "TrainerAccessCreated")
        # the trainer account can do what the trainer does, and no more
        trainer = f"system:serviceaccount:{namespace}:tailor-trainer"
        for verb, allowed in (("patch", "yes"), ("create", "yes"), ("get", "yes"), ("delete", "no"), ("list", "no")):
            r = cp.kubectl("auth", "can-i", verb, "configmaps", "-n", namespace, "--as", trainer)
            assert r.stdout.strip() == allowed, (verb, r.stdout, r.stderr)
        kube.publish_validation("tickets", ready_result())
        wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 30,
                   what="Ready", on_timeout=operator.log_tail)
        kube.apply(job_manifest("fresh"))
        rayjob = wait_until(lambda: kube.get("RayJob", "fresh-r1"), 30, what="RayJob", on_timeout=operator.log_tail)
        assert rayjob["spec"]["submitterPodTemplate"]["spec"]["serviceAccountName"] == "tailor-trainer"
        assert kube.event_reasons("fresh").count("TrainerAccessCreated") == 0  # present already: nothing to do
        log = Path(operator.log_path).read_text()
        assert "Forbidden" not in log and "TrainerAccessFailed" not in log
    finally:
        operator.stop()


def test_missing_operator_permission_is_named_and_retried(control_plane, k8s_client, namespace, tmp_path) -> None:
    """The chart's operator rules without `create serviceaccounts` (bound to test user bob): the
    Dataset says which permission is missing (condition + Warning event) and no validation Job
    appears; once the permission is granted, the next try creates everything."""
    rules = _find(_render(control_plane), "ClusterRole", "tailor")[0]["rules"]
    limited = [r for r in rules if r["resources"] != ["serviceaccounts"]]
    assert len(limited) == len(rules) - 1
    name = f"tailor-limited-{namespace}"[:63]

    def bind(role_rules: list[dict]) -> None:
        docs = [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
                 "rules": role_rules},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                 "metadata": {"name": name},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                 "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "bob"}]}]
        control_plane.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs), check=True)

    bind(limited)
    cp = control_plane
    cp.stop_kuberay()
    kube = Kube(k8s_client, namespace)
    operator = OperatorProcess(cp.kubeconfigs["bob"], tmp_path / "op", namespaces=[namespace],
                               env={"TAILOR_TRAINER_SERVICE_ACCOUNT": "tailor-trainer"}).start()
    try:
        kube.apply(dataset_manifest("tickets"))
        ready = wait_until(lambda: (c := kube.condition("Dataset", "tickets", "Ready")).get("reason")
                           == "TrainerAccessFailed" and c, 30, what="TrainerAccessFailed", on_timeout=operator.log_tail)
        assert ready["status"] == "False"
        assert 'get and create on serviceaccounts (API group "")' in ready["message"], ready["message"]
        kube.wait_event("tickets", "TrainerAccessFailed")
        assert kube.list("Job", {"tailor.dev/dataset": "tickets"}) == []
        assert kube.get("ServiceAccount", "tailor-trainer") is None
        bind(rules)  # an administrator grants the permission
        wait_until(lambda: kube.list("Job", {"tailor.dev/dataset": "tickets"}), 40, what="validation Job after the fix",
                   on_timeout=operator.log_tail)
        assert kube.get("ServiceAccount", "tailor-trainer") is not None
        assert kube.condition("Dataset", "tickets", "Validating")["reason"] == "Validating"
        assert kube.condition("Dataset", "tickets", "Ready")["status"] == "Unknown"
        assert kube.event_reasons("tickets").count("TrainerAccessFailed") == 1  # once per transition
    finally:
        operator.stop()
        cp.kubectl("delete", "clusterrolebinding,clusterrole", name, "--ignore-not-found")


def test_operator_runs_namespaced_with_exactly_the_charts_roles(control_plane, k8s_client, namespace,
                                                                tmp_path) -> None:
    """watchNamespaces={ns}: Roles in that namespace only (and CRD discovery). The operator, as the
    chart's ServiceAccount watching that namespace, validates, starts a RayJob with its
    NetworkPolicy, creates the trainer's account and cleans up on deletion; it can write nothing
    in another namespace or in kube-system, and read no Secret anywhere."""
    cp = control_plane
    _install(cp, "--set", f"watchNamespaces={{{namespace}}}")
    cp.stop_kuberay()
    kube = Kube(k8s_client, namespace)
    operator = OperatorProcess(cp.kubeconfigs["tailor"], tmp_path / "op", namespaces=[namespace],
                               env={"TAILOR_TRAINER_SERVICE_ACCOUNT": "tailor-trainer"}).start()
    try:
        kube.apply(dataset_manifest("tickets"))
        wait_until(lambda: kube.list("Job", {"tailor.dev/dataset": "tickets"}), 30, what="validation Job",
                   on_timeout=operator.log_tail)
        assert kube.get("Role", "tailor-trainer") is not None  # created by the operator, in its namespace
        kube.publish_validation("tickets", ready_result())
        wait_until(lambda: kube.condition("Dataset", "tickets", "Ready").get("status") == "True", 30,
                   what="Ready", on_timeout=operator.log_tail)
        kube.apply(job_manifest("scoped"))
        wait_until(lambda: kube.get("RayJob", "scoped-r1"), 30, what="RayJob", on_timeout=operator.log_tail)
        assert kube.get("NetworkPolicy", "scoped-r1") is not None
        kube.set_rayjob_status("scoped-r1", "Running", "RUNNING")
        wait_until(lambda: kube.status("FineTuneJob", "scoped").get("phase") == "Running", 30, what="Running",
                   on_timeout=operator.log_tail)
        kube.delete("FineTuneJob", "scoped")
        wait_until(lambda: kube.get("FineTuneJob", "scoped") is None and kube.get("RayJob", "scoped-r1") is None
                   and kube.get("NetworkPolicy", "scoped-r1") is None, 60, what="children garbage-collected",
                   on_timeout=operator.log_tail)
        assert "Forbidden" not in Path(operator.log_path).read_text()
        sa = f"system:serviceaccount:{RELEASE_NS}:tailor"
        checks = [("create", "configmaps", "default", "no"), ("create", "rayjobs.ray.io", "default", "no"),
                  ("delete", "jobs.batch", "kube-system", "no"), ("create", "configmaps", "kube-system", "no"),
                  ("update", "finetunejobs.tailor.dev", "default", "no"), ("get", "secrets", namespace, "no"),
                  ("create", "configmaps", namespace, "yes")]
        for verb, resource, ns, expected in checks:
            r = cp.kubectl("auth", "can-i", verb, resource, "-n", ns, "--as", sa)
            assert r.stdout.strip() == expected, (verb, resource, ns, r.stdout, r.stderr)
    finally:
        operator.stop()
        cp.helm("uninstall", "tailor", "-n", RELEASE_NS, "--wait", "--timeout", "60s")
