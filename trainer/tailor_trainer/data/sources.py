"""Where raw rows come from: files (local, pvc, s3, http), a ConfigMap, or a Hugging Face dataset.

``iter_source`` expands the source URI (globs, directories), opens each file lazily and yields
:class:`RawRow` objects in a stable order (files sorted by name). Problems with the source as a
whole (nothing there, no access, unreachable) raise :class:`DataError` with a reason the
Dataset's Ready condition can carry.
"""

from __future__ import annotations

import glob as globlib
import http
import io
import os
import urllib.error
import urllib.request
from contextlib import closing
from typing import Any, BinaryIO, Callable, Iterator, Optional

from tailor_trainer import netpolicy, retry, storage
from tailor_trainer.config import DataFormat, ResolvedDataset
from tailor_trainer.data import DataError
from tailor_trainer.data.formats import RawRow, infer_format, read_rows

_GLOB_CHARS = set("*?[")
HTTP_TIMEOUT_S = 60


def _has_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


def _visible(path: str) -> bool:
    return not any(part.startswith((".", "_")) for part in path.replace("\\", "/").split("/") if part)


def _access_error(uri: str, err: BaseException, *, reading: bool = False) -> DataError:
    """Map a storage exception onto a Ready reason with a message the user can act on.

    ``reading``: the error came while a file's bytes were decoded (gzip, a stream cut short), so
    its text may quote them ("Not a gzipped file (b'..')"): only its kind is shown then. Listing
    and opening errors come from the storage client and describe the request, not the data."""
    name = type(err).__name__
    text = (getattr(err, "strerror", None) or name) if reading else (str(err) or name)
    denied = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403")
    if isinstance(err, PermissionError) or (not reading and any(d in text for d in denied)):
        return DataError("AccessDenied", f"cannot read {uri}: access denied ({text}); check the "
                         "credentials in the Secret named by source.secretRef")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return DataError("AccessDenied", f"cannot read {uri}: no usable S3 credentials ({text}); set "
                         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the Secret named by "
                         "source.secretRef")
    if isinstance(err, FileNotFoundError):
        return DataError("EmptySource", f"{uri}: no such file or bucket")
    return DataError("SourceUnreachable", f"cannot read {uri}: {name}: {text}")


# ---------------------------------------------------------------------------------------------
# Listing: the files a URI names, each with an opener


Opener = Callable[[], BinaryIO]


def _local_files(uri: str, path: str) -> list[tuple[str, Opener]]:
    if _has_glob(path):
        found = sorted(p for p in globlib.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        found = sorted(
            os.path.join(root, f)
            for root, dirs, files in os.walk(path)
            for f in files
            if _visible(os.path.relpath(os.path.join(root, f), path))
        )
    elif os.path.isfile(path):
        found = [path]
    else:
        raise DataError("EmptySource", f"{uri}: no such file or directory")
    if not found:
        raise DataError("EmptySource", f"{uri}: no files match")
    base = os.path.dirname(path) if not os.path.isdir(path) else path
    return [(os.path.relpath(p, base) if len(found) > 1 else os.path.basename(p),
             (lambda p=p: open(p, "rb"))) for p in found]


def _s3_files(uri: str) -> list[tuple[str, Opener]]:
    def _list() -> list[str]:
        if _has_glob(path):
            return sorted(fs.glob(path))
        if fs.isdir(path):
            return sorted(p for p in fs.find(path) if _visible(p[len(path):]))
        fs.info(path)  # raises FileNotFoundError / PermissionError
        return [path]

    try:
        loc = storage.resolve(uri)
        fs, path = loc.fs, loc.path
        found = retry.call(_list, f"cannot list {uri}")
    except DataError:
        raise
    except retry.RetriesExhausted as e:
        raise DataError("SourceUnreachable", f"cannot list {uri}: {retry.describe(e.last)} (gave up after "
                        f"{e.tries} tries)") from None
    except Exception as e:  # s3fs/botocore raise many types; all mean "cannot list"
        raise _access_error(uri, e) from None
    if not found:
        raise DataError("EmptySource", f"{uri}: no objects match")

    def opener(p: str) -> Opener:
        def _open() -> BinaryIO:
            try:
                return retry.call(lambda: fs.open(p, "rb", block_size=8 << 20), f"cannot open s3://{p}")
            except retry.RetriesExhausted as e:
                raise DataError("SourceUnreachable", f"cannot read s3://{p}: {retry.describe(e.last)} (gave "
                                f"up after {e.tries} tries)") from None
            except Exception as e:
                raise _access_error(f"s3://{p}", e) from None
        return _open

    return [(f"s3://{p}", opener(p)) for p in found]


def _retry_after(e: urllib.error.HTTPError) -> Optional[float]:
    try:
        return float(e.headers.get("Retry-After", ""))
    except (TypeError, ValueError, AttributeError):  # absent, or an HTTP date: the backoff decides
        return None


def _http_open_once(url: str) -> BinaryIO:
    req = urllib.request.Request(url, headers={"User-Agent": "tailor-trainer"})
    try:
        return netpolicy.open_url(req, HTTP_TIMEOUT_S, error=DataError)  # refuses metadata/loopback hosts
    except urllib.error.HTTPError as e:
        # The standard phrase, not the server's (which is the server's content).
        try:
            phrase = http.HTTPStatus(e.code).phrase
        except ValueError:
            phrase = "error"
        e.close()
        if e.code in (401, 403):
            raise DataError("AccessDenied", f"cannot read {url}: HTTP {e.code} {phrase}") from None
        if e.code == 404:
            raise DataError("EmptySource", f"{url}: HTTP 404 not found") from None
        if e.code in retry.TRANSIENT_STATUS:
            raise retry.Transient(f"HTTP {e.code} {phrase}", _retry_after(e)) from None
        raise DataError("SourceUnreachable", f"cannot read {url}: HTTP {e.code} {phrase}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if retry.is_transient(reason if isinstance(reason, BaseException) else e):
            raise retry.Transient(f"{type(reason).__name__}: {reason}") from None
        raise DataError("SourceUnreachable", f"cannot read {url}: {reason}") from None


def _http_open(url: str) -> BinaryIO:
    """Open an http(s) source, retrying 429/5xx/timeouts with bounded backoff (tailor_trainer.retry)."""
    try:
        return retry.call(lambda: _http_open_once(url), f"cannot read {url}")
    except retry.RetriesExhausted as e:
        raise DataError("SourceUnreachable", f"cannot read {url}: {e.last} (gave up after {e.tries} tries; "
                        "the server kept answering with a temporary error)") from None


def list_files(ds: ResolvedDataset) -> list[tuple[str, Opener]]:
    """(display name, opener) for every file of a file-based source, in a stable order."""
    uri = ds.source.uri
    if ds.source.config_map_ref is not None:
        if ds.inline_data is None:
            raise DataError("EmptySource", f"ConfigMap {ds.source.config_map_ref.name}: no inline data "
                            "(the key is missing or empty)")
        ref = ds.source.config_map_ref
        name = f"configmap/{ref.name}" + (f"/{ref.key}" if ref.key else "")
        data = ds.inline_data.encode("utf-8", errors="surrogateescape")
        return [(name, lambda: io.BytesIO(data))]
    assert uri is not None
    if uri.startswith(("http://", "https://")):
        return [(uri, lambda: _http_open(uri))]
    if uri.startswith("s3://"):
        return _s3_files(uri)
    try:
        path = storage.local_path(uri)
    except storage.StorageError as e:
        raise DataError("InvalidSource", str(e)) from None
    if path is None:
        raise DataError("InvalidSource", f"unsupported source URI {uri!r}")
    return _local_files(uri, path)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets

# Errors about reaching a dataset (which one, access, network), whose text describes the request.
# Any other error from `datasets` (a builder parsing files) may quote the data: its type only.
_HF_ACCESS_ERRORS = frozenset({
    "DatasetNotFoundError", "RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError",
    "EntryNotFoundError", "LocalEntryNotFoundError", "HfHubHTTPError", "HTTPError", "ConnectionError",
    "ConnectTimeout", "ReadTimeout", "Timeout", "OfflineModeIsEnabled", "FileNotFoundError",
})


def _hf_error(uri: str, err: Exception) -> DataError:
    name = type(err).__name__
    if name in _HF_ACCESS_ERRORS:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        detail = f"{name}: {first}" if first else name
    else:
        detail = (f"{name} (details not shown: they may quote the data; load it with the datasets "
                  "library yourself to see them)")
    if isinstance(err, FileNotFoundError):
        return DataError("EmptySource", f"{uri}: {detail}")
    return DataError("SourceUnreachable", f"cannot load {uri}: {detail}")


def _hf_rows(uri: str, token: Optional[str]) -> Iterator[dict[str, Any]]:
    """Rows of hf://org/name (split "train", streamed) or hf:///local/dir (save_to_disk or data files)."""
    import datasets

    target = uri[len("hf://"):]
    local = target if target.startswith("/") else None
    if local is not None and not os.path.exists(local):
        raise DataError("EmptySource", f"{uri}: no such directory")
    try:
        if local and (os.path.exists(os.path.join(local, "dataset_dict.json"))
                      or os.path.exists(os.path.join(local, "state.json"))):
            loaded = datasets.load_from_disk(local)
            parts = [loaded["train"]] if "train" in getattr(loaded, "keys", lambda: [])() else (
                list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded])
            for part in parts:
                yield from part
            return
        stream = datasets.load_dataset(local or target.strip("/"), split="train", streaming=True, token=token)
    except DataError:
        raise
    except Exception as e:
        raise _hf_error(uri, e) from None
    try:
        yield from stream
    except Exception as e:  # streaming reads and parses lazily: the same errors, mid-stream
        raise _hf_error(uri, e) from None


def iter_source(ds: ResolvedDataset, required: tuple[str, ...] = ()) -> Iterator[RawRow]:
    """Every raw row of the Dataset's source, streamed. ``required`` are source column names a
    CSV/Parquet header must contain (checked before any row is read)."""
    uri = ds.source.uri
    if uri is not None and uri.startswith("hf://"):
        for i, value in enumerate(_hf_rows(uri, os.environ.get("HF_TOKEN")), 1):
            yield RawRow(uri, i, dict(value))
        return
    for name, opener in list_files(ds):
        fmt = infer_format(name, ds.format)
        try:
            stream = opener()
        except OSError as e:  # a local file that cannot be opened (permissions)
            raise _access_error(name, e) from None
        with closing(stream):
            try:
                yield from read_rows(stream, name, fmt, required)
            except DataError:
                raise
            except (OSError, EOFError) as e:
                raise _access_error(name, e, reading=True) from None


__all__ = ["DataFormat", "iter_source", "list_files"]
