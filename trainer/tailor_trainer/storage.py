"""Where bytes live: URIs -> fsspec filesystems, atomic JSON writes, and model directories.

Every stage reaches its inputs and its run directory through :func:`resolve`, so local paths,
``file://``, ``pvc://claim/path`` (mounted at ``/mnt/pvc/claim/path`` in pods, or under
``$TAILOR_PVC_ROOT``) and ``s3://`` (s3fs; credentials from ``AWS_*`` in the environment, which
the operator fills from the referenced Secret) look the same to the caller. (http(s) data
sources are read with urllib in ``tailor_trainer.data.sources``: no aiohttp needed.)
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import fsspec

from tailor_trainer import retry

DEFAULT_PVC_ROOT = "/mnt/pvc"


class StorageError(Exception):
    """A URI that cannot be used: bad form, missing credentials, unreachable."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem and the path on it (``bucket/key`` for s3)."""

    fs: Any
    path: str
    protocol: str  # "file" or "s3"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def join(self, *parts: str) -> "Location":
        sep_join = os.path.join if self.is_local else posixpath.join
        return Location(self.fs, sep_join(self.path, *parts), self.protocol)

    def uri(self) -> str:
        """The location as a URI again (for manifests and logs)."""
        if self.protocol == "s3":
            return f"s3://{self.path}"
        return self.path


def pvc_root() -> str:
    return os.environ.get("TAILOR_PVC_ROOT", DEFAULT_PVC_ROOT)


def local_path(uri: str) -> Optional[str]:
    """The local path of a path, file:// or pvc:// URI; None for remote URIs."""
    if uri.startswith("file://"):
        return uri[len("file://"):] or "/"
    if uri.startswith("pvc://"):
        rest = uri[len("pvc://"):]
        if not rest or rest.startswith("/"):
            raise StorageError(f"pvc URI {uri!r} must be pvc://<claim>/<path>")
        return os.path.join(pvc_root(), rest)
    if "://" in uri:
        return None
    return uri


def s3_options(env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """s3fs keyword arguments from the standard AWS_* variables (the Secret's keys)."""
    env = os.environ if env is None else env
    opts: dict[str, Any] = {}
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key or secret:
        opts["key"], opts["secret"] = key, secret
    if env.get("AWS_SESSION_TOKEN"):
        opts["token"] = env["AWS_SESSION_TOKEN"]
    client_kwargs: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


def resolve(uri: str) -> Location:
    """Turn a data/model/output URI into a filesystem and a path."""
    path = local_path(uri)
    if path is not None:
        return Location(fsspec.filesystem("file"), os.path.abspath(path), "file")
    if uri.startswith("s3://"):
        # Fresh instance: credentials may differ between calls (tests, several Secrets).
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_options())
        return Location(fs, uri[len("s3://"):].rstrip("/"), "s3")
    raise StorageError(f"unsupported URI scheme in {uri!r}")


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a torn file."""
    if loc.is_local:
        os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
        tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc.path)
        return
    # Object stores: a single PUT is already all-or-nothing.
    with loc.fs.open(loc.path, "wb") as f:
        f.write(data)


def write_json_atomic(loc: Location | str, obj: Any) -> None:
    """Atomic JSON write (temp + rename locally; one PUT on object stores)."""
    if isinstance(loc, str):
        loc = resolve(loc)
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode() + b"\n"
    write_bytes_atomic(loc, data)


def read_json(loc: Location | str) -> Optional[Any]:
    """The parsed JSON at ``loc``, or None when it does not exist or is not valid JSON."""
    if isinstance(loc, str):
        loc = resolve(loc)
    try:
        with loc.fs.open(loc.path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def makedirs(loc: Location) -> None:
    if loc.is_local:
        os.makedirs(loc.path, exist_ok=True)
    # Object stores have no directories.


# ---------------------------------------------------------------------------------------------
# Remote run directories


def run_cache_root() -> Path:
    return Path(os.environ.get("TAILOR_RUN_CACHE", os.path.expanduser("~/.cache/tailor/runs")))


def _is_manifest(rel: str) -> bool:
    return posixpath.basename(rel) == "manifest.json"


class RunMirror:
    """A local working copy of a remote (``s3://``) run directory.

    Stages read and write local files (Ray Train, safetensors and torch need paths); the mirror
    moves them. ``pull`` fetches what the bucket has and the copy lacks (a restarted pod resumes
    from the last pushed checkpoint); ``push`` uploads what changed. Within a call, files named
    ``manifest.json`` go last, so a reader on either side that sees a manifest sees the complete
    stage or checkpoint it describes. Every host of a run (the driver and each Ray worker) derives
    the same local path from the URI, so the paths in a job description hold on every node.
    """

    def __init__(self, uri: str, local: Optional[str] = None) -> None:
        self.uri = uri.rstrip("/")
        self.remote = resolve(self.uri)
        if self.remote.is_local:
            raise StorageError(f"{uri!r} is a local path; no mirror needed")
        key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        self.local = os.path.abspath(local or str(run_cache_root() / key))
        os.makedirs(self.local, exist_ok=True)
        self._pushed: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) last uploaded

    @classmethod
    def for_output(cls, uri: str) -> Optional["RunMirror"]:
        """A mirror for a remote output URI; None when the URI is a local path already."""
        return None if local_path(uri) is not None else cls(uri)

    def _remote_files(self, sub: str) -> dict[str, int]:
        """rel path -> size of every object under ``sub`` (empty when there is none)."""
        base = self.remote.join(sub).path if sub else self.remote.path
        try:
            found = self.remote.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.relpath(path, self.remote.path): int(info.get("size") or 0)
                for path, info in found.items() if info.get("type", "file") != "directory"}

    def _local_files(self, sub: str) -> dict[str, tuple[int, int]]:
        root = os.path.join(self.local, sub) if sub else self.local
        out: dict[str, tuple[int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            # partial writes (.tmp-*) and Ray's own scratch space never leave the node
            dirnames[:] = [d for d in dirnames if not d.startswith(".tmp-") and d != "ray"]
            for name in filenames:
                if ".tmp-" in name or name.endswith(".tmp"):
                    continue
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                out[os.path.relpath(path, self.local).replace(os.sep, "/")] = (st.st_size, st.st_mtime_ns)
        return out

    def pull(self, sub: str = "") -> int:
        """Download the objects under ``sub`` that the local copy lacks or holds at another size;
        returns how many. Files already here at the object's size count as in sync."""
        remote = self._remote_files(sub)
        todo = []
        for rel, size in remote.items():
            path = os.path.join(self.local, rel)
            if os.path.isfile(path) and os.path.getsize(path) == size:
                st = os.stat(path)
                self._pushed.setdefault(rel, (st.st_size, st.st_mtime_ns))
            else:
                todo.append(rel)
        for rel in sorted(todo, key=lambda r: (_is_manifest(r), r)):
            target = os.path.join(self.local, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            self.remote.fs.get_file(self.remote.join(rel).path, tmp)
            os.replace(tmp, target)
            st = os.stat(target)
            self._pushed[rel] = (st.st_size, st.st_mtime_ns)
        return len(todo)

    def push(self, sub: str = "", delete: bool = False) -> int:
        """Upload the files under ``sub`` that changed since they were last pushed or pulled by
        this mirror; with ``delete``, also remove objects under ``sub`` that are gone locally
        (manifests first, so a half-deleted checkpoint never looks complete). Returns how many
        files were uploaded."""
        local = self._local_files(sub)
        todo = [rel for rel, sig in local.items() if self._pushed.get(rel) != sig]
        for rel in sorted(todo, key=lambda r: (_is_manifest(r), r)):
            self.remote.fs.put_file(os.path.join(self.local, rel), self.remote.join(rel).path)
            self._pushed[rel] = local[rel]
        if delete:
            gone = [rel for rel in self._remote_files(sub) if rel not in local]
            for rel in sorted(gone, key=lambda r: (not _is_manifest(r), r)):
                self.remote.fs.rm_file(self.remote.join(rel).path)
                self._pushed.pop(rel, None)
        return len(todo)


# ---------------------------------------------------------------------------------------------
# Model directories


def model_cache_root() -> Path:
    return Path(os.environ.get("TAILOR_MODEL_CACHE", os.path.expanduser("~/.cache/tailor/models")))


def _hf_snapshot_download(repo_id: str, revision: Optional[str], token: Optional[str]) -> str:
    """Seam for tests: the only call that would reach the Hugging Face hub."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=repo_id, revision=revision, token=token)


hf_snapshot_download: Callable[[str, Optional[str], Optional[str]], str] = _hf_snapshot_download


def _download(fn: Callable[[], Any], uri: str) -> Any:
    """``fn()`` retried on transient errors (429/5xx/timeouts); StorageError once they persist."""
    try:
        return retry.call(fn, f"cannot download {uri}")
    except retry.RetriesExhausted as e:
        raise StorageError(f"cannot download {uri}: {retry.describe(e.last)} (gave up after {e.tries} "
                           "tries)") from None


def resolve_model_dir(uri: str, revision: Optional[str] = None) -> str:
    """A local directory holding the model (or tokenizer) at ``uri``.

    Local paths, file:// and pvc:// are used as they are; s3:// prefixes are downloaded once into
    a cache directory keyed by the URI; hf://org/name goes through huggingface_hub (HF_TOKEN from
    the environment).
    """
    path = local_path(uri)
    if path is not None:
        if not os.path.isdir(path):
            raise StorageError(f"model directory {uri!r} does not exist")
        return os.path.abspath(path)
    if uri.startswith("hf://"):
        repo_id = uri[len("hf://"):].strip("/")
        if repo_id.count("/") > 1 or not repo_id:
            raise StorageError(f"hf URI {uri!r} must be hf://<org>/<name>")
        # huggingface_hub resumes partial files (``*.incomplete``) on the next call
        return _download(lambda: hf_snapshot_download(repo_id, revision, os.environ.get("HF_TOKEN")), uri)
    if uri.startswith("s3://"):
        loc = resolve(uri)
        key = hashlib.sha256(uri.encode()).hexdigest()[:16]
        dest = model_cache_root() / key
        done = dest / ".tailor-complete"
        if done.exists():
            return str(dest)
        tmp = dest.with_name(f"{key}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True, exist_ok=True)
        found = _download(lambda: loc.fs.find(loc.path), uri)
        if not found:
            raise StorageError(f"no files under {uri!r}")
        for remote in found:
            rel = posixpath.relpath(remote, loc.path)
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            # the whole download lands in ``tmp`` and is renamed once complete: a partial file is
            # never taken for the model
            _download(lambda: loc.fs.get_file(remote, str(target)), f"s3://{remote}")
        (tmp / ".tailor-complete").write_text(uri)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return str(dest)
    raise StorageError(f"unsupported model URI {uri!r}")
