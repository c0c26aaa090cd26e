"""Cluster.request retries 429, 5xx and connection failures with jittered backoff that honours
Retry-After, within a bound; other answers are raised at once. Against a real HTTP server on
loopback and the real kubernetes ApiClient (only the sleep is ours to replace)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from tailor_operator.cluster import (ApiError, Cluster, Conflict, NotFound, backoff_delay, retry_after_seconds,
                                     transport_retries)

OK = (200, {}, {"kind": "ConfigMap", "metadata": {"name": "x"}})


class Script:
    """The answers the server gives, in order (the last one repeats), and the requests it saw."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], dict]] = [OK]
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def next(self, method: str) -> tuple[int, dict[str, str], dict]:
        with self.lock:
            self.seen.append(method)
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            status, headers, body = script.next(self.command)
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()
    httpd.server_close()


def _cluster(url: str, sleeps: list[float], **kw) -> tuple[Cluster, list[str]]:
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = url
    cfg.retries = transport_retries()  # as new_api_client sets it
    retried: list[str] = []
    return Cluster(client.ApiClient(cfg), sleep=sleeps.append, on_retry=retried.append, timeout=5, **kw), retried


def _status(code: int, reason: str = "") -> dict:
    return {"kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": f"answer {code}"}


def test_429_with_retry_after_then_success(server) -> None:
    url, script = server
    script.answers = [(429, {"Retry-After": "3"}, _status(429, "TooManyRequests")),
                      (429, {"Retry-After": "1"}, _status(429, "TooManyRequests")), OK]
    sleeps: list[float] = []
    cluster, retried = _cluster(url, sleeps)
    assert cluster.get("ConfigMap", "ns", "x")["metadata"]["name"] == "x"
    assert script.seen == ["GET"] * 3
    assert retried == ["429", "429"] and cluster.retries["429"] == 2
    # never sooner than the server asked (backoff alone would be <= 0.5 s and <= 1 s)
    assert sleeps[0] >= 3 and sleeps[1] >= 1


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_5xx_is_retried(server, code: int) -> None:
    url, script = server
    script.answers = [(code, {}, _status(code)), OK]
    sleeps: list[float] = []
    cluster, retried = _cluster(url, sleeps)
    cluster.merge_patch("ConfigMap", "ns", "x", {"data": {"a": "b"}})
    assert script.seen == ["PATCH", "PATCH"] and retried == [str(code)]
    assert 0.25 <= sleeps[0] <= 0.5  # first backoff: base 0.5 s, equal jitter


@pytest.mark.parametrize("code,cls", [(400, ApiError), (403, ApiError), (404, NotFound), (409, Conflict),
                                      (422, ApiError), (501, ApiError)])
def test_other_errors_are_not_retried(server, code: int, cls: type) -> None:
    url, script = server
    script.answers = [(code, {}, _status(code)), OK]
    sleeps: list[float] = []
    cluster, retried = _cluster(url, sleeps)
    with pytest.raises(cls) as e:
        cluster.request("POST", "/api/v1/namespaces/ns/configmaps", body={})
    assert e.value.status == code
    assert script.seen == ["POST"] and sleeps == [] and retried == []


def test_retries_are_bounded_by_tries(server) -> None:
    url, script = server
    script.answers = [(503, {}, _status(503))]  # forever
    sleeps: list[float] = []
    cluster, retried = _cluster(url, sleeps, max_tries=5)
    with pytest.raises(ApiError) as e:
        cluster.get("ConfigMap", "ns", "x")
    assert e.value.status == 503
    assert len(script.seen) == 5 and len(sleeps) == 4 and retried == ["503"] * 4
    # exponential: each delay within [d/2, d] of base 0.5 s doubling
    for i, s in enumerate(sleeps):
        d = 0.5 * 2 ** i
        assert d / 2 <= s <= d


def test_retries_are_bounded_by_time_budget(server) -> None:
    """A Retry-After longer than the budget left is not waited for: raise, the WorkQueue backs off."""
    url, script = server
    script.answers = [(429, {"Retry-After": "60"}, _status(429))]
    sleeps: list[float] = []
    cluster, retried = _cluster(url, sleeps, retry_budget=30)
    with pytest.raises(ApiError) as e:
        cluster.get("ConfigMap", "ns", "x")
    assert e.value.status == 429 and e.value.retry_after == 60
    assert script.seen == ["GET"] and sleeps == [] and retried == []


def test_a_create_retried_after_it_was_carried_out_is_adopted(server) -> None:
    """The ambiguous case: a POST answered 504 may have been carried out; the retry answers 409
    AlreadyExists and create_or_adopt returns the existing object instead of failing."""
    url, script = server
    script.answers = [(504, {}, _status(504)), (409, {}, _status(409, "AlreadyExists")), OK]
    sleeps: list[float] = []
    cluster, retried = _cluster(url, sleeps)
    obj, created = cluster.create_or_adopt({"apiVersion": "v1", "kind": "ConfigMap",
                                            "metadata": {"name": "x", "namespace": "ns"}})
    assert (obj["metadata"]["name"], created) == ("x", False)
    assert script.seen == ["POST", "POST", "GET"] and retried == ["504"]


def test_connection_refused_is_retried_then_raised() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    cluster, retried = _cluster(f"http://127.0.0.1:{port}", sleeps, max_tries=3)
    with pytest.raises(Exception) as e:
        cluster.get("ConfigMap", "ns", "x")
    assert not isinstance(e.value, ApiError)
    assert retried == ["connection", "connection"] and len(sleeps) == 2


def test_backoff_delay_bounds() -> None:
    for attempt in range(8):
        d = min(8.0, 0.5 * 2 ** attempt)
        assert backoff_delay(attempt, 0.5, 8.0, rand=lambda: 0.0) == d / 2
        assert backoff_delay(attempt, 0.5, 8.0, rand=lambda: 1.0) == d
    delays = {round(backoff_delay(2, 0.5, 8.0), 6) for _ in range(50)}
    assert len(delays) > 10 and all(1.0 <= x <= 2.0 for x in delays)  # jittered, within [d/2, d]
    assert backoff_delay(0, 0.5, 8.0, retry_after=5) == 5
    assert retry_after_seconds("2") == 2 and retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") is None and retry_after_seconds("-1") is None
