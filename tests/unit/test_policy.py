"""Installation policy: settings parsing, local roots, http(s) address checks, credential query strings.

The reconcile side (what a refused spec looks like) is in the golden cases tests/data/*-policy-*.
No network: literal addresses, `localhost`, and a fake resolver.
"""

from __future__ import annotations

import urllib.request

import pytest
from pydantic import ValidationError

from tailor_operator.api.v1alpha1 import Dataset, FineTuneJob
from tailor_operator.reconcile.policy import check_job_policy, path_allowed
from tailor_operator.reconcile.settings import OperatorSettings
from tailor_operator.runner import settings_from_env
from tailor_trainer import netpolicy
from tailor_trainer._base import CREDENTIAL_QUERY_PARAMS
from tailor_trainer.data import DataError


def test_policy_defaults_are_the_charts() -> None:
    s = settings_from_env({})
    assert s.backends() == ("kuberay",)
    assert s.allow_image_override is False and s.image_prefixes() == ()
    assert s.local_roots() == () and s.allow_private_addresses is False


def test_policy_settings_from_env_json_and_commas() -> None:
    s = settings_from_env({
        "TAILOR_ALLOWED_BACKENDS": '["kuberay", "local"]',  # what the chart writes (toJson)
        "TAILOR_ALLOW_IMAGE_OVERRIDE": "true",
        "TAILOR_ALLOWED_IMAGE_PREFIXES": "registry.acme/ml/, ghcr.io/acme/",
        "TAILOR_ALLOWED_LOCAL_ROOTS": '["/mnt/models", "/data"]',
        "TAILOR_ALLOW_PRIVATE_ADDRESSES": "1",
    })
    assert s.backends() == ("kuberay", "local")
    assert s.allow_image_override and s.image_prefixes() == ("registry.acme/ml/", "ghcr.io/acme/")
    assert s.local_roots() == ("/mnt/models", "/data") and s.allow_private_addresses
    assert settings_from_env({"TAILOR_ALLOWED_BACKENDS": "[]"}).backends() == ()


@pytest.mark.parametrize("field, value", [
    ("allowed_backends", "kuberay,slurm"),
    ("allowed_local_roots", "data/relative"),
    ("allowed_image_prefixes", '[1, 2]'),
    ("allowed_backends", '{"kuberay": true}'),
])
def test_bad_policy_settings_fail_at_start_up(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        OperatorSettings(**{field: value})


@pytest.mark.parametrize("uri, roots, ok", [
    ("s3://b/x", "", True),
    ("pvc://claim/x", "", True),
    ("hf://org/m", "", True),
    ("/data/x.jsonl", "", False),
    ("file:///data/x.jsonl", "", False),
    ("examples/data/x.jsonl", "", False),
    ("/data/x.jsonl", "/data", True),
    ("file:///data/sub/x.jsonl", "/data/", True),
    ("/database/x.jsonl", "/data", False),  # a sibling with the same prefix
    ("/data/../etc/passwd", "/data", False),
    ("examples/data/x.jsonl", "/data", False),  # relative: only "*"
    ("examples/data/x.jsonl", "*", True),
    ("/anything", "*", True),
])
def test_local_roots(uri: str, roots: str, ok: bool) -> None:
    assert path_allowed(uri, OperatorSettings(allowed_local_roots=roots)) is ok


def _job(**spec: object) -> FineTuneJob:
    body = {"baseModel": {"uri": "hf://org/m"}, "datasetRef": {"name": "d"}, "output": {"uri": "s3://b/out"}}
    body.update(spec)
    return FineTuneJob.model_validate({"apiVersion": "tailor.dev/v1alpha1", "kind": "FineTuneJob",
                                       "metadata": {"name": "j"}, "spec": body})


def test_job_policy_allows_the_default_kuberay_job() -> None:
    assert check_job_policy(_job(), OperatorSettings()) is None
    assert check_job_policy(_job(backend="local"), OperatorSettings(allowed_backends="kuberay,local")) is None
    allowed = OperatorSettings(allow_image_override=True)
    assert check_job_policy(_job(resources={"image": "anything:1"}), allowed) is None


@pytest.mark.parametrize("host, refused", [
    ("169.254.169.254", "a cloud metadata address"),
    ("169.254.1.2", "a link-local address"),
    ("100.100.100.200", "a cloud metadata address"),
    ("fd00:ec2::254", "a cloud metadata address"),
    ("[fe80::1]", "a link-local address"),
    ("127.0.0.1", "a loopback address"),
    ("127.1.2.3", "a loopback address"),
    ("::1", "a loopback address"),
    ("::ffff:169.254.169.254", "a cloud metadata address"),
    ("0.0.0.0", "the unspecified address"),
    ("::", "the unspecified address"),
    ("localhost", "a loopback name"),
    ("metadata.google.internal", "a cloud metadata name"),
    ("METADATA.google.internal.", "a cloud metadata name"),
    ("metadata", "a cloud metadata name"),
    ("10.0.0.1", None),  # private networks are a NetworkPolicy's business, not this check's
    ("93.184.216.34", None),
    ("data.example.com", None),
])
def test_blocked_host(host: str, refused: str | None) -> None:
    assert netpolicy.blocked_host(host) == refused


def test_uri_host_strips_credentials_port_and_query() -> None:
    assert netpolicy.uri_host("http://[FE80::1]:8080/x?sig=1") == "fe80::1"
    assert netpolicy.uri_host("https://Data.Example.com./a.jsonl?token=x") == "data.example.com"


def test_check_host_refuses_a_name_that_resolves_to_metadata() -> None:
    with pytest.raises(netpolicy.AddressNotAllowed, match="host rebind.example resolves to 169.254.169.254, a cloud metadata address"):
        netpolicy.check_host("rebind.example", resolve=lambda h: ["93.184.216.34", "169.254.169.254"])
    netpolicy.check_host("ok.example", resolve=lambda h: ["93.184.216.34"])


def test_open_url_refuses_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(netpolicy.ENV_ALLOW, raising=False)
    request = urllib.request.Request("http://localhost:1/d.jsonl?X-Amz-Signature=abc")
    with pytest.raises(DataError) as info:
        netpolicy.open_url(request, 1, error=DataError)
    assert info.value.reason == "AddressNotAllowed"
    assert "localhost" in info.value.message and "abc" not in info.value.message


def test_redirects_are_checked_too() -> None:
    handler = netpolicy._CheckedRedirects()
    with pytest.raises(netpolicy.AddressNotAllowed, match="169.254.169.254"):
        handler.redirect_request(urllib.request.Request("http://a.example/"), None, 302, "Found", {},
                                 "http://169.254.169.254/latest/meta-data/")


def _dataset(uri: str) -> dict:
    return {"apiVersion": "tailor.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "d"},
            "spec": {"source": {"uri": uri}, "schema": "text"}}


@pytest.mark.parametrize("param", CREDENTIAL_QUERY_PARAMS)
def test_credential_query_parameters_are_refused(param: str) -> None:
    spelled = param.upper() if len(param) % 2 else param
    with pytest.raises(ValidationError) as info:
        Dataset.model_validate(_dataset(f"https://x.example/d.jsonl?a=1&{spelled}=SECRETVALUE"))
    message = info.value.errors()[0]["msg"]
    assert f"must not carry credentials in its query string ({spelled}=…); use secretRef" in message
    assert "SECRETVALUE" not in message
    assert info.value.errors()[0]["loc"] == ("spec", "source", "uri")


@pytest.mark.parametrize("uri", [
    "https://x.example/d.jsonl?monkey=1&keys=2",  # names that merely contain a listed one
    "https://x.example/token=1/d.jsonl",  # not in a query string
    "s3://bucket/signature/d.jsonl",
    "https://x.example/d.jsonl?version=3",
])
def test_ordinary_query_strings_pass(uri: str) -> None:
    Dataset.model_validate(_dataset(uri))


def test_model_and_output_uris_refuse_credential_queries_too() -> None:
    with pytest.raises(ValidationError, match="sig=…"):
        _job(baseModel={"uri": "hf://org/m?sig=1"})
    with pytest.raises(ValidationError, match="Signature=…"):
        _job(output={"uri": "s3://b/out?Signature=1"})
