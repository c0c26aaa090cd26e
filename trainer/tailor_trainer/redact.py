"""Mask credential-shaped text in messages that leave the trainer's pod.

Messages the trainer writes (a Dataset's Ready condition, the progress document's error, failure
log lines) are readable by people who may not read the Secrets the pod mounts. Those messages
are built so they never echo source content; :func:`redact` is the second line of defence for
what they do carry verbatim — URIs from the spec, exception text from storage clients — and
masks anything shaped like a credential: URL userinfo, signed-URL and token query parameters,
AWS access key ids, Hugging Face tokens, bearer tokens and PEM private keys.
"""

from __future__ import annotations

import re

MASK = "REDACTED"

_QUERY_KEYS = (
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Signature",
    "X-Goog-Credential", "AWSAccessKeyId", "Signature", "sig", "token", "access_token", "api_key",
    "apikey", "key", "password", "secret",
)

# Order matters: a PEM block first (its body may hold anything), then the narrower shapes.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)"),
     rf"-----BEGIN \1PRIVATE KEY----- {MASK} -----END \1PRIVATE KEY-----"),
    # scheme://user:pass@host -> scheme://REDACTED@host (the host stays: it says where)
    (re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@?#'\"<>]+@"), rf"\1{MASK}@"),
    (re.compile(r"([?&;](?:%s)=)[^&#\s'\"<>]*" % "|".join(map(re.escape, _QUERY_KEYS)), re.IGNORECASE),
     rf"\1{MASK}"),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), MASK),
)
_BEARER = re.compile(r"\b(Bearer)\s+([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)


def _bearer(m: re.Match[str]) -> str:
    # "Bearer abc.def==" is a token; "the bearer of" is English (short and letters only).
    token = m.group(2)
    return f"{m.group(1)} {MASK}" if len(token) >= 16 or not token.isalpha() else m.group(0)


def redact(text: str) -> str:
    """``text`` with every credential-shaped substring masked; other text unchanged."""
    if not text:
        return text
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return _BEARER.sub(_bearer, text)
