"""Bounded retries with jittered exponential backoff for transient storage and network errors.

Downloads (model files, data files) fail now and then for reasons that pass on their own: HTTP
429 and 5xx, timeouts, connection resets. :func:`call` retries those a bounded number of times
and gives up with :class:`RetriesExhausted`, which says how many tries were made. Permanent errors
(403, 404, bad credentials, a missing file) are raised at once: retrying cannot fix them and
would only delay a clear reason.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# Exception class names (any module) that mean "try again": requests/urllib3/aiohttp/botocore/
# huggingface_hub raise their own types for the same conditions.
TRANSIENT_NAMES = frozenset({
    "TimeoutError", "ConnectionError", "ConnectionResetError", "ConnectionAbortedError",
    "ConnectTimeout", "ReadTimeout", "Timeout", "ConnectTimeoutError", "ReadTimeoutError",
    "EndpointConnectionError", "ConnectionClosedError", "IncompleteRead", "IncompleteReadError",
    "ResponseStreamingError", "ProtocolError", "RemoteDisconnected", "ServerDisconnectedError",
    "ClientConnectionError", "ClientPayloadError", "ServerTimeoutError", "ChunkedEncodingError",
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
    "ServiceUnavailable",
})
MAX_RETRY_AFTER_S = 60.0


class Transient(Exception):
    """Raised by code that knows an error is worth retrying (e.g. an HTTP 503 it mapped itself)."""

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RetriesExhausted(Exception):
    """Every try failed with a transient error; ``last`` is the final one."""

    def __init__(self, what: str, tries: int, last: BaseException) -> None:
        super().__init__(f"{what}: gave up after {tries} tries ({describe(last)})")
        self.tries, self.last = tries, last


@dataclass(frozen=True)
class Policy:
    tries: int = 5
    """Total attempts, the first included."""
    base_s: float = 1.0
    """Delay before the second try; doubles each time."""
    max_s: float = 30.0
    """Cap on one delay."""

    @classmethod
    def from_env(cls) -> "Policy":
        """``TAILOR_DOWNLOAD_TRIES`` / ``TAILOR_DOWNLOAD_BACKOFF_S`` override the defaults."""
        tries = int(os.environ.get("TAILOR_DOWNLOAD_TRIES", cls.tries))
        base = float(os.environ.get("TAILOR_DOWNLOAD_BACKOFF_S", cls.base_s))
        return cls(tries=max(1, tries), base_s=max(0.0, base))

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based): full jitter over an
        exponential ceiling, but never less than a server's Retry-After (itself capped)."""
        ceiling = min(self.max_s, self.base_s * (2 ** (attempt - 1)))
        wait = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            wait = max(wait, min(retry_after, MAX_RETRY_AFTER_S))
        return wait


def status_of(err: BaseException) -> Optional[int]:
    """The HTTP status an exception carries, in the shapes urllib, requests, aiohttp and botocore
    use; None when it carries none."""
    for attr in ("code", "status", "status_code"):
        value = getattr(err, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(err, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return value if isinstance(value, int) else None
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


def _transient_one(err: BaseException) -> Optional[bool]:
    """True/False when ``err`` itself says whether to retry; None when it does not tell."""
    if isinstance(err, Transient):
        return True
    if isinstance(err, (PermissionError, FileNotFoundError)):
        return False
    response = getattr(err, "response", None)
    if isinstance(response, dict) and response.get("Error", {}).get("Code") in TRANSIENT_NAMES:
        return True  # botocore: SlowDown, Throttling, RequestTimeout, InternalError, ...
    status = status_of(err)
    if status is not None:
        return status in TRANSIENT_STATUS
    if any(c.__name__ in TRANSIENT_NAMES for c in type(err).__mro__):
        return True
    return None


def is_transient(err: BaseException) -> bool:
    """True for errors worth another try: 429/5xx/408, timeouts, dropped connections. Wrapped
    errors (s3fs turns botocore's into OSError ``from`` the original) are judged by their causes."""
    seen: set[int] = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        verdict = _transient_one(e)
        if verdict is not None:
            return verdict
        e = e.__cause__ or e.__context__
    return False


def describe(err: BaseException) -> str:
    status = status_of(err)
    return f"{type(err).__name__}" + (f" HTTP {status}" if status else "") + (f": {err}" if str(err) else "")


def call(fn: Callable[[], T], what: str, policy: Optional[Policy] = None,
         sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried on transient errors per ``policy``; permanent errors propagate at once,
    and :class:`RetriesExhausted` follows the last transient failure."""
    policy = policy or Policy.from_env()
    for attempt in range(1, policy.tries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e):
                raise
            if attempt == policy.tries:
                raise RetriesExhausted(what, attempt, e) from e
            sleep(policy.delay(attempt, getattr(e, "retry_after", None)))
    raise AssertionError("unreachable")
