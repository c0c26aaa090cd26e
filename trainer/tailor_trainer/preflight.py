"""``python -m tailor_trainer preflight``: check the base model against the spec on a CPU.

The operator runs this in a small CPU Job (the trainer image, the run's Secrets in the
environment) before it creates the RayJob, so that a model that cannot be resolved, or whose
target modules or context length do not fit the spec, fails before any GPU is requested. Only
the model's config and tokenizer files are fetched, never the weights; the model is built on the
meta device and checked with the adapt stage's own code (:func:`adaptation.apply_adaptation`),
so preflight and adapt cannot disagree.

Checks, in order; the first failure is the verdict:
  1. the model resolves (``ModelNotFound``, ``CredentialsError``, ``SourceUnreachable``)
  2. the adaptation fits its structure (``UnknownTargetModules``; other spec mistakes the adapt
     stage finds keep its reason, ``InvalidSpec``; an unloadable config is ``ModelInvalid``)
  3. ``hyperparameters.maxSeqLength`` <= the model's positions (``SequenceTooLong``)
  4. the tokenizer loads (``ModelInvalid``)
Only ``SourceUnreachable`` is worth retrying (``retryable`` in the document).
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import sys
import tempfile
import time
import traceback
from typing import Any, Optional

from tailor_trainer import retry, storage
from tailor_trainer.adaptation import apply_adaptation, load_base, matched_modules
from tailor_trainer.config import AdaptationMethod, DataSchema, TrainerConfig
from tailor_trainer.errors import InvalidSpec, StageError

# What from_config and AutoTokenizer read; weights (*.safetensors, *.bin, *.pt, ...) never match.
METADATA_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                     "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken", "chat_template.*")
# Config keys architectures use for the longest sequence their position embeddings cover.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                  "n_ctx", "max_seq_len")
_TARGET_FIELDS = ("spec.adaptation.lora.targetModules", "spec.adaptation.ia3TargetModules")
URI_FIELD, SECRET_FIELD, REVISION_FIELD = "spec.baseModel.uri", "spec.baseModel.secretRef", "spec.baseModel.revision"
RETRYABLE = frozenset({"SourceUnreachable"})
EXIT_OK, EXIT_USAGE, EXIT_INTERNAL = 0, 2, 3


class PreflightError(StageError):
    """A verdict of the check (``reason`` is set per instance)."""

    reason = "PreflightFailed"


def _fail(reason: str, message: str, field: str) -> PreflightError:
    return PreflightError(message, field=field, reason=reason)


# ---------------------------------------------------------------------------------------------
# 1. Resolving the model's metadata (no weights)


def _is_metadata(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in METADATA_PATTERNS)


def _credentials_hint(uri: str) -> str:
    if uri.startswith("hf://"):
        return "HF_TOKEN from spec.baseModel.secretRef"
    return "the AWS_* keys from spec.baseModel.secretRef"


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and what it wraps (s3fs turns botocore errors into OSError ``from`` the original)."""
    out: list[BaseException] = []
    e: Optional[BaseException] = err
    while e is not None and all(e is not x for x in out):
        out.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return out


_DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                           "InvalidToken"})
_MISSING_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "404"})


def _classify(err: BaseException, uri: str) -> PreflightError:
    """A permanent download error as a verdict: the model is missing, or access was refused."""
    chain = _chain(err)
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    codes = {e.response.get("Error", {}).get("Code") for e in chain if isinstance(getattr(e, "response", None), dict)}
    statuses = {retry.status_of(e) for e in chain}
    what = retry.describe(err)
    if "LocalEntryNotFoundError" in names:  # huggingface_hub: the hub could not be reached
        return _fail("SourceUnreachable", f"cannot reach {uri}: {what}", URI_FIELD)
    if "RevisionNotFoundError" in names:
        return _fail("ModelNotFound", f"{uri} has no such revision: {what}", REVISION_FIELD)
    if names & {"GatedRepoError", "NoCredentialsError", "PartialCredentialsError", "PermissionError"} \
            or codes & _DENIED_CODES:
        return _fail("CredentialsError", f"access to {uri} was refused ({what}); check "
                     f"{_credentials_hint(uri)}", SECRET_FIELD)
    # before 401: the hub answers 401 for a repository that does not exist, too
    if names & {"RepositoryNotFoundError", "FileNotFoundError"} or codes & _MISSING_CODES or 404 in statuses:
        return _fail("ModelNotFound", f"model {uri} not found (or private, and {_credentials_hint(uri)} "
                     f"gives no access): {what}", URI_FIELD)
    if statuses & {401, 403}:
        return _fail("CredentialsError", f"access to {uri} was refused ({what}); check "
                     f"{_credentials_hint(uri)}", SECRET_FIELD)
    return _fail("SourceUnreachable", f"cannot reach {uri}: {what}", URI_FIELD)


def _fetch(fn: Any, uri: str) -> Any:
    """``fn()`` with transient errors retried; every failure becomes a verdict."""
    try:
        return retry.call(fn, f"cannot fetch {uri}")
    except retry.RetriesExhausted as e:
        raise _fail("SourceUnreachable", f"cannot reach {uri}: {retry.describe(e.last)} (gave up after "
                    f"{e.tries} tries)", URI_FIELD) from None
    except PreflightError:
        raise
    except Exception as e:  # noqa: BLE001 - permanent (retry.call retries the rest): classified
        raise _classify(e, uri) from None


def _hf_metadata(repo_id: str, revision: Optional[str], dest: str) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id=repo_id, revision=revision, token=os.environ.get("HF_TOKEN"),
                                 allow_patterns=list(METADATA_PATTERNS), local_dir=dest)
    except LocalEntryNotFoundError as e:
        # snapshot_download turns what the hub answered (403, 5xx) or its silence into "not in the
        # local cache", a FileNotFoundError: judge the answer itself instead
        cause = e.__cause__
        if constants.HF_HUB_OFFLINE:
            raise
        if cause is not None and retry.status_of(cause) is not None and not retry.is_transient(cause):
            raise cause from None
        raise retry.Transient(f"the hub did not answer: {cause or e}") from e


def _s3_metadata(uri: str, dest: str) -> str:
    loc = storage.resolve(uri)
    entries = loc.fs.ls(loc.path, detail=False)  # one level: the config sits at the top
    wanted = [p for p in entries if _is_metadata(posixpath.basename(p))]
    if not any(posixpath.basename(p) == "config.json" for p in wanted):
        raise _fail("ModelNotFound", f"no config.json under {uri} (found {len(entries)} entries)", URI_FIELD)
    for remote in wanted:
        loc.fs.get_file(remote, os.path.join(dest, posixpath.basename(remote)))
    return dest


def resolve_model_metadata(uri: str, revision: Optional[str], scratch: str) -> str:
    """A local directory with the model's config.json and tokenizer files (no weights).

    Local, file:// and pvc:// directories are used in place; hf:// and s3:// copy only the
    metadata files into ``scratch``. Raises :class:`PreflightError`."""
    try:
        path = storage.local_path(uri)
    except storage.StorageError as e:
        raise _fail("ModelNotFound", str(e), URI_FIELD) from None
    if path is not None:
        if not os.path.isdir(path):
            raise _fail("ModelNotFound", f"model directory {uri} does not exist", URI_FIELD)
        model_dir = os.path.abspath(path)
    elif uri.startswith("hf://"):
        repo_id = uri[len("hf://"):].strip("/")
        if not repo_id or repo_id.count("/") > 1:
            raise _fail("ModelNotFound", f"hf URI {uri!r} must be hf://<org>/<name>", URI_FIELD)
        model_dir = _fetch(lambda: _hf_metadata(repo_id, revision, scratch), uri)
    elif uri.startswith("s3://"):
        model_dir = _fetch(lambda: _s3_metadata(uri, scratch), uri)
    else:
        raise _fail("ModelNotFound", f"unsupported model URI {uri!r}", URI_FIELD)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise _fail("ModelNotFound", f"{uri} has no config.json: not a Hugging Face model directory", URI_FIELD)
    return model_dir


# ---------------------------------------------------------------------------------------------
# 2-4. The checks on the skeleton


def max_positions(config: Any) -> Optional[int]:
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_adaptation(cfg: TrainerConfig, model: Any, info: dict[str, Any]) -> None:
    """The adapt stage's own checks, on the weightless model."""
    adaptation = cfg.adaptation
    if adaptation.method is AdaptationMethod.qlora:
        # Same target modules as LoRA; the 4-bit part needs a GPU and is not what is checked here.
        adaptation = adaptation.model_copy(update={"method": AdaptationMethod.lora})
    try:
        _, plan = apply_adaptation(model, adaptation, seed=cfg.hyperparameters.seed)
    except InvalidSpec as e:
        if e.field in _TARGET_FIELDS:
            raise _fail("UnknownTargetModules", e.message, e.field) from None
        raise
    if plan.target_modules:
        # ``model`` now holds the adapter layers in place of the targets (PEFT injects in place)
        info["targetModulesMatched"] = len(matched_modules(model, plan.target_modules))
    info["trainableParameters"] = plan.trainable_parameters


def _check_sequence_length(cfg: TrainerConfig, positions: Optional[int]) -> None:
    wanted = cfg.hyperparameters.max_seq_length
    if positions is not None and wanted > positions:
        raise _fail("SequenceTooLong",
                    f"hyperparameters.maxSeqLength {wanted} is longer than the {positions} positions the model "
                    f"{cfg.model.uri} supports; set it to at most {positions}",
                    "spec.hyperparameters.maxSeqLength")


def _check_tokenizer(model_dir: str, uri: str) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - any failure means the pipeline could not tokenize
        raise _fail("ModelInvalid", f"the tokenizer of {uri} does not load: {type(e).__name__}: {e}",
                    URI_FIELD) from None


def _diffusion_checks(cfg: TrainerConfig, info: dict[str, Any]) -> None:
    """Dataset schema image-caption: the pipeline and LoRA's targets on its UNet (meta device).
    Only a local or mounted pipeline is checked here (the metadata fetch above is flat, a
    pipeline has per-component folders); the adapt stage checks any other before training."""
    from tailor_trainer.diffusion.model import FIELD_TARGETS, add_lora, load_parts

    info["modelType"] = "stable-diffusion"
    try:
        path = storage.local_path(cfg.model.uri)
    except storage.StorageError as e:
        raise _fail("ModelInvalid", str(e), URI_FIELD) from None
    if path is None or not os.path.isdir(path):
        return
    unet = load_parts(path, meta=True).unet
    info["parameters"] = sum(p.numel() for p in unet.parameters())
    try:
        plan = add_lora(unet, cfg.adaptation.lora)
    except InvalidSpec as e:
        if e.field == FIELD_TARGETS:
            raise _fail("UnknownTargetModules", e.message, e.field) from None
        raise
    info["targetModulesMatched"] = plan["adaptedModules"]
    info["trainableParameters"] = plan["trainableParameters"]


def _checks(cfg: TrainerConfig, scratch: str, info: dict[str, Any]) -> None:
    if cfg.dataset.schema_ is DataSchema.image_caption:
        return _diffusion_checks(cfg, info)
    model_dir = resolve_model_metadata(cfg.model.uri, cfg.model.revision, scratch)
    model = load_base(model_dir, meta=True)  # ModelInvalid when the config does not load
    info["modelType"] = getattr(model.config, "model_type", None)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["maxPositionEmbeddings"] = max_positions(model.config)
    _check_adaptation(cfg, model, info)
    _check_sequence_length(cfg, info["maxPositionEmbeddings"])
    _check_tokenizer(model_dir, cfg.model.uri)


def run_preflight(cfg: TrainerConfig) -> dict[str, Any]:
    """The verdict document (docs/stage-contracts.md, "preflight"). Raises only on a bug."""
    start = time.monotonic()
    info: dict[str, Any] = {"modelType": None, "parameters": None, "maxPositionEmbeddings": None,
                            "targetModulesMatched": None, "trainableParameters": None}
    doc: dict[str, Any] = {"ok": True, "reason": None, "message": None, "field": None, "retryable": False}
    with tempfile.TemporaryDirectory(prefix="tailor-preflight-") as scratch:
        try:
            _checks(cfg, scratch, info)
            positions = info["maxPositionEmbeddings"]
            params = "an unknown number of" if info["parameters"] is None else f"{info['parameters']:,}"
            doc["message"] = (f"{cfg.model.uri} fits the spec: {info['modelType']}, {params} "
                              f"parameters, maxSeqLength {cfg.hyperparameters.max_seq_length}"
                              + (f" <= {positions}" if positions else " (the model states no limit)"))
        except StageError as e:
            doc.update(ok=False, reason=e.reason, message=e.message, field=e.field,
                       retryable=e.reason in RETRYABLE)
    doc["model"] = info
    doc["durationSeconds"] = round(time.monotonic() - start, 3)
    return doc


def main_preflight(config_path: str, result_file: Optional[str] = None) -> int:
    """Entry point: print the verdict document; exit 0 whenever there is a verdict."""
    from tailor_trainer.pipeline import _cpu_friendly_threads, _quiet_libraries, load_config

    _cpu_friendly_threads()
    try:
        cfg = load_config(config_path)
    except InvalidSpec as e:
        print(f"error: {e.reason}: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    _quiet_libraries()
    code = EXIT_OK
    try:
        doc = run_preflight(cfg)
    except Exception as e:  # noqa: BLE001 - a bug: traceback in the log, a verdict for the operator
        if os.environ.get("TAILOR_DEBUG"):
            raise
        traceback.print_exc()
        doc = {"ok": False, "reason": "PreflightFailed", "field": None, "retryable": True,
               "message": f"{type(e).__name__} while checking the model (details in the check's log)",
               "model": None, "durationSeconds": None}
        code = EXIT_INTERNAL
    if result_file:
        storage.write_json_atomic(result_file, doc)
    print(json.dumps(doc, indent=2))
    return code
