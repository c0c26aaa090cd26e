"""The prep stage, and ``python -m tailor_trainer inspect`` (the same validation, no shards).

``run_prep(cfg, run_dir)`` reads, cleans, splits and tokenizes the Dataset and writes
``<run_dir>/prep/{train,validation,test}.parquet``, ``status.json`` and, last,
``manifest.json`` (docs/stage-contracts.md). A prep whose manifest carries the same configHash
is not redone. A Dataset that is not usable raises :class:`PrepFailed` (reason DataInvalid)
after writing ``status.json``, so the user sees exactly which lines and rules failed. A run pinned
to a content fingerprint (``dataset.contentFingerprint``) that reads other rows raises
:class:`DatasetChanged` instead of training on them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from tailor_trainer import storage
from tailor_trainer.config import DataSchema, ResolvedDataset, TrainerConfig
from tailor_trainer.data import DataError
from tailor_trainer.data.engine import PrepOptions, PrepResult, prepare
from tailor_trainer.data.split import SPLITS
from tailor_trainer.errors import StageError

log = logging.getLogger("tailor_trainer.prep")

STAGE = "prep"
FILES = {s: f"{s}.parquet" for s in SPLITS}


class PrepFailed(Exception):
    """The Dataset is not usable; ``status`` is the Dataset.status explaining why."""

    reason = "DataInvalid"

    def __init__(self, data_reason: str, message: str, status: dict[str, Any]):
        super().__init__(f"{data_reason}: {message}")
        self.data_reason = data_reason
        self.message = f"{data_reason}: {message}"
        self.field = "dataset"
        self.status = status


class DatasetChanged(StageError):
    """The rows prep read are not the rows the Dataset's validation saw (another fingerprint)."""

    reason = "DatasetChanged"


def check_pinned(ds: ResolvedDataset, result: PrepResult) -> None:
    """Raise :class:`DatasetChanged` unless the rows read match the fingerprint the run was pinned
    to (``ds.content_fingerprint``; nothing to check when the operator did not set one)."""
    expected = ds.content_fingerprint
    if expected is None or result.fingerprint == expected:
        return
    where = ds.source.uri or f"ConfigMap {ds.source.config_map_ref.name}"
    raise DatasetChanged(
        f"the data at {where} changed after Dataset {ds.name} was validated: revision "
        f"{ds.revision or expected} has content fingerprint {expected}, but this run read "
        f"{result.rows_read} rows with fingerprint {result.fingerprint}. Nothing was trained on "
        "them; the Dataset is re-validated and the new revision gets a new run.", field="dataset")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_status(ds: ResolvedDataset, result: PrepResult) -> dict[str, Any]:
    """The Dataset.status this validation produces (camelCase, the operator's DatasetStatus)."""
    now = _now()
    if result.error is None:
        dropped = sum(result.dropped.values())
        detail = ", ".join(f"{k} {v}" for k, v in result.dropped.most_common())
        message = (f"{result.rows} rows (train {result.splits['train']}, validation "
                   f"{result.splits['validation']}, test {result.splits['test']})"
                   + (f"; dropped {dropped}: {detail}" if dropped else ""))
        condition = {"type": "Ready", "status": "True", "reason": "Validated", "message": message}
    else:
        condition = {"type": "Ready", "status": "False", "reason": result.error.reason,
                     "message": result.error.message[:4096]}
    condition["lastTransitionTime"] = now
    return {
        "revision": ds.revision or result.fingerprint,
        "contentFingerprint": result.fingerprint,
        "rows": result.rows,
        "rowsRead": result.rows_read,
        "splits": dict(result.splits),
        "dropped": dict(sorted(result.dropped.items())),
        "firstErrors": result.first_errors,
        "tokens": result.token_stats(),
        "conditions": [condition],
        "lastUpdated": now,
    }


def load_tokenizer(uri: str, revision: Optional[str] = None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(storage.resolve_model_dir(uri, revision))


def is_done(run_dir: str, config_hash: str) -> Optional[dict[str, Any]]:
    """The manifest of a finished prep with this configHash, else None."""
    prep = storage.resolve(run_dir).join(STAGE)
    manifest = storage.read_json(prep.join("manifest.json"))
    if not isinstance(manifest, dict) or manifest.get("configHash") != config_hash:
        return None
    files = manifest.get("files", {})
    if not all(prep.fs.exists(prep.join(files.get(s, FILES[s])).path) for s in SPLITS):
        return None
    return manifest


def run_prep(cfg: TrainerConfig, run_dir: Optional[str] = None,
             progress: Optional[Callable[[dict], None]] = None, tokenizer: Any = None) -> dict[str, Any]:
    """Prepare the run's data under ``<run_dir>/prep`` (default: cfg.output_uri); returns the
    manifest. Skips the work when a finished prep with the same configHash is there."""
    run_dir = run_dir or cfg.output_uri
    config_hash = cfg.config_hash()
    done = is_done(run_dir, config_hash)
    if done is not None:
        return done
    prep = storage.resolve(run_dir).join(STAGE)
    storage.makedirs(prep)
    manifest_loc = prep.join("manifest.json")
    if prep.fs.exists(manifest_loc.path):  # stale (other config): never pair it with new files
        prep.fs.rm(manifest_loc.path)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.uri, cfg.model.revision)
    hp, cv = cfg.hyperparameters, cfg.evaluation.cross_validation
    work = tempfile.mkdtemp(prefix=".tmp-", dir=prep.path) if prep.is_local else tempfile.mkdtemp()
    try:
        opts = PrepOptions(tokenizer=tokenizer, max_seq_length=hp.max_seq_length, overlong=hp.overlong,
                           packing=hp.packing, folds=cv.folds if cv else 0, seed=cfg.dataset.split.seed,
                           out_dir=work, progress=progress)
        result = prepare(cfg.dataset, opts)
        status = build_status(cfg.dataset, result)
        storage.write_json_atomic(prep.join("status.json"), status)
        if result.error is not None:
            raise PrepFailed(result.error.reason, result.error.message, status)
        check_pinned(cfg.dataset, result)
        for split, name in FILES.items():
            src, dest = os.path.join(work, name), prep.join(name)
            if prep.is_local:
                os.replace(src, dest.path)
            else:
                prep.fs.put_file(src, dest.path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = {
        "stage": STAGE,
        "configHash": config_hash,
        "revision": status["revision"],
        "fingerprint": result.fingerprint,
        "expectedFingerprint": cfg.dataset.content_fingerprint,
        "rowsRead": result.rows_read,
        "rows": result.rows,
        "splits": dict(result.splits),
        "sequences": dict(result.sequences),
        "packed": hp.packing,
        # packed: real tokens / (sequences x maxSeqLength), how full best-fit packing made the rows
        "packingFill": (round(result.total_tokens / (sum(result.sequences.values()) * hp.max_seq_length), 4)
                        if hp.packing and result.tokenized and sum(result.sequences.values()) else None),
        "folds": cv.folds if cv else 0,
        "maxSeqLength": hp.max_seq_length,
        "dropped": dict(sorted(result.dropped.items())),
        "firstErrors": result.first_errors,
        "tokens": result.token_stats(),
        "files": dict(FILES),
        "finishedAt": _now(),
    }
    storage.write_json_atomic(manifest_loc, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# inspect


def _text_report(name: str, status: dict[str, Any]) -> str:
    cond = status["conditions"][0]
    state = "Ready" if cond["status"] == "True" else "NOT Ready"
    lines = [f"Dataset {name}: {state} ({cond['reason']})"]
    if cond["status"] != "True":
        lines.append(f"  error      {cond['message']}")
    s = status["splits"]
    lines.append(f"  revision   {status['revision']}")
    lines.append(f"  rows       {status['rows']} kept of {status['rowsRead']} read "
                 f"(train {s['train']}, validation {s['validation']}, test {s['test']})")
    if status["dropped"]:
        lines.append("  dropped    " + ", ".join(f"{k} {v}" for k, v in status["dropped"].items()))
    t = status["tokens"]
    if t:
        lines.append(f"  tokens     mean {t['mean']}, p50 {t['p50']}, p95 {t['p95']}, max {t['max']}, "
                     f"over maxSeqLength {t['overLimit']}, total {t['total']}")
    if status["firstErrors"]:
        lines.append("  first errors:")
        lines += [f"    {e['file']}:{e['line']}  {e['reason']}  {e['message']}" for e in status["firstErrors"]]
    return "\n".join(lines)


def inspect_dataset(ds: ResolvedDataset, tokenizer: Optional[str] = None,
                    max_seq_length: Optional[int] = None) -> dict[str, Any]:
    """Validate a Dataset without writing shards; returns its Dataset.status."""
    if ds.schema_ is DataSchema.image_caption:
        return build_status(ds, _inspect_images(ds, tokenizer))
    tok = None
    if tokenizer:
        try:
            tok = load_tokenizer(tokenizer)
        except Exception as e:  # any failure to load is reported, not raised
            # the exception's text is not shown: it may quote a file the path points at
            log.warning("cannot load tokenizer %s: %s", tokenizer, type(e).__name__)
            result = PrepResult(error=DataError(
                "TokenizerUnavailable", f"cannot load tokenizer {tokenizer}: {type(e).__name__} (run `tailor "
                                        "dataset inspect` locally with TAILOR_DEBUG=1 for the details)"))
            return build_status(ds, result)
    result = prepare(ds, PrepOptions(tokenizer=tok, max_seq_length=max_seq_length,
                                     seed=ds.split.seed))
    return build_status(ds, result)


def _inspect_images(ds: ResolvedDataset, model: Optional[str]) -> PrepResult:
    """Every image decoded and checked (tailor_trainer.data.images); with a model (a diffusers
    pipeline folder, passed as the tokenizer) also against its training resolution."""
    from tailor_trainer.data.images import prepare_images
    from tailor_trainer.diffusion.model import read_resolution

    resolution = 0
    if model:
        try:
            resolution = read_resolution(storage.resolve_model_dir(model))
        except (StageError, storage.StorageError, OSError, ValueError) as e:
            return PrepResult(error=DataError("ModelUnavailable", f"cannot read the training resolution of "
                                                                  f"{model}: {type(e).__name__}"))
    return prepare_images(ds, resolution=resolution)


def main_inspect(dataset_json_path: str, tokenizer: Optional[str] = None,
                 max_seq_length: Optional[int] = None, output: str = "json",
                 result_file: Optional[str] = None) -> int:
    """Print the Dataset.status this validation produces. Exit 0 Ready, 1 not Ready, 2 usage."""
    from pydantic import ValidationError

    try:
        with open(dataset_json_path, encoding="utf-8") as f:
            ds = ResolvedDataset.model_validate(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {dataset_json_path}: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "dataset"
        print(f"error: invalid Dataset spec at {where}: {first['msg']}", file=sys.stderr)
        return 2
    try:
        status = inspect_dataset(ds, tokenizer, max_seq_length)
    except Exception as e:  # a bug, not a data problem: still no traceback for the user
        if os.environ.get("TAILOR_DEBUG"):
            raise
        # type only: the text of an unexpected error may quote the data (the validation pod's log
        # has the traceback)
        traceback.print_exc()
        status = build_status(ds, PrepResult(error=DataError(
            "InternalError", f"{type(e).__name__} while validating (details in the validation pod's log; "
                             "locally: TAILOR_DEBUG=1)")))
    if result_file:
        storage.write_json_atomic(result_file, status)
    print(json.dumps(status, indent=2) if output == "json" else _text_report(ds.name, status))
    return 0 if status["conditions"][0]["status"] == "True" else 1
