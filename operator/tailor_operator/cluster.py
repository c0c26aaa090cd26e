"""The one module that talks to the Kubernetes API server.

A thin, synchronous REST layer over the official client's authenticated connection pool: plain
dicts in and out (no generated models), one path scheme for every kind, typed errors for the two
answers the operator acts on (404, 409), and a count of every write so `/metrics` and the scale
benchmark can report API writes per job.
"""

from __future__ import annotations

import json
import logging
import threading
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
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: str = "") -> None:
        self.status = status
        self.reason = reason
        self.body = body
        try:
            self.message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            self.message = body
        super().__init__(f"{status} {reason}: {self.message}")


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: AlreadyExists on create, or a stale resourceVersion on update."""


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
                 timeout: float = 30.0) -> None:
        if api_client is None:
            api_client = new_api_client()
        self.api = api_client
        self.timeout = timeout
        self.writes: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._on_write = on_write

    # ------------------------------------------------------------------------------ transport

    def request(self, method: str, path: str, *, body: Any = None, query: Optional[dict[str, Any]] = None,
                content_type: str = "application/json") -> Any:
        url_path = path + ("?" + urlencode(query) if query else "")
        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = self.api.param_serialize(method=method, resource_path=url_path, header_params=headers,
                                          body=body, auth_settings=["BearerToken"])
        response = self.api.call_api(*params, _request_timeout=self.timeout)
        data = response.read()
        if response.status >= 400:
            text = data.decode("utf-8", "replace") if data else ""
            cls = NotFound if response.status == 404 else Conflict if response.status == 409 else ApiError
            raise cls(response.status, response.reason or "", text)
        return json.loads(data) if data else None

    def _write(self, verb: str, kind: str) -> None:
        with self._lock:
            self.writes[(verb, kind)] += 1
        if self._on_write is not None:
            self._on_write(verb, kind)

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

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, ns = obj["kind"], obj["metadata"].get("namespace")
        self._write("create", kind)
        return self.request("POST", _path(kind, ns), body=obj)

    def create_or_adopt(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create; on AlreadyExists return the existing object. (object, created?)"""
        try:
            return self.create(obj), True
        except Conflict:
            existing = self.get(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
            if existing is None:  # deleted in between: try once more
                return self.create(obj), True
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

    def apply(self, obj: dict[str, Any], *, keep_data: bool = False) -> dict[str, Any]:
        """Create, or replace the existing object's labels/annotations/data/spec (ConfigMaps of a run).
        With keep_data, an existing object is left alone (the progress sink the trainer writes)."""
        existing = None
        try:
            return self.create(obj)
        except Conflict:
            existing = self.get(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if existing is None:
            return self.create(obj)
        if keep_data:
            return existing
        body = dict(obj)
        body["metadata"] = {**obj["metadata"], "resourceVersion": existing["metadata"]["resourceVersion"]}
        if all(existing.get(k) == obj.get(k) for k in ("data", "spec")) and all(
                (existing["metadata"].get(k) or {}) == (obj["metadata"].get(k) or {})
                for k in ("labels", "annotations")):
            return existing
        self._write("update", obj["kind"])
        return self.request("PUT", _path(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]),
                            body=body)

    def merge_patch(self, kind: str, namespace: Optional[str], name: str, patch: dict[str, Any],
                    sub: Optional[str] = None) -> dict[str, Any]:
        self._write("patch", kind)
        return self.request("PATCH", _path(kind, namespace, name, sub), body=patch,
                            content_type="application/merge-patch+json")

    def replace_status(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT the status subresource with the object's resourceVersion: a concurrent change of
        the object raises Conflict and the caller re-reads, re-reconciles and tries again."""
        self._write("update-status", obj["kind"])
        meta = obj["metadata"]
        return self.request("PUT", _path(obj["kind"], meta.get("namespace"), meta["name"], "status"), body=obj)

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
            self.create(event)
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
    return client.ApiClient(configuration)
