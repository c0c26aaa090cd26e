"""Every pod Tailor makes passes the `restricted` Pod Security Standard (checked here by rule).

The rules are those of https://kubernetes.io/docs/concepts/security/pod-security-standards/
(baseline + restricted, v1.latest), written out below so a failure names the rule. The real
admission plugin checks the same pods in tests/integration/test_control_plane.py (a namespace
labelled `pod-security.kubernetes.io/enforce: restricted`) and on a real node in tests/e2e.
Also covered: the pod in examples/cluster/storage.yaml, the imagePullPolicy installation option
and the submitter pod template that replaces KubeRay's default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tailor_operator.api.v1alpha1 import Dataset
from tailor_operator.builders.inspect_job import InspectJobOptions, build_inspect_job
from tailor_operator.reconcile.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The restricted-profile rules a pod spec breaks (empty: it is admitted)."""
    bad: list[str] = []
    psc = pod.get("securityContext") or {}
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or []),
                  *(pod.get("ephemeralContainers") or [])]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(f"{key}: true")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            bad.append(f"volume {volume['name']}: type {sorted(kinds - ALLOWED_VOLUMES)} not allowed")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl.get('name')}")

    def seccomp(sc: dict[str, Any]) -> Any:
        return (sc.get("seccompProfile") or {}).get("type")

    def common(where: str, sc: dict[str, Any]) -> None:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{where}: windowsOptions.hostProcess")
        se = sc.get("seLinuxOptions") or {}
        if se.get("type") not in SELINUX_TYPES or se.get("user") or se.get("role"):
            bad.append(f"{where}: seLinuxOptions {se}")
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            bad.append(f"{where}: appArmorProfile")
        if seccomp(sc) not in (None, "RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile {seccomp(sc)}")
        if sc.get("runAsUser") == 0:
            bad.append(f"{where}: runAsUser 0")
        if sc.get("runAsNonRoot") is False:
            bad.append(f"{where}: runAsNonRoot false")

    common("pod", psc)
    for c in containers:
        where = f"container {c['name']}"
        sc = c.get("securityContext") or {}
        common(where, sc)
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("procMount") not in (None, "Default"):
            bad.append(f"{where}: procMount {sc.get('procMount')}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad.append(f"{where}: hostPort")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: capabilities.add {caps.get('add')}")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and "runAsNonRoot" not in sc)):
            bad.append(f"{where}: runAsNonRoot must be true (pod or container)")
        if seccomp(sc) is None and seccomp(psc) is None:
            bad.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost (pod or container)")
    return bad


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(what, pod spec) of every pod an object makes: a RayJob's head, workers and submitter; a
    Job's pod; a Pod itself."""
    if obj["kind"] == "RayJob":
        spec = obj["spec"]
        cluster = spec["rayClusterSpec"]
        pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
        pods += [(f"workers {g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
        pods.append(("submitter", spec["submitterPodTemplate"]["spec"]))
        return pods
    if obj["kind"] == "Job":
        return [("job", obj["spec"]["template"]["spec"])]
    if obj["kind"] == "Pod":
        return [("pod", obj["spec"])]
    return []


def _built_objects() -> list[tuple[str, dict[str, Any]]]:
    from test_builders import run_children

    out = []
    for case in sorted(DATA.glob("rayjob-*/input.yaml")):
        out += [(case.parent.name, o) for o in run_children(yaml.safe_load(case.read_text()))]
    for case in sorted(DATA.glob("inspect-*/input.yaml")):
        doc = yaml.safe_load(case.read_text())
        dataset = Dataset.model_validate(doc["dataset"])
        options = InspectJobOptions(**(doc.get("options") or {}))
        out.append((case.parent.name, build_inspect_job(dataset, "v-key", options)))
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        out += [(str(path.relative_to(ROOT)), d) for d in yaml.safe_load_all(path.read_text()) if d]
    return [(f"{name}:{what}", pod) for name, obj in out for what, pod in pod_templates(obj)]


PODS = _built_objects()


def test_every_kind_of_pod_is_covered() -> None:
    whats = {name.rsplit(":", 1)[1] for name, _ in PODS}
    assert {"head", "workers workers", "submitter", "job", "pod"} <= whats


@pytest.mark.parametrize("name,pod", PODS, ids=[n for n, _ in PODS])
def test_pod_passes_the_restricted_profile(name: str, pod: dict[str, Any]) -> None:
    assert restricted_violations(pod) == []
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == 1000  # the trainer image's user


def test_the_rule_check_catches_what_admission_refuses() -> None:
    pod = {"securityContext": {}, "hostNetwork": True,
           "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"privileged": True}}]}
    found = " | ".join(restricted_violations(pod))
    for rule in ("hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "drop ALL", "runAsNonRoot",
                 "seccompProfile"):
        assert rule in found, rule


def _rayjob(**options: Any) -> dict[str, Any]:
    from test_builders import run_children

    doc = yaml.safe_load((DATA / "rayjob-gpu-workers" / "input.yaml").read_text())
    doc["options"] = {**doc["options"], **options}
    return run_children(doc)[-1]


def test_submitter_pod_replaces_kuberays_default() -> None:
    """KubeRay's default submitter has no securityContext and requests 500m CPU; ours leaves the
    command empty so that KubeRay writes its `ray job submit` line (configureSubmitterContainer)."""
    rayjob = _rayjob()
    template = rayjob["spec"]["submitterPodTemplate"]
    pod = template["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "tailor-trainer"
    (container,) = pod["containers"]
    assert container["name"] == "ray-job-submitter"
    assert "command" not in container and "args" not in container
    assert container["image"] == rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert template["metadata"]["labels"]["tailor.dev/run"] == rayjob["metadata"]["name"]


@pytest.mark.parametrize("policy", ["Always", "IfNotPresent", "Never"])
def test_image_pull_policy_is_set_on_every_trainer_container(policy: str) -> None:
    settings = OperatorSettings(trainer_image_pull_policy=policy)
    assert settings.rayjob_options().image_pull_policy == policy
    rayjob = _rayjob(image_pull_policy=policy)
    containers = [c for _, pod in pod_templates(rayjob) for c in pod["containers"]]
    assert len(containers) == 3 and {c["imagePullPolicy"] for c in containers} == {policy}
    dataset = Dataset.model_validate({"apiVersion": "tailor.dev/v1alpha1", "kind": "Dataset",
                                      "metadata": {"name": "d", "namespace": "ns"},
                                      "spec": {"source": {"uri": "s3://b/d.jsonl"}}})
    job = build_inspect_job(dataset, "d-v1", settings.inspect_options())
    assert job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == policy


def test_unknown_pull_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="IfNotPresent"):
        OperatorSettings(trainer_image_pull_policy="Sometimes")


def test_validation_resources_come_from_the_settings() -> None:
    options = OperatorSettings(validation_cpu="250m", validation_memory="1Gi").inspect_options()
    assert (options.cpu, options.memory) == ("250m", "1Gi")


def test_cpu_pool_places_head_submitter_and_validation_but_not_workers() -> None:
    """The installation's CPU pool (chart trainer.cpuPool) takes the CPU-only pods; the workers
    keep the job's own placement (the GPU pool)."""
    pool_tol = [{"key": "pool", "operator": "Equal", "value": "cpu", "effect": "NoSchedule"}]
    settings = OperatorSettings(cpu_pool_node_selector='{"pool": "cpu"}', cpu_pool_tolerations=json.dumps(pool_tol))
    options = settings.rayjob_options()
    rayjob = _rayjob(cpu_pool_node_selector=options.cpu_pool_node_selector,
                     cpu_pool_tolerations=options.cpu_pool_tolerations)
    pods = dict(pod_templates(rayjob))
    spec = rayjob["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    submitter = spec["submitterPodTemplate"]["spec"]
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert len(pods) == 3
    for pod in (head, submitter):
        assert pod["nodeSelector"] == {"pool": "cpu"} and pod["tolerations"] == pool_tol
    assert worker["nodeSelector"] != {"pool": "cpu"} and pool_tol[0] not in worker.get("tolerations", [])
    dataset = Dataset.model_validate({"apiVersion": "tailor.dev/v1alpha1", "kind": "Dataset",
                                      "metadata": {"name": "d", "namespace": "ns"},
                                      "spec": {"source": {"uri": "s3://b/d.jsonl"}}})
    validation = build_inspect_job(dataset, "d-v1", settings.inspect_options())["spec"]["template"]["spec"]
    assert validation["nodeSelector"] == {"pool": "cpu"} and validation["tolerations"] == pool_tol
    # no pool: no placement at all (the defaults of every existing installation)
    plain = _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "nodeSelector" not in plain and "tolerations" not in plain


@pytest.mark.parametrize("field,value", [("cpu_pool_node_selector", "[1]"), ("cpu_pool_tolerations", '{"a": 1}'),
                                         ("cpu_pool_tolerations", "not json")])
def test_a_malformed_cpu_pool_is_refused_at_start(field: str, value: str) -> None:
    with pytest.raises(ValueError):
        OperatorSettings(**{field: value})
