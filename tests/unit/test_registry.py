"""The model registry client's own logic (tailor_operator/registry.py): the address only from the
installation, names confined to the namespace, credentials, and the sync's backoff and news. The
REST calls themselves run against a real `mlflow server`: tests/integration/test_mlflow_registry.py."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from tailor_operator.api.v1alpha1 import ChampionStatus, FineTuneJob, FineTuneJobStatus, HistoryEntry, Phase
from tailor_operator.reconcile.settings import OperatorSettings
from tailor_operator.registry import Credentials, RegistryError, RegistrySync, check_uri, model_name

T = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _job(**registry: Any) -> FineTuneJob:
    return FineTuneJob.model_validate({
        "apiVersion": "tailor.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "support", "namespace": "team-ml", "uid": "u1"},
        "spec": {"baseModel": {"uri": "hf://a/b"}, "datasetRef": {"name": "d"}, "output": {"uri": "s3://o"},
                 "registry": registry}})


def test_the_registry_address_comes_only_from_the_installation() -> None:
    assert check_uri("http://mlflow.ml:5000/") == "http://mlflow.ml:5000"
    for bad in ("ftp://mlflow", "mlflow:5000", "http://user:pw@mlflow:5000", "file:///etc/passwd"):
        with pytest.raises(ValueError, match="registry_uri"):
            check_uri(bad)
    with pytest.raises(ValueError, match="registry_uri"):
        OperatorSettings(registry_uri="ftp://mlflow")
    assert "registry" in FineTuneJob.model_json_schema()["$defs"]["FineTuneJobSpec"]["properties"]
    assert set(FineTuneJob.model_json_schema()["$defs"]["RegistrySpec"]["properties"]) == {"modelName"}


def test_model_names_are_prefixed_with_the_namespace() -> None:
    assert model_name(_job()) == "team-ml.support"
    assert model_name(_job(modelName="llm")) == "team-ml.llm"
    with pytest.raises(ValueError, match="modelName|model_name"):
        _job(modelName="../other.prod")


def test_credentials_become_one_authorization_header() -> None:
    assert Credentials().header() is None
    assert Credentials.from_env({"TAILOR_REGISTRY_TOKEN": "t0k"}).header() == "Bearer t0k"
    assert Credentials.from_env({"TAILOR_REGISTRY_USERNAME": "u", "TAILOR_REGISTRY_PASSWORD": "p"}).header() == \
        "Basic dTpw"


class FlakyRegistry:
    """Our own seam (MlflowRegistry's methods), failing `down` times before it answers."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.versions: dict[str, str] = {}
        self.aliased: list[str] = []

    def ensure_model(self, name: str, description: str = "") -> None:
        if self.down > 0:
            self.down -= 1
            raise RegistryError("POST registered-models/create: cannot reach the registry", "Unreachable")

    def register(self, name: str, job: FineTuneJob, entry: HistoryEntry) -> str:
        return self.versions.setdefault(entry.run, str(len(self.versions) + 1))

    def alias(self, name: str, alias: str = "champion") -> Any:
        return self.aliased[-1] if self.aliased else None

    def set_alias(self, name: str, version: str, alias: str = "champion") -> None:
        self.aliased.append(version)


def test_sync_backs_off_while_the_registry_is_down_then_catches_up() -> None:
    client = FlakyRegistry(down=2)
    sync = RegistrySync(client)  # type: ignore[arg-type]
    job = _job()
    h1 = HistoryEntry(run="support-r1", phase=Phase.succeeded, model="s3://o/r1", metrics={"loss": 1.0})
    failed = HistoryEntry(run="support-r2", phase=Phase.failed)
    st = FineTuneJobStatus(history=[h1, failed], champion=ChampionStatus(run="support-r1", model="s3://o/r1"))
    assert sync.sync(job, st, now=0.0) == (5.0, True)  # news: the condition turns False
    assert sync.observed(job).reason == "RegistryUnavailable"
    assert sync.sync(job, st, now=1.0) == (4.0, False)  # not due yet: no call
    assert sync.sync(job, st, now=5.0) == (10.0, False)  # fails again the same way: no news, longer wait
    assert sync.sync(job, st, now=15.0) == (None, True)
    assert sync.observed(job).ok and client.versions == {"support-r1": "1"} and client.aliased == ["1"]
    assert sync.sync(job, st, now=16.0) == (None, False)  # nothing new: no calls at all
    # a promotion moves the alias; a rollback moves it back
    st.history.append(HistoryEntry(run="support-r3", phase=Phase.succeeded, model="s3://o/r3"))
    st.champion = ChampionStatus(run="support-r3", model="s3://o/r3")
    assert sync.sync(job, st, now=17.0) == (None, True) and client.aliased == ["1", "2"]
    st.champion = ChampionStatus(run="support-r1", model="s3://o/r1")
    sync.sync(job, st, now=18.0)
    assert client.aliased == ["1", "2", "1"] and client.versions == {"support-r1": "1", "support-r3": "2"}


def test_no_registry_spec_or_no_installation_registry_means_no_calls() -> None:
    client = FlakyRegistry(down=99)
    job = FineTuneJob.model_validate({**_job().model_dump(by_alias=True, exclude_none=True),
                                      "spec": {**_job().spec.model_dump(by_alias=True, exclude_none=True),
                                               "registry": None}})
    st = FineTuneJobStatus(history=[HistoryEntry(run="support-r1", phase=Phase.succeeded, model="s3://o/r1")])
    assert RegistrySync(client).sync(job, st, now=0.0) == (None, False)  # type: ignore[arg-type]
    assert RegistrySync(None).sync(_job(), st, now=0.0) == (None, False)
    assert client.down == 99


def test_an_unexpected_answer_is_a_rejection_not_a_crash() -> None:
    class Garbled(FlakyRegistry):
        def register(self, name: str, job: FineTuneJob, entry: HistoryEntry) -> str:
            raise KeyError("model_version")

    sync = RegistrySync(Garbled(down=0))  # type: ignore[arg-type]
    st = FineTuneJobStatus(history=[HistoryEntry(run="support-r1", phase=Phase.succeeded, model="s3://o/r1")])
    assert sync.sync(_job(), st, now=0.0) == (5.0, True)
    observed = sync.observed(_job())
    assert observed is not None and not observed.ok and observed.reason == "RegistryRejected"
    assert "KeyError" in observed.message
