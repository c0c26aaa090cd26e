"""Which hosts an http(s) data source may reach: not link-local, loopback, unspecified or metadata.

A Dataset's author is not trusted with the pod's network position: `http://169.254.169.254/...`
would hand the cloud's instance credentials to whoever reads the Dataset's status, and a loopback
address reaches the pod's own side-cars. The operator refuses literal addresses and the known
metadata names before a validation starts; here the trainer resolves the host and refuses it if
any address it resolves to is in those ranges, and checks every redirect the same way.

`TAILOR_ALLOW_PRIVATE_ADDRESSES=1` (chart value policy.allowPrivateAddresses, which the local
backend's subprocesses inherit from the operator) lifts the check. Messages name the host, never
the query string.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import urllib.parse
import urllib.request
from typing import Any, BinaryIO, Callable, Optional

ENV_ALLOW = "TAILOR_ALLOW_PRIVATE_ADDRESSES"
REASON = "AddressNotAllowed"

METADATA_NAMES = frozenset({"metadata.google.internal", "metadata", "metadata.azure.internal", "instance-data",
                            "instance-data.ec2.internal"})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "100.100.100.200", "fd00:ec2::254", "169.254.170.2"))
_NETWORKS = (
    (ipaddress.ip_network("169.254.0.0/16"), "a link-local address"),
    (ipaddress.ip_network("fe80::/10"), "a link-local address"),
    (ipaddress.ip_network("127.0.0.0/8"), "a loopback address"),
    (ipaddress.ip_network("::1/128"), "a loopback address"),
)


class AddressNotAllowed(Exception):
    """An http(s) source whose host is (or resolves to) a refused address. (Standard library only:
    the operator imports this module for its syntactic check, so no tailor_trainer.data here;
    open_url raises the caller's error type instead.)"""

    reason = REASON

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def private_addresses_allowed(env: Optional[dict[str, str]] = None) -> bool:
    value = (os.environ if env is None else env).get(ENV_ALLOW, "")
    return value.lower() in ("1", "true", "yes")


def uri_host(uri: str) -> str:
    """The host of an http(s) URI, lower case, without brackets, port or credentials."""
    return (urllib.parse.urlsplit(uri).hostname or "").rstrip(".").lower()


def blocked_address(address: str) -> Optional[str]:
    """Why a literal IP address is refused ("a loopback address", ...), else None (also for names)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_unspecified:
        return "the unspecified address"
    for network, what in _NETWORKS:
        if ip.version == network.version and ip in network:
            return what
    return None


def blocked_host(host: str) -> Optional[str]:
    """Why a host is refused without resolving it (a literal address or a known name), else None."""
    host = host.strip("[]").rstrip(".").lower()
    if host in METADATA_NAMES:
        return "a cloud metadata name"
    if host == "localhost" or host.endswith(".localhost"):
        return "a loopback name"
    return blocked_address(host)


def check_host(host: str, resolve: Callable[[str], list[str]] | None = None) -> None:
    """Raise AddressNotAllowed if the host, or any address it resolves to, is refused."""
    why = blocked_host(host)
    if why is not None:
        what = f"is {why}"
    else:
        addresses = (resolve or _resolve)(host)
        bad = next(((a, w) for a in addresses if (w := blocked_address(a)) is not None), None)
        if bad is None:
            return
        what = f"resolves to {bad[0]}, {bad[1]}"
    raise AddressNotAllowed(f"http(s) source host {host} {what}; such addresses are refused "
                            f"(the installation's policy.allowPrivateAddresses is false)")


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []  # unresolvable: the request itself fails with SourceUnreachable
    return sorted({str(info[4][0]) for info in infos})


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        check_host(uri_host(newurl))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(request: urllib.request.Request, timeout: float,
             error: Callable[[str, str], Exception] = lambda reason, message: AddressNotAllowed(message)) -> BinaryIO:
    """urllib's urlopen, refusing hosts (the first and every redirect's) that the policy refuses:
    raises `error(reason, message)` (e.g. DataError) then, before any byte is sent."""
    if private_addresses_allowed():
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (scheme checked by caller)
    try:
        check_host(uri_host(request.full_url))
        return urllib.request.build_opener(_CheckedRedirects).open(request, timeout=timeout)
    except AddressNotAllowed as e:
        raise error(REASON, e.message) from None
