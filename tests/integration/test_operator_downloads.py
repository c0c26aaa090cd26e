"""Download retries seen from the control plane: a Dataset whose http source answers 429 and 503
before the file is validated (the operator's local validation subprocess retries with backoff),
and one that keeps answering 503 is Ready=False with SourceUnreachable and the number of tries,
after exactly that many requests. The server is a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import json
import threading
from typing import Iterator

import pytest

from operator_fixtures import Kube, OperatorProcess, wait_until

pytestmark = [pytest.mark.integration]

BODY = "".join(json.dumps({"text": f"row {i} says something"}) + "\n" for i in range(50)).encode()
TRIES = 4


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Per path: the statuses in ``server.scripts[path]`` in turn, then the file."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        with srv.lock:
            srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
            script = srv.scripts.get(self.path)
            step = script.pop(0) if script else None
        if step is not None:
            code, retry_after = step
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
def flaky_server() -> Iterator[http.server.HTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    srv.scripts, srv.hits, srv.lock = {}, {}, threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _dataset(name: str, url: str) -> dict:
    return {"apiVersion": "tailor.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": name},
            "spec": {"schema": "text", "source": {"uri": url}, "split": {"validation": 0.1, "test": 0.1}}}


def test_dataset_downloads_retry_429_and_503_then_give_up_with_the_count(control_plane, k8s_client, namespace,
                                                                         flaky_server, tmp_path) -> None:
    kube = Kube(k8s_client, namespace)
    base = f"http://127.0.0.1:{flaky_server.server_address[1]}"
    flaky_server.scripts["/flaky.jsonl"] = [(429, 1), (503, None)]
    flaky_server.scripts["/down.jsonl"] = [(503, None)] * 20
    operator = OperatorProcess(control_plane.kubeconfig, tmp_path / "op", namespaces=[namespace],
                               env={"TAILOR_DATASET_BACKEND": "local", "TAILOR_ALLOW_PRIVATE_ADDRESSES": "1",
                                    "TAILOR_DOWNLOAD_TRIES": str(TRIES),
                                    "TAILOR_DOWNLOAD_BACKOFF_S": "0.2"}).start()
    try:
        kube.apply(_dataset("flaky", f"{base}/flaky.jsonl"))
        kube.apply(_dataset("down", f"{base}/down.jsonl"))
        ready = wait_until(lambda: (c := kube.condition("Dataset", "flaky", "Ready")).get("status") in ("True", "False")
                           and c, 180, interval=1, what="Dataset flaky validated", on_timeout=operator.log_tail)
        assert ready["status"] == "True", ready
        assert kube.status("Dataset", "flaky")["rows"] == 50
        assert flaky_server.hits["/flaky.jsonl"] == 3  # 429, 503, then the file

        down = wait_until(lambda: (c := kube.condition("Dataset", "down", "Ready")).get("status") in ("True", "False")
                          and c, 180, interval=1, what="Dataset down judged", on_timeout=operator.log_tail)
        assert (down["status"], down["reason"]) == ("False", "SourceUnreachable"), down
        assert f"gave up after {TRIES} tries" in down["message"] and "503" in down["message"], down
        assert flaky_server.hits["/down.jsonl"] == TRIES
        print(f"\n[downloads] flaky source validated after {flaky_server.hits['/flaky.jsonl']} requests; "
              f"down source: {down['reason']} after {TRIES} requests")
    finally:
        operator.stop()
