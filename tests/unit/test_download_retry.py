"""Downloads retry 429/5xx/timeouts with bounded, jittered backoff; permanent errors do not retry.

The http(s) data path is exercised against a real local HTTP server (``http.server`` in a thread)
that answers 429 (with Retry-After) and 503 before serving the file; the model path through the
Hugging Face seam (``storage.hf_snapshot_download``) with huggingface_hub's own exception types.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from tailor_trainer import retry, storage
from tailor_trainer.config import ResolvedDataset
from tailor_trainer.data import DataError
from tailor_trainer.data.sources import iter_source
from tailor_trainer.stages import prep

BODY = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)).encode()


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers the statuses in ``server.script`` in turn, then the file (or 404 for other paths)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.hits += 1
        if self.path != "/data.jsonl":
            self.send_error(404)
            return
        if self.server.script:
            code, retry_after = self.server.script.pop(0)
            self.send_response(code)
            if retry_after is not None:
                self.send_header("Retry-After", str(retry_after))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/jsonl")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch) -> Iterator[http.server.HTTPServer]:
    monkeypatch.setenv("TAILOR_ALLOW_PRIVATE_ADDRESSES", "1")  # the server is on loopback
    monkeypatch.setenv("TAILOR_DOWNLOAD_TRIES", "4")
    monkeypatch.setenv("TAILOR_DOWNLOAD_BACKOFF_S", "0.05")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    srv.script, srv.hits = [], 0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _ds(srv, path: str = "/data.jsonl") -> ResolvedDataset:
    return ResolvedDataset.model_validate({
        "name": "d", "schema": "text", "split": {"validation": 0.1, "test": 0.1},
        "source": {"uri": f"http://127.0.0.1:{srv.server_address[1]}{path}"}})


def test_http_source_retries_429_and_503_then_reads_every_row(server):
    server.script = [(429, 1), (503, None)]
    started = time.monotonic()
    rows = list(iter_source(_ds(server)))
    assert [r.value["text"] for r in rows] == [f"row {i}" for i in range(20)]
    assert server.hits == 3
    assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured


def test_http_source_gives_up_after_the_bounded_tries_with_source_unreachable(server):
    server.script = [(503, None)] * 10
    status = prep.inspect_dataset(_ds(server))
    ready = status["conditions"][0]
    assert ready["status"] == "False"
    assert ready["reason"] == "SourceUnreachable"
    assert "HTTP 503 Service Unavailable" in ready["message"] and "gave up after 4 tries" in ready["message"]
    assert server.hits == 4


def test_http_404_is_permanent_and_not_retried(server):
    with pytest.raises(DataError) as info:
        list(iter_source(_ds(server, "/missing.jsonl")))
    assert info.value.reason == "EmptySource"
    assert server.hits == 1


def _hf_error(code: int, cls=HfHubHTTPError):
    response = httpx2.Response(code, request=httpx2.Request("GET", "https://huggingface.co/api/models/o/m"))
    return cls(f"{code} error", response=response)


def test_model_download_retries_hub_5xx_then_succeeds(monkeypatch, tmp_path):
    monkeypatch.setenv("TAILOR_DOWNLOAD_BACKOFF_S", "0.01")
    calls = []

    def flaky(repo_id, revision, token):
        calls.append(repo_id)
        if len(calls) < 3:
            raise _hf_error(503 if len(calls) == 1 else 429)
        return str(tmp_path)

    monkeypatch.setattr(storage, "hf_snapshot_download", flaky)
    assert storage.resolve_model_dir("hf://o/m") == str(tmp_path)
    assert calls == ["o/m"] * 3


def test_model_download_gives_up_with_the_count_of_tries(monkeypatch):
    monkeypatch.setenv("TAILOR_DOWNLOAD_TRIES", "3")
    monkeypatch.setenv("TAILOR_DOWNLOAD_BACKOFF_S", "0.01")
    calls = []

    def down(repo_id, revision, token):
        calls.append(1)
        raise _hf_error(502)

    monkeypatch.setattr(storage, "hf_snapshot_download", down)
    with pytest.raises(storage.StorageError, match=r"cannot download hf://o/m: .*HTTP 502.*gave up after 3 tries"):
        storage.resolve_model_dir("hf://o/m")
    assert len(calls) == 3


def test_model_not_found_is_not_retried(monkeypatch):
    calls = []

    def missing(repo_id, revision, token):
        calls.append(1)
        raise _hf_error(404, RepositoryNotFoundError)

    monkeypatch.setattr(storage, "hf_snapshot_download", missing)
    with pytest.raises(RepositoryNotFoundError):
        storage.resolve_model_dir("hf://o/m")
    assert len(calls) == 1


# --- the policy itself


def test_call_retries_transient_errors_and_passes_permanent_ones_through():
    waits: list[float] = []
    tries = iter([TimeoutError("slow"), ConnectionResetError("reset"), "ok"])

    def fn():
        v = next(tries)
        if isinstance(v, Exception):
            raise v
        return v

    assert retry.call(fn, "x", retry.Policy(tries=3, base_s=1.0), sleep=waits.append) == "ok"
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0

    def denied():
        raise PermissionError("403")

    with pytest.raises(PermissionError):
        retry.call(denied, "x", retry.Policy(tries=3), sleep=waits.append)
    assert len(waits) == 2  # no wait: not retried


def test_call_is_bounded_and_reports_the_tries():
    waits: list[float] = []

    def always():
        raise retry.Transient("HTTP 503", retry_after=7)

    with pytest.raises(retry.RetriesExhausted) as info:
        retry.call(always, "cannot read u", retry.Policy(tries=4, base_s=0.1), sleep=waits.append)
    assert info.value.tries == 4 and "gave up after 4 tries" in str(info.value)
    assert waits == [7, 7, 7]  # Retry-After beats a shorter backoff


def test_delay_is_capped():
    p = retry.Policy(tries=20, base_s=1.0, max_s=30.0)
    assert all(15.0 <= p.delay(n) <= 30.0 for n in range(6, 20))
    assert p.delay(1, retry_after=10_000) == retry.MAX_RETRY_AFTER_S


def test_classification():
    assert retry.is_transient(_hf_error(503)) and retry.is_transient(_hf_error(429))
    assert not retry.is_transient(_hf_error(403)) and not retry.is_transient(FileNotFoundError("x"))
    from botocore.exceptions import ClientError, EndpointConnectionError

    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    assert retry.is_transient(slow) and not retry.is_transient(denied)
    assert retry.is_transient(EndpointConnectionError(endpoint_url="http://s3"))
