"""Progress and result reporting: trainer -> operator (docs/stage-contracts.md).

One JSON document (run, attempt, stage, state, step, loss, tokens/s, ETA, result, error) is
replaced as a whole on every update, in every configured sink:

- :class:`FileSink` (local backend): temp file + rename, so a reader never sees a torn file.
- :class:`ConfigMapSink` (kuberay backend): ConfigMap ``<run>-progress``, key ``progress.json``,
  through the in-cluster Kubernetes API. Rate-limited (the API server is shared); terminal
  states are always written. The ``kubernetes`` client is imported only when this sink is used.

The operator is the only writer of ``FineTuneJob.status``; this document is what it reads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Optional, Protocol

from tailor_trainer.config import ProgressSink, RunInfo
from tailor_trainer.contract import PROGRESS_FILE
from tailor_trainer.redact import redact

log = logging.getLogger(__name__)

PROGRESS_KEY = PROGRESS_FILE  # the ConfigMap key is the file name
# Fields a stage change resets (they describe the stage that just ended).
_STAGE_FIELDS = ("step", "totalSteps", "epoch", "loss", "tokensPerSecond", "etaSeconds", "message")


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Sink(Protocol):
    def write(self, doc: dict[str, Any], *, force: bool = False) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """The progress document as a local JSON file, replaced atomically."""

    def __init__(self, path: str):
        self.path = path

    def write(self, doc: dict[str, Any], *, force: bool = False) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, self.path)

    def close(self) -> None:
        pass


class ConfigMapSink:
    """ConfigMap ``name`` in ``namespace`` holding the document under ``progress.json``.

    At most one API write every ``min_interval`` seconds; an update in between is kept and
    written by the next one after the interval (or by ``close``). ``api`` is a ``CoreV1Api``;
    by default one is built from the pod's service account.
    """

    def __init__(self, name: str, namespace: str, labels: Optional[dict[str, str]] = None,
                 min_interval: float = 5.0, api: Any = None, clock=time.monotonic):
        self.name, self.namespace = name, namespace
        self.labels = labels or {}
        self.min_interval = min_interval
        self._api = api
        self._clock = clock
        self._last_write = float("-inf")
        self._pending: Optional[dict[str, Any]] = None
        self._lock = threading.Lock()

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CoreV1Api()
        return self._api

    def write(self, doc: dict[str, Any], *, force: bool = False) -> None:
        with self._lock:
            self._pending = doc
            if not force and self._clock() - self._last_write < self.min_interval:
                return
            self._flush()

    def _flush(self) -> None:
        if self._pending is None:
            return
        body = {
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "data": {PROGRESS_KEY: json.dumps(self._pending, sort_keys=True, default=str)},
        }
        try:
            api = self._client()
            try:
                api.patch_namespaced_config_map(self.name, self.namespace, body)
            except Exception as e:  # noqa: BLE001 - ApiException without importing kubernetes
                if getattr(e, "status", None) != 404:
                    raise
                api.create_namespaced_config_map(self.namespace, body)
        except Exception as e:  # noqa: BLE001 - progress must never kill training
            log.warning("cannot write progress ConfigMap %s/%s: %s", self.namespace, self.name, e)
            return
        self._pending = None
        self._last_write = self._clock()

    def close(self) -> None:
        with self._lock:
            self._flush()


class Reporter:
    """Keeps the progress document and writes it to the sinks on every change."""

    def __init__(self, run: RunInfo, sinks: list[Sink], clock=time.time):
        self.sinks = sinks
        self._clock = clock
        self._lock = threading.Lock()
        self.doc: dict[str, Any] = {
            "run": run.name, "job": run.job, "namespace": run.namespace, "attempt": run.attempt,
            "stage": None, "state": "Running", "step": None, "totalSteps": None, "epoch": None,
            "loss": None, "tokensPerSecond": None, "etaSeconds": None, "startedAt": utcnow(),
            "updatedAt": utcnow(), "result": None, "error": None,
        }

    @classmethod
    def from_config(cls, run: RunInfo, sink: ProgressSink, **configmap_kwargs: Any) -> "Reporter":
        sinks: list[Sink] = []
        if sink.file:
            sinks.append(FileSink(sink.file))
        if sink.config_map:
            labels = {"app.kubernetes.io/managed-by": "tailor", "tailor.dev/finetunejob": run.job,
                      "tailor.dev/run": run.name}
            sinks.append(ConfigMapSink(sink.config_map, run.namespace, labels, **configmap_kwargs))
        return cls(run, sinks)

    def _write(self, force: bool) -> None:
        self.doc["updatedAt"] = utcnow()
        snapshot = dict(self.doc)
        for s in self.sinks:
            try:
                s.write(snapshot, force=force)
            except Exception as e:  # noqa: BLE001 - a full disk must not hide the real error
                log.warning("progress sink %s failed: %s", type(s).__name__, e)

    def update(self, force: bool = False, **fields: Any) -> None:
        """Merge ``fields`` (camelCase keys of the document) and write."""
        with self._lock:
            stage = fields.get("stage")
            if stage is not None and stage != self.doc.get("stage"):
                for k in _STAGE_FIELDS:
                    self.doc[k] = None
                force = True
            self.doc.update(fields)
            self._write(force)

    def __call__(self, **fields: Any) -> None:
        self.update(**fields)

    def succeed(self, result: Optional[dict[str, Any]]) -> None:
        with self._lock:
            self.doc.update(state="Succeeded", result=result, error=None, etaSeconds=0,
                            finishedAt=utcnow())
            self._write(True)
        self.close()

    def fail(self, reason: str, message: str, field: Optional[str] = None) -> None:
        # The error lands in FineTuneJob.status and Events: mask credential-shaped text (an
        # internal error's text may carry a signed URL or a token from a client library).
        with self._lock:
            self.doc.update(state="Failed", error={"reason": reason, "message": redact(message)[:4096],
                                                   "field": field}, finishedAt=utcnow())
            self._write(True)
        self.close()

    def close(self) -> None:
        for s in self.sinks:
            s.close()
