"""What the Hugging Face Hub and PEFT read from a model directory: the model card's front matter
and the adapter's pointer to its base.

The Hub links a model to its base by the card's ``base_model`` (a Hub repo id, nothing else; see
https://huggingface.co/docs/hub/model-cards) and PEFT finds an adapter's base by
``adapter_config.json``'s ``base_model_name_or_path``. What the trainer loaded the base from is a
directory on its own node — a Hub snapshot in the cache, an S3 download — that means nothing
anywhere else, so both name the base as the user did: the Hub id for ``hf://org/name``, the path
for a local directory or PVC, the URI otherwise (and the card's ``base_model`` only for the Hub).

Tailor itself never needs the path back from ``adapter_config.json``: evaluating a run loads its
base from the resolved ``spec.baseModel``, and a champion's adapter whose base is not a directory
here goes on that same base (``load_any``'s fallback).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from tailor_trainer import storage
from tailor_trainer.config import TrainerConfig

ADAPTER_CONFIG = "adapter_config.json"
CARD = "README.md"

# result.json metric -> model-index metric type (the Hub's evaluate ids) and display name
_INDEX_METRICS = [("loss", "loss", "loss"), ("perplexity", "perplexity", "perplexity"),
                  ("accuracy", "accuracy", "token accuracy"), ("exactMatch", "exact_match", "exact match")]


def hub_repo_id(uri: Optional[str]) -> Optional[str]:
    """``org/name`` for ``hf://org/name`` (or ``hf://name``); None for any other URI, including a
    dataset's ``hf:///local/dir``."""
    if not uri or not uri.startswith("hf://") or uri.startswith("hf:///"):
        return None
    repo = uri[len("hf://"):].strip("/")
    return repo if repo and repo.count("/") <= 1 else None


def base_reference(cfg: TrainerConfig) -> str:
    """How the saved adapter names its base: the Hub id, a local or PVC path, else the URI (never
    a download cache)."""
    uri = cfg.model.uri
    repo = hub_repo_id(uri)
    if repo:
        return repo
    path = storage.local_path(uri)
    return os.path.abspath(path) if path is not None else uri


def front_matter(cfg: TrainerConfig, result: dict[str, Any], *, adapter: bool) -> dict[str, Any]:
    """The card's metadata, in a fixed order: Hub fields first, then Tailor's lineage under ``tailor``."""
    method = cfg.adaptation.method.value
    base = hub_repo_id(cfg.model.uri)
    dataset = hub_repo_id(cfg.dataset.source.uri)
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["tailor", method, "text-generation"]
    if dataset:
        meta["datasets"] = [dataset]
    index = _model_index(cfg, result, dataset)
    if index:
        meta["model-index"] = index
    tailor = {"run": result.get("run"), "job": result.get("job"), "base_model": cfg.model.uri,
              "base_model_revision": cfg.model.revision, "method": method, "dataset": cfg.dataset.name,
              "dataset_revision": result.get("datasetRevision"),
              "dataset_fingerprint": result.get("datasetFingerprint"), "config_hash": result.get("configHash")}
    meta["tailor"] = {k: v for k, v in tailor.items() if v is not None}
    return meta


def _model_index(cfg: TrainerConfig, result: dict[str, Any], dataset: Optional[str]) -> list[dict[str, Any]]:
    m = result.get("metrics") or {}
    split = (result.get("evaluatedOn") or {}).get("split", "test")
    metrics = [{"type": kind, "value": m[key], "name": f"{split} {label}"} for key, kind, label in _INDEX_METRICS
               if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    if not metrics:
        return []
    # no dataset revision here: the Hub would read Tailor's Dataset revision as a Hub commit
    ds = {"name": cfg.dataset.name, "type": dataset or cfg.dataset.name, "split": split}
    return [{"name": str(result.get("run")),
             "results": [{"task": {"type": "text-generation", "name": "Text Generation"},
                          "dataset": ds, "metrics": metrics}]}]


def point_adapter_at_base(adapter_dir: str, cfg: TrainerConfig) -> None:
    """Rewrite ``adapter_config.json`` so PEFT (and the Hub) find the base by its public name."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    with open(path, encoding="utf-8") as f:
        body = json.load(f)
    body["base_model_name_or_path"] = base_reference(cfg)
    if hub_repo_id(cfg.model.uri) and cfg.model.revision:
        body["revision"] = cfg.model.revision  # PEFT loads the base at this revision
    storage.write_json_atomic(path, body)


def write_model_dirs(cfg: TrainerConfig, train_dir: str, card: str, merged_card: str) -> None:
    """Put the model card into ``train/model`` and its full-model variant into ``train/merged``,
    and point an adapter at its base."""
    model_dir, merged_dir = os.path.join(train_dir, "model"), os.path.join(train_dir, "merged")
    for where, text in ((model_dir, card), (merged_dir, merged_card)):
        if os.path.isdir(where):
            with open(os.path.join(where, CARD), "w", encoding="utf-8") as f:
                f.write(text)
    if os.path.exists(os.path.join(model_dir, ADAPTER_CONFIG)):
        point_adapter_at_base(model_dir, cfg)
