"""Fixtures for tests against a real control plane (etcd + kube-apiserver + kube-controller-manager).

One control plane per pytest session (per worker under pytest-xdist: `make test` runs two), started
with `scripts/testenv up` in a per-session state dir; a fresh namespace per test. The binaries are
built once by `scripts/testenv build`; if they are missing, every test that needs the control plane
FAILS (it is never skipped).
See docs/testenv.md.
"""
from __future__ import annotations

import os
import re
import secrets
import subprocess
from pathlib import Path

import pytest

from operator_fixtures import AUDIT_POLICY, TESTENV, ControlPlane

REPO = Path(__file__).resolve().parents[2]

_ACTIVE: dict = {}  # the session's ControlPlane, for the failure hook


def _bin_dir() -> Path:
    r = subprocess.run([str(TESTENV), "env"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"`scripts/testenv env` failed: {r.stderr}", pytrace=False)
    return Path(r.stdout.strip())


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> ControlPlane:
    """A running control plane for the whole session (admin kubeconfig also exported as KUBECONFIG)."""
    bin_dir = _bin_dir()
    needed = ["etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm", "ray-operator"]
    missing = [b for b in needed if not (bin_dir / b).is_file()]
    if missing:
        pytest.fail(f"test control plane binaries are not built ({', '.join(missing)} missing in {bin_dir}). "
                    f"Run `scripts/testenv build` (about 12 min cold on 2 quiet cores, under a second when cached).", pytrace=False)
    cp = ControlPlane.up(tmp_path_factory.mktemp("testenv"), bin_dir)
    env = cp.env
    # real kubectl/helm for the code under test, too
    saved = {k: os.environ.get(k) for k in ("PATH", "KUBECONFIG")}
    os.environ["PATH"], os.environ["KUBECONFIG"] = env["PATH"], env["KUBECONFIG"]
    _ACTIVE["cp"] = cp
    try:
        yield cp
    finally:
        _ACTIVE.pop("cp", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run([str(TESTENV), "down", "--dir", str(cp.dir)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def k8s_client(control_plane):
    """A `kubernetes.client.ApiClient` for the admin identity."""
    client = control_plane.api_client("admin")
    yield client
    client.close()


@pytest.fixture
def kuberay_operator(control_plane):
    """The real KubeRay operator (ray-operator) running against the control plane: started for
    each test that asks for it (`kuberay-up` is a no-op when it runs), since modules that play
    KubeRay themselves stop it (a session-wide fixture went on yielding a stopped operator)."""
    control_plane.start_kuberay()
    yield control_plane


@pytest.fixture
def own_control_plane(tmp_path_factory, request):
    """A control plane for one test (the session's one is shared and must not be stopped or
    throttled). Indirect parameter, a tuple of extra kube-apiserver flags (may be empty): with it,
    the API server also writes an audit log of the operator identity's writes to `cp.audit_log`
    (operator_fixtures.writes_since)."""
    param = getattr(request, "param", None)
    state = tmp_path_factory.mktemp("own-testenv")
    audit = tmp_path_factory.mktemp("audit")
    extra = []
    if param is not None:
        (audit / "policy.yaml").write_text(AUDIT_POLICY)
        apiserver_args = [*param, f"--audit-policy-file={audit / 'policy.yaml'}",
                          f"--audit-log-path={audit / 'audit.log'}", "--audit-log-mode=blocking"]
        extra = [f"--apiserver-arg={a}" for a in apiserver_args]
    cp = ControlPlane.up(state, _bin_dir(), *extra)
    cp.audit_log = audit / "audit.log"
    try:
        yield cp
    finally:
        subprocess.run([str(TESTENV), "down", "--dir", str(cp.dir)], capture_output=True, text=True, timeout=120)


def _ns_name(nodeid: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", nodeid.split("::")[-1].lower()).strip("-")[:40].strip("-")
    return f"{base or 't'}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(request, k8s_client) -> str:
    """A fresh namespace for one test; deleted afterwards (the namespace controller finishes it)."""
    from kubernetes import client

    core = client.CoreV1Api(k8s_client)
    name = _ns_name(request.node.nodeid)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"tailor.dev/test": "true"})))
    yield name
    try:
        core.delete_namespace(name)
    except client.ApiException as e:
        if e.status != 404:
            raise


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cp = _ACTIVE.get("cp")
    if report.failed and cp is not None and "control_plane" in getattr(item, "fixturenames", ()):
        report.sections.append(("control plane logs", cp.log_tails()))
