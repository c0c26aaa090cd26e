"""The MLflow model registry over its REST API (2.0 endpoints), standard library only.

Beside ``cluster.py`` in the layering: handlers call it, the pure reconcile never does. The
operator does not depend on the ``mlflow`` package; what it sends is what MLflow's REST API
documents (registered-models/create, model-versions/create|search, registered-models/alias,
experiments/get-by-name|create, runs/create|search|log-batch|update).

The address comes only from the installation (OperatorSettings.registry_uri, the chart's
`registry.trackingUri`); credentials only from the operator's environment (the chart fills
TAILOR_REGISTRY_USERNAME/PASSWORD or TAILOR_REGISTRY_TOKEN from a Secret in the operator's
namespace). Nothing in a FineTuneJob chooses where the operator connects.

Registering is idempotent: each model version carries the tag `tailor.dev/run` (and the job's
uid), so a run already registered is found, not registered twice, after a lost answer or an
operator restart.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from tailor_operator.api.v1alpha1 import FineTuneJob, FineTuneJobStatus, HistoryEntry, Phase
from tailor_operator.reconcile.registration import RegistryObserved

TAG_RUN = "tailor.dev/run"
TAG_JOB_UID = "tailor.dev/job-uid"
TAG_JOB = "tailor.dev/finetunejob"
CHAMPION_ALIAS = "champion"

logger = logging.getLogger("tailor.registry")


class RegistryError(Exception):
    """The registry could not be reached or refused a request."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    token: str = ""

    @classmethod
    def from_env(cls, env: Optional[dict[str, str]] = None) -> "Credentials":
        env = dict(os.environ) if env is None else env
        return cls(env.get("TAILOR_REGISTRY_USERNAME", ""), env.get("TAILOR_REGISTRY_PASSWORD", ""),
                   env.get("TAILOR_REGISTRY_TOKEN", ""))

    def header(self) -> Optional[str]:
        if self.token:
            return f"Bearer {self.token}"
        if self.username:
            return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return None


def check_uri(uri: str) -> str:
    """An installation's tracking URI: http(s)://host[:port][/prefix], no credentials in it."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"registry_uri must be an http(s) URL of an MLflow tracking server, not {uri!r}")
    if parsed.username or parsed.password:
        raise ValueError("registry_uri must not carry credentials: use the registry credentials Secret")
    return uri.rstrip("/")


def model_name(job: FineTuneJob) -> str:
    """`<namespace>.<spec.registry.modelName or job name>`: a tenant names models only inside its
    own namespace's prefix, so it can never move another namespace's alias."""
    reg = job.spec.registry
    base = (reg.model_name if reg is not None else None) or job.metadata.name
    return f"{job.metadata.namespace or 'default'}.{base}"


def _millis(at: Optional[datetime]) -> int:
    at = at or datetime.now(timezone.utc)
    return int(at.timestamp() * 1000)


class MlflowRegistry:
    """One MLflow tracking server (its model registry and the runs that carry metrics)."""

    def __init__(self, uri: str, credentials: Credentials = Credentials(), timeout: float = 5.0) -> None:
        self.base = check_uri(uri) + "/api/2.0/mlflow"
        self.credentials = credentials
        self.timeout = timeout

    # ------------------------------------------------------------------------------ transport
    def _call(self, method: str, path: str, body: Optional[dict[str, Any]] = None,
              query: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        url = f"{self.base}/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        auth = self.credentials.header()
        if auth:
            req.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (http(s) checked)
                raw = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                err = json.loads(text)
            except ValueError:
                err = {"message": text[:300]}
            raise RegistryError(f"{method} {path}: HTTP {e.code}: {err.get('message', '')}"[:500],
                                str(err.get("error_code") or e.code)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RegistryError(f"{method} {path}: cannot reach the registry: {reason}"[:500], "Unreachable") from None
        return json.loads(raw) if raw else {}

    # ------------------------------------------------------------------------------ registry
    def ensure_model(self, name: str, description: str = "") -> None:
        try:
            self._call("POST", "registered-models/create", {"name": name, "description": description,
                                                             "tags": [{"key": "managed-by", "value": "tailor"}]})
        except RegistryError as e:
            if e.code != "RESOURCE_ALREADY_EXISTS":
                raise

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of a registered model (paged)."""
        out: list[dict[str, Any]] = []
        token = None
        while True:
            query: dict[str, Any] = {"filter": f"name='{_quote(name)}'", "max_results": 1000}
            if token:
                query["page_token"] = token
            page = self._call("GET", "model-versions/search", query=query)
            out += page.get("model_versions") or []
            token = page.get("next_page_token")
            if not token:
                return out

    def find_version(self, name: str, run: str) -> Optional[dict[str, Any]]:
        """The version registered for Tailor run `run`, if any (by its tailor.dev/run tag)."""
        page = self._call("GET", "model-versions/search", query={
            "filter": f"name='{_quote(name)}' and tags.`{TAG_RUN}`='{_quote(run)}'", "max_results": 10})
        found = page.get("model_versions") or []
        return min(found, key=lambda v: int(v["version"])) if found else None

    def alias(self, name: str, alias: str = CHAMPION_ALIAS) -> Optional[str]:
        """The version an alias points at, None when it is not set."""
        try:
            got = self._call("GET", "registered-models/alias", query={"name": name, "alias": alias})
        except RegistryError as e:
            if e.code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "404"):
                return None
            raise
        return str((got.get("model_version") or {}).get("version") or "") or None

    def set_alias(self, name: str, version: str, alias: str = CHAMPION_ALIAS) -> None:
        self._call("POST", "registered-models/alias", {"name": name, "alias": alias, "version": version})

    # ------------------------------------------------------------------------------ runs
    def _experiment(self, name: str) -> str:
        try:
            got = self._call("GET", "experiments/get-by-name", query={"experiment_name": name})
            return str(got["experiment"]["experiment_id"])
        except RegistryError as e:
            if e.code != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            return str(self._call("POST", "experiments/create", {"name": name})["experiment_id"])
        except RegistryError as e:  # created meanwhile
            if e.code != "RESOURCE_ALREADY_EXISTS":
                raise
            return str(self._call("GET", "experiments/get-by-name", query={"experiment_name": name})
                       ["experiment"]["experiment_id"])

    def _mlflow_run(self, experiment_id: str, job: FineTuneJob, entry: HistoryEntry) -> str:
        """The MLflow run carrying a Tailor run's metrics and inputs (found by tag, else created)."""
        found = self._call("POST", "runs/search", {
            "experiment_ids": [experiment_id], "max_results": 1,
            "filter": f"tags.`{TAG_RUN}` = '{_quote(entry.run)}'"}).get("runs") or []
        if found:
            return str(found[0]["info"]["run_id"])
        at = _millis(entry.completion_time)
        run = self._call("POST", "runs/create", {
            "experiment_id": experiment_id, "run_name": entry.run, "start_time": at,
            "tags": [{"key": TAG_RUN, "value": entry.run}, {"key": TAG_JOB, "value": job.metadata.name},
                     {"key": TAG_JOB_UID, "value": job.metadata.uid or ""}]})
        run_id = str(run["run"]["info"]["run_id"])
        params = {"datasetRevision": entry.dataset_revision, "configHash": entry.config_hash, "model": entry.model}
        self._call("POST", "runs/log-batch", {
            "run_id": run_id,
            "metrics": [{"key": k, "value": float(v), "timestamp": at, "step": 0}
                        for k, v in sorted(entry.metrics.items())],
            "params": [{"key": k, "value": str(v)[:6000]} for k, v in params.items() if v]})
        self._call("POST", "runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": at})
        return run_id

    def register(self, name: str, job: FineTuneJob, entry: HistoryEntry) -> str:
        """Register a succeeded run's model as a version of `name` (once); returns the version."""
        existing = self.find_version(name, entry.run)
        if existing is not None:
            return str(existing["version"])
        ns = job.metadata.namespace or "default"
        run_id = self._mlflow_run(self._experiment(f"tailor/{ns}/{job.metadata.name}"), job, entry)
        tags = {TAG_RUN: entry.run, TAG_JOB_UID: job.metadata.uid or "", TAG_JOB: job.metadata.name,
                "datasetRevision": entry.dataset_revision or "", "configHash": entry.config_hash or ""}
        tags.update({f"metric.{k}": repr(float(v)) for k, v in sorted(entry.metrics.items())})
        created = self._call("POST", "model-versions/create", {
            "name": name, "source": entry.model, "run_id": run_id,
            "tags": [{"key": k, "value": v} for k, v in tags.items() if v],
            "description": f"Tailor run {entry.run} of FineTuneJob {ns}/{job.metadata.name}"})
        return str(created["model_version"]["version"])


def _quote(value: str) -> str:
    """A value inside a single-quoted MLflow filter string."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


# ---------------------------------------------------------------------------------- sync


@dataclass
class _JobState:
    model: str
    versions: dict[str, str]
    """Tailor run -> registered version."""
    alias_run: Optional[str] = None
    """The run the champion alias was last set to."""
    failures: int = 0
    retry_at: float = 0.0
    outcome: Optional[RegistryObserved] = None


class RegistrySync:
    """Keeps each job's registered model in step with its status: a version per succeeded run,
    the `champion` alias on the champion's version. Level-based and idempotent; what it knows is
    a cache (after a restart it finds what is registered by tag). A failure is retried with
    backoff and reported as the Registered condition; it never fails the job."""

    BACKOFF_BASE = 5.0
    BACKOFF_MAX = 300.0

    def __init__(self, client: Optional[MlflowRegistry]) -> None:
        self.client = client
        self.jobs: dict[str, _JobState] = {}
        self.lock = threading.Lock()

    @classmethod
    def from_settings(cls, uri: str, timeout: float) -> "RegistrySync":
        return cls(MlflowRegistry(uri, Credentials.from_env(), timeout) if uri else None)

    def observed(self, job: FineTuneJob) -> Optional[RegistryObserved]:
        with self.lock:
            state = self.jobs.get(job.metadata.uid or job.metadata.name)
        return state.outcome if state is not None else None

    def forget(self, uid: str) -> None:
        with self.lock:
            self.jobs.pop(uid, None)

    def sync(self, job: FineTuneJob, status: FineTuneJobStatus, now: Optional[float] = None) -> tuple[Optional[float], bool]:
        """Register what is missing and move the alias. Returns (seconds until a retry is due or
        None, whether the outcome changed: the caller reconciles again to write the condition)."""
        if self.client is None or job.spec.registry is None:
            return None, False
        now = time.monotonic() if now is None else now
        uid = job.metadata.uid or job.metadata.name
        name = model_name(job)
        with self.lock:
            state = self.jobs.get(uid)
            if state is None or state.model != name:
                state = self.jobs[uid] = _JobState(model=name, versions={})
        wanted = [h for h in status.history if h.phase is Phase.succeeded and h.model]
        champion = status.champion
        pending = [h for h in wanted if h.run not in state.versions]
        if not pending and (champion is None or state.alias_run == champion.run):
            return None, False
        if now < state.retry_at:
            return state.retry_at - now, False
        before = state.outcome
        try:
            self.client.ensure_model(name, f"FineTuneJob {job.metadata.namespace}/{job.metadata.name} (Tailor)")
            for h in pending:
                state.versions[h.run] = self.client.register(name, job, h)
            note = f"{len(state.versions)} version(s) of {name}"
            if champion is not None and champion.model:
                version = state.versions.get(champion.run)
                if version is None:  # older than status.history keeps: registered from status.champion
                    version = state.versions[champion.run] = self.client.register(name, job, HistoryEntry(
                        run=champion.run, phase=Phase.succeeded, dataset_revision=champion.dataset_revision,
                        metrics=champion.metrics, model=champion.model, completion_time=champion.promoted_at))
                if self.client.alias(name) != version:
                    self.client.set_alias(name, version)
                state.alias_run = champion.run
                note += f"; alias {CHAMPION_ALIAS} -> version {version} (run {champion.run})"
            state.failures, state.retry_at = 0, 0.0
            state.outcome = RegistryObserved(True, "Registered", note)
            delay = None
        except Exception as e:  # noqa: BLE001 - whatever the registry does, the job goes on
            if not isinstance(e, RegistryError):
                logger.warning("registry sync of %s/%s: unexpected answer", job.metadata.namespace,
                               job.metadata.name, exc_info=True)
                e = RegistryError(f"unexpected answer from the registry: {type(e).__name__}: {e}"[:500])
            state.failures += 1
            delay = min(self.BACKOFF_BASE * 2 ** (state.failures - 1), self.BACKOFF_MAX)
            state.retry_at = now + delay
            reason = "RegistryUnavailable" if e.code == "Unreachable" else "RegistryRejected"
            state.outcome = RegistryObserved(False, reason, f"{e} (attempt {state.failures}; next in {delay:.0f}s)")
        return delay, _summary(state.outcome) != _summary(before)


def _summary(outcome: Optional[RegistryObserved]) -> Optional[tuple[bool, str, str]]:
    """What the condition shows, without the attempt counter (a retry that fails the same way is
    no news worth a status write)."""
    if outcome is None:
        return None
    return outcome.ok, outcome.reason, outcome.message.split(" (attempt ")[0]
