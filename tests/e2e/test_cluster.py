"""On a real node: the chart installed from the operator image built from the Dockerfile, and the
cluster example (examples/cluster/) applied as its README says, in a namespace that enforces the
`restricted` Pod Security Standard. The Dataset is validated by a Job pod, KubeRay turns Tailor's
RayJob into a head and 2 worker pods of the trainer image, the pipeline trains with DDP over gloo
across the two worker pods and evaluates, and everything lands on the PVC.

Then faults with real pods: a deleted Ray head, a deleted worker, a deleted FineTuneJob.
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from node_fixtures import OPERATOR_NAMESPACE, REPO, NodeCluster, pod_logs
from operator_fixtures import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.node, pytest.mark.slow]

EXAMPLE = REPO / "examples" / "cluster"
NS = "tailor-demo"
PVC = "tailor-files"
TRAINER_UID = 1000
RUN_LABEL = "tailor.dev/run"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def apply(cluster: NodeCluster, objs: list[dict], ns: str = NS) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(objs), check=True)


def status(cluster: NodeCluster, kind: str, name: str, ns: str = NS) -> dict:
    return (cluster.get_json(kind, name, "-n", ns) or {}).get("status") or {}


def condition(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions", []) if c.get("type") == type_), {})


def run_pods(cluster: NodeCluster, run: str, ns: str = NS) -> list[dict]:
    return cluster.pods(ns, f"{RUN_LABEL}={run}")


def role(pod: dict) -> str:
    labels = pod["metadata"].get("labels", {})
    if labels.get("ray.io/node-type") == "head":
        return "head"
    if labels.get("ray.io/node-type") == "worker":
        return "worker"
    return "submitter" if "job-name" in labels or "batch.kubernetes.io/job-name" in labels else "other"


def describe(cluster: NodeCluster, ns: str = NS) -> str:
    out = cluster.kubectl("get", "ftj,tds,rayjob,raycluster,pods,jobs", "-n", ns, "-o", "wide").stdout
    events = cluster.kubectl("get", "events", "-n", ns, "--sort-by=.lastTimestamp").stdout
    return f"{out}\n{events[-6000:]}\n{pod_logs(cluster, ns, 30)[-12000:]}"


@pytest.fixture(scope="module")
def demo(tailor_release: NodeCluster) -> NodeCluster:
    """Namespace, PVC and files exactly as examples/cluster/README.md steps 2-3 say; the PVC is
    bound to a hostPath PV on the node (this cluster has no storage provisioner)."""
    cluster = tailor_release
    cluster.kubectl("create", "namespace", NS, check=True)
    cluster.kubectl("label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/warn=restricted", check=True)
    pv_dir = cluster.dir / "pv" / PVC
    pv_dir.mkdir(parents=True)
    os.chown(pv_dir, TRAINER_UID, TRAINER_UID)
    apply(cluster, [{
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{NS}-{PVC}"},
        "spec": {"capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                 "hostPath": {"path": str(pv_dir), "type": "Directory"},
                 "claimRef": {"namespace": NS, "name": PVC}}}])
    storage = docs(EXAMPLE / "storage.yaml")
    taint = cluster.node["taint"]
    for obj in storage:
        if obj["kind"] == "Pod":
            # what a user of this cluster changes: the image they built, and the node's taint
            for c in obj["spec"]["containers"]:
                c["image"], c["imagePullPolicy"] = cluster.images["trainer"], "Never"
            obj["spec"]["tolerations"] = [{"key": taint["key"], "operator": "Exists", "effect": taint["effect"]}]
    apply(cluster, storage)
    cluster.kubectl("wait", "-n", NS, "--for=condition=Ready", "pod/tailor-upload", "--timeout=300s",
                    check=True, timeout=320)
    root = "/mnt/pvc/tailor-files"
    cluster.kubectl("exec", "-n", NS, "tailor-upload", "--", "mkdir", "-p", f"{root}/models", f"{root}/data",
                    check=True)
    cluster.kubectl("cp", str(REPO / "examples/models/tailor-tiny-llama"),
                    f"{NS}/tailor-upload:{root}/models/tailor-tiny-llama", check=True)
    cluster.kubectl("cp", str(REPO / "examples/data/support-instructions.jsonl"),
                    f"{NS}/tailor-upload:{root}/data/support-instructions.jsonl", check=True)
    listing = cluster.kubectl("exec", "-n", NS, "tailor-upload", "--", "ls", "-R", root, check=True).stdout
    assert "model.safetensors" in listing and "support-instructions.jsonl" in listing, listing
    cluster.kubectl("delete", "pod", "-n", NS, "tailor-upload", "--wait=false", check=True)
    cluster.pv_dir = pv_dir
    return cluster


def test_operator_runs_from_its_image(tailor_release: NodeCluster) -> None:
    cluster = tailor_release
    pods = cluster.pods(OPERATOR_NAMESPACE, "app.kubernetes.io/name=tailor")
    assert len(pods) == 1, pods
    pod = pods[0]
    assert pod["spec"]["containers"][0]["image"] == cluster.images["operator"]
    assert pod["spec"]["nodeName"] == cluster.node["name"]
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", pod["status"]
    # /metrics through the API server's pod proxy: the operator's own series are there
    name = pod["metadata"]["name"]
    metrics = cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/pods/{name}:8080/proxy/metrics",
                              check=True).stdout
    assert re.search(r"^tailor_\w+", metrics, re.M), metrics[:2000]
    # the chart's own `helm test`: a pod of the operator image, under the operator's security
    # settings, gets /healthz through the health Service and finds both CRDs Established
    r = cluster.helm("test", "tailor", "-n", OPERATOR_NAMESPACE, "--timeout", "3m", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr + pod_logs(cluster, OPERATOR_NAMESPACE)
    assert re.search(r"TEST SUITE:\s+tailor-test\s.*Phase:\s+Succeeded", r.stdout, re.S), r.stdout


def test_cluster_example_trains_end_to_end(demo: NodeCluster) -> None:
    cluster = demo
    t0 = time.monotonic()
    apply(cluster, docs(EXAMPLE / "finetune.yaml"))
    # the Dataset is validated by a Job pod that runs the trainer image
    wait_until(lambda: condition(status(cluster, "tds", "support"), "Ready").get("status") == "True", 600,
               interval=2, what="Dataset Ready", on_timeout=lambda: describe(cluster))
    t_valid = time.monotonic() - t0
    ds = status(cluster, "tds", "support")
    assert ds["rows"] > 0 and ds["splits"]["train"] > 0, ds
    # (the pod publishes its result, then exits: Ready can come a moment before the pod ends)
    validators = wait_until(lambda: [p for p in cluster.pods(NS, "tailor.dev/dataset=support")
                                     if p["status"].get("phase") == "Succeeded"], 60, interval=1,
                            what="the validation pod Succeeded", on_timeout=lambda: describe(cluster))
    assert validators[0]["spec"]["containers"][0]["image"] == cluster.images["trainer"]
    run = "tiny-support-r1"
    seen_get: list[str] = []
    seen_pods: dict[str, dict] = {}
    phase = ""
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        phase = status(cluster, "ftj", "tiny-support").get("phase", "")
        seen_get.append(cluster.kubectl("get", "ftj", "-n", NS).stdout)
        for pod in run_pods(cluster, run):
            seen_pods.setdefault(pod["metadata"]["name"], pod)
            if pod["status"].get("phase") in ("Running", "Succeeded"):
                seen_pods[pod["metadata"]["name"]] = pod
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(2)
    elapsed = time.monotonic() - t0
    st = status(cluster, "ftj", "tiny-support")
    assert phase == "Succeeded", f"phase {phase!r} after {elapsed:.0f}s: {json.dumps(st, indent=1)}\n{describe(cluster)}"
    print(f"\n[node] Dataset Ready after {t_valid:.0f}s, FineTuneJob Succeeded after {elapsed:.0f}s")
    # `kubectl get ftj` showed the run's progress while it trained
    running = [line for out in seen_get for line in out.splitlines()[1:] if "Running" in line]
    assert any(re.search(r"\b([1-9]\d?)%", line) for line in running), "\n".join(seen_get[-20:])
    # head + 2 workers of the trainer image; the workers got to the tainted pool node only through
    # the job's nodeSelector and tolerations
    roles = {}
    for pod in seen_pods.values():
        roles.setdefault(role(pod), []).append(pod)
    seen = {k: sorted(p["metadata"]["name"] for p in v) for k, v in roles.items()}
    assert len(roles.get("head", [])) == 1 and len(roles.get("worker", [])) == 2, \
        f"{seen}\nstatus {json.dumps(st, indent=1)}\n{describe(cluster)}"
    for pod in roles["worker"]:
        spec = pod["spec"]
        assert spec["nodeName"] == cluster.node["name"]
        assert spec["nodeSelector"] == {"tailor.dev/pool": "train"}
        assert any(t.get("key") == "tailor.dev/pool" for t in spec.get("tolerations", []))
        assert spec["containers"][0]["image"] == cluster.images["trainer"]
    # metrics and artifacts in status; the files on the PVC
    assert st["metrics"]["loss"] > 0 and st["metrics"]["perplexity"] > 1, st["metrics"]
    where = run_dir(cluster, "tiny-support", run)
    assert st["artifacts"]["model"] == f"pvc://{PVC}/{where.relative_to(cluster.pv_dir)}/train/model", st["artifacts"]
    result = json.loads((where / "evaluate" / "result.json").read_text())
    train = json.loads((where / "train" / "manifest.json").read_text())
    assert (where / "train" / "model" / "adapter_config.json").is_file(), sorted(os.listdir(where / "train"))
    assert (where / "evaluate" / "report.html").is_file()
    # DDP over gloo across the two worker pods: rank 0 saw a process group of world size 2
    assert train["mode"] == "workers" and train["workers"] == 2 and train["worldSize"] == 2, train
    assert result["metrics"]["loss"] == pytest.approx(st["metrics"]["loss"], rel=1e-6)
    # the run's pods were selected by its NetworkPolicy (this node's bridge CNI does not enforce
    # policies: this shows creation and selection, not enforcement)
    policy = cluster.get_json("networkpolicy", run, "-n", NS)
    assert policy and policy["spec"]["podSelector"] == {"matchLabels": {RUN_LABEL: run}}, policy
    # once the RayJob's TTL has passed, nothing of the run is left running
    wait_until(lambda: not [p for p in run_pods(cluster, run) if p["status"].get("phase") not in ("Succeeded", "Failed")],
               120, interval=2, what="the run's pods gone", on_timeout=lambda: describe(cluster))


# ------------------------------------------------------------------------------------- faults

def example_dataset() -> dict:
    """The example's Dataset (applied again by each fault test, so each also runs on its own)."""
    return next(d for d in docs(EXAMPLE / "finetune.yaml") if d["kind"] == "Dataset")


def fault_job(name: str, max_steps: int, every: int) -> dict:
    """The example's FineTuneJob, training longer with frequent checkpoints, with retries."""
    ftj = copy.deepcopy(next(d for d in docs(EXAMPLE / "finetune.yaml") if d["kind"] == "FineTuneJob"))
    ftj["metadata"] = {"name": name}
    ftj["spec"]["hyperparameters"].update(maxSteps=max_steps, checkpointEverySteps=every, evalEverySteps=every)
    ftj["spec"]["evaluation"] = {"metrics": ["loss"], "maxEvalRows": 20}
    ftj["spec"]["backoffLimit"] = 2
    # a hang (a collective waiting for a rank that is gone) becomes a retried attempt within minutes
    ftj["spec"]["progressDeadlineSeconds"] = 240
    return ftj


def run_dir(cluster: NodeCluster, job: str, run: str) -> Path:
    """`<output>/<namespace>/<job>-<uid[:8]>/<run>` on the PVC (builders/trainer_config.py)."""
    uid = (cluster.get_json("ftj", job, "-n", NS) or {}).get("metadata", {}).get("uid", "")
    return cluster.pv_dir / "runs" / NS / f"{job}-{uid.replace('-', '')[:8]}" / run


def checkpoints(cluster: NodeCluster, job: str, run: str) -> list[int]:
    root = run_dir(cluster, job, run) / "train" / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "manifest.json").is_file())


def progress(cluster: NodeCluster, run: str) -> dict:
    data = (cluster.get_json("configmap", f"{run}-progress", "-n", NS) or {}).get("data") or {}
    return json.loads(data["progress.json"]) if data.get("progress.json") else {}


def running_pod(cluster: NodeCluster, run: str, kind: str) -> dict:
    return wait_until(lambda: next((p for p in run_pods(cluster, run) if role(p) == kind
                                    and p["status"].get("phase") == "Running"
                                    and not p["metadata"].get("deletionTimestamp")), None),
                      60, interval=1, what=f"a running {kind} pod of {run}")


def test_a_deleted_worker_pod_resumes_from_the_last_checkpoint(demo: NodeCluster) -> None:
    cluster, name, run = demo, "fault-worker", "fault-worker-r1"
    apply(cluster, [example_dataset(), fault_job(name, max_steps=300, every=20)])
    first = wait_until(lambda: checkpoints(cluster, name, run), 900, interval=1, what="a first checkpoint",
                       on_timeout=lambda: describe(cluster))[-1]
    victim = running_pod(cluster, run, "worker")["metadata"]["name"]
    # no grace period: the worker is gone at once, as when its node fails (with the pods' 10 s grace
    # a short run could finish before the worker stopped)
    cluster.kubectl("delete", "pod", "-n", NS, victim, "--grace-period=0", "--force", "--wait=false", check=True)
    st = wait_until(lambda: (s := status(cluster, "ftj", name)).get("phase") in ("Succeeded", "Failed") and s,
                    1200, interval=3, what="the job to finish", on_timeout=lambda: describe(cluster))
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    train = json.loads((run_dir(cluster, name, run) / "train" / "manifest.json").read_text())
    # the step count continued from a checkpoint at or after the one that existed at the fault
    assert train["resumedFrom"] is not None and train["resumedFrom"] >= first, train
    print(f"\n[node] worker {victim} deleted after checkpoint {first}: resumed from step {train['resumedFrom']}, "
          f"attempts {st.get('attempts')}")


def test_a_deleted_head_pod_never_leaves_the_job_running(demo: NodeCluster) -> None:
    """Then, while the retry trains, delete the FineTuneJob: every pod of it goes within 30 s."""
    cluster, name, run = demo, "fault-head", "fault-head-r1"
    apply(cluster, [example_dataset(), fault_job(name, max_steps=1000, every=20)])
    first = wait_until(lambda: checkpoints(cluster, name, run), 900, interval=1, what="a first checkpoint",
                       on_timeout=lambda: describe(cluster))[-1]
    head = running_pod(cluster, run, "head")["metadata"]["name"]
    cluster.kubectl("delete", "pod", "-n", NS, head, "--wait=false", check=True)
    t0 = time.monotonic()
    left = wait_until(lambda: (s := status(cluster, "ftj", name)).get("phase") != "Running" and s, 60, interval=1,
                      what="the job to leave Running", on_timeout=lambda: describe(cluster))
    print(f"\n[node] head {head} deleted after checkpoint {first}: phase {left.get('phase')} after "
          f"{time.monotonic() - t0:.0f}s, reason {(left.get('error') or {}).get('reason')}")
    # ... and then either retries from the last checkpoint or fails with a named reason
    def retried_or_failed():
        s = status(cluster, "ftj", name)
        if s.get("phase") == "Failed":
            return s
        doc = progress(cluster, run)
        return s.get("phase") == "Running" and doc.get("attempt", 0) >= 2 and doc.get("stage") == "train" \
            and (doc.get("step") or 0) > first and s
    st = wait_until(retried_or_failed,
                    900, interval=2, what="a retry that trains again, or a named failure",
                    on_timeout=lambda: describe(cluster))
    if st["phase"] == "Failed":
        assert st["error"]["reason"] and st["error"]["message"], st
        return
    doc = progress(cluster, run)
    assert doc.get("attempt", 2) >= 2 and (doc.get("step") or 0) > first, doc
    # delete the FineTuneJob mid-training: the object goes at once (no finalizer on a kuberay job),
    # and the garbage collector and KubeRay remove every pod of the run within 30 s
    cluster.kubectl("delete", "ftj", name, "-n", NS, "--wait=false", check=True)
    t1 = time.monotonic()
    wait_until(lambda: not cluster.pods(NS, f"tailor.dev/finetunejob={name}"), 30, interval=0.5,
               what="every pod of the job gone", on_timeout=lambda: describe(cluster))
    gone = time.monotonic() - t1
    wait_until(lambda: cluster.get_json("ftj", name, "-n", NS) is None, 30, interval=0.5,
               what="the FineTuneJob gone")
    print(f"[node] FineTuneJob deleted mid-training: pods gone after {gone:.1f}s")


def test_a_missing_secret_is_named_within_60s_and_fixed_by_creating_it(demo: NodeCluster) -> None:
    """A Dataset and a FineTuneJob whose secretRef names a Secret that does not exist: the real
    kubelet holds their pods in CreateContainerConfigError. Within 60 s the Dataset says
    CredentialsError (never a bare Validating) and the job, whose CPU model check cannot start,
    says CredentialsError too and never gets a RayJob (no GPU asked for); creating the Secret
    lets the Dataset's validation finish."""
    cluster, secret = demo, "tailor-missing-creds"
    ds = example_dataset()
    ds["metadata"] = {"name": "needs-secret"}
    ds["spec"]["source"]["secretRef"] = {"name": secret}
    ftj = fault_job("needs-secret", max_steps=20, every=10)
    ftj["spec"]["baseModel"]["secretRef"] = {"name": secret}
    ftj["spec"]["datasetRef"] = {"name": example_dataset()["metadata"]["name"]}  # the example's, Ready
    t0 = time.monotonic()
    apply(cluster, [ds, ftj])
    try:
        ready = wait_until(lambda: (c := condition(status(cluster, "tds", "needs-secret"), "Ready"))
                           .get("reason") == "CredentialsError" and c, 60, interval=1,
                           what="Dataset Ready=False CredentialsError", on_timeout=lambda: describe(cluster))
        t_ds = time.monotonic() - t0
        assert ready["status"] == "False" and f'secret "{secret}" not found' in ready["message"], ready
        assert "spec.source.secretRef" in ready["message"], ready
        err = wait_until(lambda: ((s := status(cluster, "ftj", "needs-secret")).get("error") or {})
                         .get("reason") == "CredentialsError" and s, 60, interval=1,
                         what="FineTuneJob error CredentialsError", on_timeout=lambda: describe(cluster))
        t_job = time.monotonic() - t0
        assert "spec.baseModel.secretRef" in err["error"]["message"], err
        assert condition(err, "ModelChecked").get("reason") == "CredentialsError", err
        assert err["phase"] == "Pending", err
        assert cluster.get_json("rayjob", "needs-secret-r1", "-n", NS) is None, "a RayJob before the model check"
        print(f"\n[node] missing Secret: Dataset CredentialsError after {t_ds:.0f}s, FineTuneJob after {t_job:.0f}s")
        cluster.kubectl("delete", "ftj", "needs-secret", "-n", NS, "--wait=false", check=True)
        # the fix is only to create the Secret: the kubelet retries and the validation finishes
        cluster.kubectl("create", "secret", "generic", secret, "-n", NS, "--from-literal=UNUSED=1", check=True)
        wait_until(lambda: condition(status(cluster, "tds", "needs-secret"), "Ready").get("status") == "True", 300,
                   interval=2, what="Dataset Ready after the Secret was created", on_timeout=lambda: describe(cluster))
    finally:
        cluster.kubectl("delete", "ftj,tds", "needs-secret", "-n", NS, "--ignore-not-found", "--wait=false")
        cluster.kubectl("delete", "secret", secret, "-n", NS, "--ignore-not-found")


def test_a_lost_submitter_pod_never_yields_a_second_ray_job(demo: NodeCluster) -> None:
    """KubeRay's submitter (K8sJobMode) only submits the Ray job and follows its logs. Its pod
    deleted mid-training: the Job controller starts another, which finds the submission id already
    known (`ray job status` first) and follows the same job. Exactly one Ray job, one attempt."""
    cluster, name, run = demo, "lost-submitter", "lost-submitter-r1"
    apply(cluster, [example_dataset(), fault_job(name, max_steps=200, every=50)])
    wait_until(lambda: progress(cluster, run).get("stage") == "train", 900, interval=1, what="stage train",
               on_timeout=lambda: describe(cluster))
    selector = f"batch.kubernetes.io/job-name={run}"
    submitter = wait_until(lambda: next((p for p in cluster.pods(NS, selector)
                                         if p["status"].get("phase") == "Running"), None), 60, interval=1,
                           what="the running submitter pod", on_timeout=lambda: describe(cluster))
    cluster.kubectl("delete", "pod", "-n", NS, submitter["metadata"]["name"], "--grace-period=0", "--force",
                    "--wait=false", check=True)
    # the replacement follows the same job; the Ray head knows exactly one
    wait_until(lambda: any(p["metadata"]["name"] != submitter["metadata"]["name"] for p in cluster.pods(NS, selector)),
               60, interval=1, what="a replacement submitter pod", on_timeout=lambda: describe(cluster))
    head = running_pod(cluster, run, "head")["metadata"]["name"]
    jobs = cluster.kubectl("exec", "-n", NS, head, "--", "ray", "job", "list", "--address", "http://127.0.0.1:8265",
                           timeout=120).stdout
    st = wait_until(lambda: (s := status(cluster, "ftj", name)).get("phase") in ("Succeeded", "Failed") and s,
                    900, interval=3, what="the job to finish", on_timeout=lambda: describe(cluster))
    assert st["phase"] == "Succeeded" and st.get("attempts", 1) == 1, json.dumps(st, indent=1)
    assert jobs.count("submission_id=") == 1, jobs
    print(f"\n[node] submitter {submitter['metadata']['name']} deleted in train: one Ray job, attempt 1, Succeeded")
