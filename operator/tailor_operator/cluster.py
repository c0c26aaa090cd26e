"""The one module that talks to the Kubernetes API server.

A thin, synchronous REST layer over the official client's authenticated connection pool: plain
dicts in and out (no generated models), one path scheme for every kind, typed errors for the two
answers the operator acts on (404, 409), and a count of every write so `/metrics` and the scale
benchmark can report API writes per job.

Throttling and outages: 429, 5xx (but 501) and connection failures are retried here, a few times
with jittered exponential backoff that waits at least the server's `Retry-After`, within a time
budget; then the error is raised and the WorkQueue's per-key backoff takes over. A retried POST
whose first try was carried out answers 409 AlreadyExists: every create path handles Conflict
(`create_or_adopt`, `ensure`, `apply`, events), which is what makes retrying it safe.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from typing import Any, Callable, Optional
from urllib.parse import quote, urlencode

logger = logging.getLogger("tailor.cluster")

# kind -> (group, version, plural)
KINDS: dict[str, tuple[str, str, str]] = {
    "FineTuneJob": ("tailor.dev", "v1alpha1", "finetunejobs"),
    "Dataset": ("tailor.dev", "v1alpha1", "datasets"),
    "RayJob": ("ray.io", "v1", "rayjobs"),
    "RayCluster": ("ray.io", "v1", "rayclusters"),
    "InferenceService": ("serving.kserve.io", "v1beta1", "inferenceservices"),
    "ConfigMap": ("", "v1", "configmaps"),
    "Pod": ("", "v1", "pods"),
    "Event": ("", "v1", "events"),
    "Job": ("batch", "v1", "jobs"),
    "ServiceAccount": ("", "v1", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io", "v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
    "Lease": ("coordination.k8s.io", "v1", "leases"),
}


# Accept header for answers that carry only the object's metadata (falls back to the whole object)
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"

# 429 Too Many Requests, and the 5xx answers of an overloaded, restarting or unreachable server
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of the connection itself: refused, reset, timed out (urllib3's, and OSError)."""
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 comes with the kubernetes client
        return (OSError,)
    return (Urllib3Error, OSError)


TRANSPORT_ERRORS = _transport_errors()


def retry_after_seconds(value: Any) -> Optional[float]:
    """The `Retry-After` header in seconds (the API server sends whole seconds); None if absent
    or not a number (the HTTP-date form is not used by Kubernetes)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None


def backoff_delay(attempt: int, base: float, cap: float, retry_after: Optional[float] = None,
                  rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number `attempt` (0-based): "equal jitter", uniform in [d/2, d] with
    d = min(cap, base * 2**attempt) so concurrent clients spread out, and never less than the
    server's Retry-After."""
    d = min(cap, base * (2 ** attempt))
    delay = d / 2 + rand() * d / 2
    return max(delay, retry_after) if retry_after is not None else delay


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: str = "") -> None:
        self.status = status
        self.reason = reason
        self.body = body
        self.retry_after: Optional[float] = None  # seconds, from the answer's Retry-After header
        try:
            self.message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            self.message = body
        super().__init__(f"{status} {reason}: {self.message}")


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: AlreadyExists on create, or a stale resourceVersion on update."""


def _header(response: Any, name: str) -> Optional[str]:
    getheader = getattr(response, "getheader", None)
    if getheader is not None:
        return getheader(name)
    headers = getattr(response, "headers", None) or {}
    return headers.get(name)


def _path(kind: str, namespace: Optional[str], name: Optional[str] = None, sub: Optional[str] = None) -> str:
    group, version, plural = KINDS[kind]
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    path = f"{base}/namespaces/{quote(namespace)}/{plural}" if namespace else f"{base}/{plural}"
    if name:
        path += f"/{quote(name)}"
    if sub:
        path += f"/{sub}"
    return path


class Cluster:
    """API access for the operator. Thread-safe (one urllib3 pool shared by the worker threads)."""

    def __init__(self, api_client: Any = None, *, on_write: Optional[Callable[[str, str], None]] = None,
                 on_retry: Optional[Callable[[str], None]] = None, timeout: float = 30.0, max_tries: int = 5,
                 backoff_base: float = 0.5, backoff_max: float = 8.0, retry_budget: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if api_client is None:
            api_client = new_api_client()
        self.api = api_client
        self.timeout = timeout
        self.max_tries = max_tries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.retry_budget = retry_budget  # seconds from the first try after which no retry starts
        self.writes: Counter[tuple[str, str]] = Counter()
        self.retries: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._on_write = on_write
        self._on_retry = on_retry
        self._sleep = sleep
        self.on_written: Optional[Callable[[str, dict[str, Any]], None]] = None
        """Called with the kind and the API server's answer to each successful create, update and
        patch (the object as written, or only its metadata, with its new resourceVersion): the
        handlers' Context recognises the watch events of the operator's own writes by it."""

    # ------------------------------------------------------------------------------ transport

    def request(self, method: str, path: str, *, body: Any = None, query: Optional[dict[str, Any]] = None,
                content_type: str = "application/json", accept: str = "application/json") -> Any:
        url_path = path + ("?" + urlencode(query) if query else "")
        headers = {"Accept": accept, "Content-Type": content_type}
        start = time.monotonic()
        attempt = 0
        while True:
            retry_after: Optional[float] = None
            try:
                return self._request_once(method, url_path, headers, body)
            except ApiError as e:
                if e.status not in RETRY_STATUSES:
                    raise
                code, error = str(e.status), e
                retry_after = e.retry_after
            except TRANSPORT_ERRORS as e:  # refused, reset, timed out: the server may be restarting
                code, error = "connection", e
            delay = backoff_delay(attempt, self.backoff_base, self.backoff_max, retry_after)
            attempt += 1
            if attempt >= self.max_tries or time.monotonic() - start + delay > self.retry_budget:
                raise error
            logger.debug("%s %s: %s; retry %d in %.2fs", method, path, code, attempt, delay)
            with self._lock:
                self.retries[code] += 1
            if self._on_retry is not None:
                self._on_retry(code)
            self._sleep(delay)

    def _request_once(self, method: str, url_path: str, headers: dict[str, str], body: Any) -> Any:
        params = self.api.param_serialize(method=method, resource_path=url_path, header_params=headers,
                                          body=body, auth_settings=["BearerToken"])
        response = self.api.call_api(*params, _request_timeout=self.timeout)
        data = response.read()
        if response.status >= 400:
            text = data.decode("utf-8", "replace") if data else ""
            cls = NotFound if response.status == 404 else Conflict if response.status == 409 else ApiError
            error = cls(response.status, response.reason or "", text)
            error.retry_after = retry_after_seconds(_header(response, "Retry-After"))
            raise error
        return json.loads(data) if data else None

    def _write(self, verb: str, kind: str) -> None:
        with self._lock:
            self.writes[(verb, kind)] += 1
        if self._on_write is not None:
            self._on_write(verb, kind)

    def _written(self, kind: str, obj: Any) -> Any:
        if self.on_written is not None and isinstance(obj, dict):
            self.on_written(kind, obj)
        return obj

    # -------------------------------------------------------------------------------- reading

    def get(self, kind: str, namespace: Optional[str], name: str) -> Optional[dict[str, Any]]:
        try:
            return self.request("GET", _path(kind, namespace, name))
        except NotFound:
            return None

    def list(self, kind: str, namespace: Optional[str], labels: Optional[dict[str, str]] = None) -> list[dict]:
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in sorted(labels.items()))} if labels else None
        try:
            result = self.request("GET", _path(kind, namespace), query=query)
        except NotFound:
            return []  # e.g. the RayJob CRD is not installed
        return (result or {}).get("items") or []

    # -------------------------------------------------------------------------------- writing

    def create(self, obj: dict[str, Any], *, metadata_only: bool = False) -> dict[str, Any]:
        """POST the object; the answer is the object as created. With metadata_only, only its
        metadata (a PartialObjectMetadata, as for metadata-only watches): the server does not
        encode, nor the operator decode, a large object whose body it already knows."""
        kind, ns = obj["kind"], obj["metadata"].get("namespace")
        self._write("create", kind)
        extra = {"accept": METADATA_ONLY} if metadata_only else {}
        return self._written(kind, self.request("POST", _path(kind, ns), body=obj, **extra))

    def create_or_adopt(self, obj: dict[str, Any], *, metadata_only: bool = False) -> tuple[dict[str, Any], bool]:
        """Create; on AlreadyExists return the existing object. (object, created?)"""
        try:
            return self.create(obj, metadata_only=metadata_only), True
        except Conflict:
            existing = self.get(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
            if existing is None:  # deleted in between: try once more
                return self.create(obj, metadata_only=metadata_only), True
            return existing, False

    def ensure(self, obj: dict[str, Any]) -> bool:
        """Create the object unless one of that name exists; an existing one is never changed,
        whoever manages it. True if this call created it. Needs `get` and `create` on the kind."""
        if self.get(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]) is not None:
            return False
        try:
            self.create(obj)
        except Conflict:
            return False  # created meanwhile by someone else
        return True

    def apply(self, obj: dict[str, Any], *, metadata_only: bool = False) -> dict[str, Any]:
        """Create, or replace the existing object's labels/annotations/data/spec (a run's
        NetworkPolicy and config ConfigMap). `metadata_only` as for `create`."""
        existing = None
        try:
            return self.create(obj, metadata_only=metadata_only)
        except Conflict:
            existing = self.get(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if existing is None:
            return self.create(obj, metadata_only=metadata_only)
        body = dict(obj)
        body["metadata"] = {**obj["metadata"], "resourceVersion": existing["metadata"]["resourceVersion"]}
        if all(existing.get(k) == obj.get(k) for k in ("data", "spec")) and all(
                (existing["metadata"].get(k) or {}) == (obj["metadata"].get(k) or {})
                for k in ("labels", "annotations")):
            return existing
        self._write("update", obj["kind"])
        return self._written(obj["kind"], self.request(
            "PUT", _path(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]), body=body))

    def merge_patch(self, kind: str, namespace: Optional[str], name: str, patch: dict[str, Any],
                    sub: Optional[str] = None) -> dict[str, Any]:
        self._write("patch", kind)
        return self._written(kind, self.request("PATCH", _path(kind, namespace, name, sub), body=patch,
                                          content_type="application/merge-patch+json"))

    def replace_status(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT the status subresource with the object's resourceVersion: a concurrent change of
        the object raises Conflict and the caller re-reads, re-reconciles and tries again."""
        self._write("update-status", obj["kind"])
        meta = obj["metadata"]
        path = _path(obj["kind"], meta.get("namespace"), meta["name"], "status")
        return self._written(obj["kind"], self.request("PUT", path, body=obj))

    def delete(self, kind: str, namespace: Optional[str], name: str, *, propagation: str = "Background",
               uid: Optional[str] = None) -> bool:
        """Delete; False if it was already gone. `uid` guards against deleting a same-named successor."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._write("delete", kind)
            self.request("DELETE", _path(kind, namespace, name), body=body)
            return True
        except NotFound:
            return False
        except Conflict:
            return False  # uid precondition failed: a different object holds the name now

    def create_event(self, event: dict[str, Any]) -> None:
        """Best effort: an event that cannot be written is logged, never fails a reconcile."""
        try:
            self.create(event, metadata_only=True)
        except ApiError as e:
            logger.debug("event not written: %s", e)


def new_api_client(pool_size: int = 32) -> Any:
    """An authenticated ApiClient: in-cluster ServiceAccount, else $KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    configuration.retries = transport_retries()
    return client.ApiClient(configuration)


def transport_retries() -> Any:
    """urllib3's own retries: only a connection that could not be set up, twice, at once. Answers
    (429, 5xx) are retried by `Cluster.request`, with backoff and counted; urllib3's default would
    also sleep on a 429/503's Retry-After, up to 3 times, silently and with no bound on the wait."""
    from urllib3.util.retry import Retry

    return Retry(total=2, connect=2, read=0, status=0, other=0, redirect=0, respect_retry_after_header=False,
                 raise_on_status=False)
