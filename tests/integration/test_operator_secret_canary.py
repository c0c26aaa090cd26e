"""The secret canary through the real API server (issue 11).

A Secret holds a fresh random value. Datasets point at files whose content is that value — a file
laid out like a mounted Secret (`format: csv`: the value becomes the "header"), JSONL whose keys
are the value, broken JSON around it, a Parquet column named by it — and the operator validates
them on the local backend (a real `python -m tailor_trainer inspect` subprocess, the same command
the validation pod runs). Each Dataset must end not Ready with its expected reason; then every
place a namespace user or a dashboard can read is searched: the Dataset objects (status and
conditions), the namespace's Events and ConfigMaps, the operator's log, its /metrics, and every
file the operator and its trainer subprocesses wrote. The value appears nowhere.

The trainer-level canary (tests/unit/test_secret_canary.py) covers 16 failure paths x 2 token
shapes, a prep run and the progress document; this one proves the same through the operator.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operator_fixtures import Kube, OperatorProcess, dataset_manifest, wait_until

pytestmark = [pytest.mark.integration]


def _cases(d: Path, token: str) -> dict[str, tuple[dict, str]]:
    """name -> (Dataset spec, expected Ready=False reason); only file content holds the token."""
    mount = d / "secret-volume"
    mount.mkdir()
    (mount / "token").write_text(token)  # a Secret volume: a file named by the key, holding the value
    (d / "keys.jsonl").write_text("".join(json.dumps({token: "q", "completion": "a"}) + "\n" for _ in range(3)))
    (d / "broken.jsonl").write_text(f'{{"instruction": "{token}\n{{{token}: 1}}\n"{token}"\n')
    pq.write_table(pa.table({token: ["q"], "completion": ["a"]}), d / "t.parquet")
    return {
        "secret-mount": ({"source": {"uri": str(mount / "token")}, "format": "csv"}, "MissingColumn"),
        "token-keys": ({"source": {"uri": str(d / "keys.jsonl")}, "schema": "completion"}, "MissingColumn"),
        "broken-json": ({"source": {"uri": str(d / "broken.jsonl")}}, "TooManyBadRows"),
        "parquet-column": ({"source": {"uri": str(d / "t.parquet")}, "format": "parquet", "schema": "completion"},
                           "MissingColumn"),
    }


def test_no_secret_value_leaves_through_the_operator(control_plane, k8s_client, namespace, tmp_path) -> None:
    token = secrets.token_hex(16)
    cp = control_plane
    cp.kubectl("create", "secret", "generic", "canary", "-n", namespace, f"--from-literal=token={token}", check=True)
    data = tmp_path / "data"
    data.mkdir()
    cases = _cases(data, token)
    kube = Kube(k8s_client, namespace)
    workdir = tmp_path / "op"
    operator = OperatorProcess(cp.kubeconfig, workdir, namespaces=[namespace],
                               env={"TAILOR_DATASET_BACKEND": "local", "TAILOR_LOCAL_MAX_CONCURRENT": "2"}).start()
    try:
        for name, (spec, _) in cases.items():
            # the Dataset names the Secret, as a tenant would to have it mounted
            kube.apply(dataset_manifest(name, **{**spec, "source": {**spec["source"], "secretRef": {"name": "canary"}}}))
        for name, (_, reason) in cases.items():
            cond = wait_until(lambda: (c := kube.condition("Dataset", name, "Ready")).get("status") == "False"
                              and c.get("reason") not in ("Validating", "Pending") and c, 180, interval=1,
                              what=f"Dataset {name} validated", on_timeout=operator.log_tail)
            assert cond["reason"] == reason, (name, cond)
        metrics = operator.metrics()
    finally:
        operator.stop()

    places = {
        "Datasets": cp.kubectl("get", "datasets", "-n", namespace, "-o", "json", check=True).stdout,
        "Events": cp.kubectl("get", "events", "-n", namespace, "-o", "json", check=True).stdout,
        "ConfigMaps": cp.kubectl("get", "configmaps", "-n", namespace, "-o", "json", check=True).stdout,
        "operator log": Path(operator.log_path).read_text(errors="replace"),
        "/metrics": metrics,
    }
    written = [p for p in workdir.rglob("*") if p.is_file() and p != Path(operator.log_path)]
    places.update({str(p): p.read_bytes().decode("utf-8", "replace") for p in written})
    assert written, "the trainer subprocesses wrote nothing: the search would prove nothing"
    assert "MissingColumn" in places["Datasets"] and "MissingColumn" in places["Events"]
    for where, text in places.items():
        assert token not in text, f"the secret's value leaked into {where}"
    # the search itself can find it: the Secret (base64 in the API) and the data files hold it
    assert token in (data / "secret-volume" / "token").read_text()
