"""Shared pydantic base for models that double as Kubernetes API fields (no torch here)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel


class FieldError(ValueError):
    """A cross-field check that failed, naming the field at fault (relative to the model that
    checks it, camelCase, e.g. "maxSteps" or "resources.gpusPerWorker")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def error_path(error: dict[str, Any]) -> tuple[Any, ...]:
    """A pydantic error's location, extended by the field a FieldError names."""
    loc = tuple(error.get("loc", ()))
    inner = (error.get("ctx") or {}).get("error")
    if isinstance(inner, FieldError):
        loc += tuple(inner.field.split("."))
    return loc


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    """One ``x-kubernetes-validations`` entry; the Python validator next to it enforces the same."""
    entry: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def with_cel(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class CamelModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected, docstrings as help."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as a user would write it: camelCase, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# Kubernetes object name (DNS-1123 subdomain, as for most resources).
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
K8S_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DURATION_PATTERN = r"^([0-9]+(s|m|h))+$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
K8sName = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=K8S_NAME_PATTERN)
]
# DNS-1123 label (names that end up in labels or other names).
K8sLabel = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=K8S_LABEL_PATTERN)
]
# Go-style duration restricted to s/m/h units, e.g. "30m", "1h30m", "24h".
Duration = Annotated[str, StringConstraints(max_length=32, pattern=DURATION_PATTERN)]
# Kubernetes resource quantity, e.g. "4", "500m", "16Gi".
Quantity = Annotated[str, StringConstraints(max_length=32, pattern=QUANTITY_PATTERN)]
ShortStr = Annotated[str, StringConstraints(max_length=253)]
Text = Annotated[str, StringConstraints(max_length=4096)]

# No credentials inside a URI ("s3://key:secret@bucket" is refused: secrets go in secretRef), so
# the authority part may not contain "@". Patterns stay within what both Python and Go RE2 accept.
_PATH = r"/.*|\./.*|[A-Za-z0-9_][^:]*"
DATA_URI_PATTERN = r"^((file|pvc|s3|hf|https?)://[^/@]*(/.*)?|" + _PATH + r")$"
MODEL_URI_PATTERN = r"^((file|pvc|s3|hf)://[^/@]*(/.*)?|" + _PATH + r")$"
OUTPUT_URI_PATTERN = r"^((file|pvc|s3)://[^/@]*(/.*)?|" + _PATH + r")$"

# Human wording for each pattern, used in error messages instead of the raw regular expression.
PATTERN_HELP: dict[str, str] = {
    DATA_URI_PATTERN: "must be a path or a file://, pvc://, s3://, hf:// or http(s):// URI, "
    "with no credentials in it (use secretRef)",
    MODEL_URI_PATTERN: "must be a path or a file://, pvc://, s3:// or hf:// URI, "
    "with no credentials in it (use secretRef)",
    OUTPUT_URI_PATTERN: "must be a path or a file://, pvc:// or s3:// URI, "
    "with no credentials in it (use secretRef)",
    K8S_NAME_PATTERN: "must be a Kubernetes name: lower-case letters, digits, '-' and '.', "
    "starting and ending with a letter or digit",
    K8S_LABEL_PATTERN: "must be a DNS-1123 label: lower-case letters, digits and '-', "
    "starting and ending with a letter or digit, at most 63 characters",
    DURATION_PATTERN: "must be a duration such as 30m, 1h or 1h30m (units s, m, h)",
    QUANTITY_PATTERN: "must be a Kubernetes quantity such as 4, 500m or 16Gi",
}

# Query parameters that carry a credential (presigned S3/GCS URLs, SAS tokens, API keys): such a
# URI would put the secret in the spec, status, events and logs. Matched case-insensitively, by
# pydantic and (as the same RE2 expression) by the API server's CEL rule.
CREDENTIAL_QUERY_PARAMS = (
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
    "x-goog-credential", "signature", "sig", "token", "access_token", "api_key", "apikey", "key",
    "password", "secret", "awsaccesskeyid",
)
CREDENTIAL_QUERY_PATTERN = r"(?i)[?](.*&)?(" + "|".join(CREDENTIAL_QUERY_PARAMS) + r")="
CREDENTIAL_QUERY_MESSAGE = "must not carry credentials in its query string"
_CREDENTIAL_QUERY = re.compile(CREDENTIAL_QUERY_PATTERN)


def _no_credential_query(uri: str) -> str:
    found = _CREDENTIAL_QUERY.search(uri)
    if found:
        name = uri[found.start(2):found.end(2)]  # as the user spelled it; never the value
        raise ValueError(f"{CREDENTIAL_QUERY_MESSAGE} ({name}=…); use secretRef")
    return uri


_NO_CREDENTIAL_QUERY = (
    AfterValidator(_no_credential_query),
    Field(json_schema_extra=with_cel(cel(
        f"!self.matches('{CREDENTIAL_QUERY_PATTERN}')",
        f"{CREDENTIAL_QUERY_MESSAGE} (e.g. X-Amz-Signature=, sig=, token=); use secretRef"))),
)
DataUri = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=DATA_URI_PATTERN),
                    *_NO_CREDENTIAL_QUERY]
ModelUri = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=MODEL_URI_PATTERN),
                     *_NO_CREDENTIAL_QUERY]
OutputUri = Annotated[
    str, StringConstraints(min_length=1, max_length=2048, pattern=OUTPUT_URI_PATTERN), *_NO_CREDENTIAL_QUERY
]


class SecretRef(CamelModel):
    """A reference to a Secret in the same namespace. Only the name: never put secret values in a spec."""

    name: K8sName
    """Name of the Secret (same namespace). S3: keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    optional AWS_ENDPOINT_URL; Hugging Face: key HF_TOKEN."""


__all__ = [
    "CamelModel",
    "FieldError",
    "error_path",
    "DataUri",
    "Duration",
    "Field",
    "K8sLabel",
    "K8sName",
    "ModelUri",
    "OutputUri",
    "Quantity",
    "SecretRef",
    "ShortStr",
    "Text",
    "cel",
    "with_cel",
]
