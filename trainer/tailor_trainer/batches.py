"""Prepared rows -> batches -> per-token losses (prep/<split>.parquet, docs/stage-contracts.md).

Shared by training, evaluation and cross-validation, so all three measure loss the same way.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import Any

from tailor_trainer.config import Precision
from tailor_trainer.errors import DataInvalid

IGNORE_INDEX = -100


def load_rows(run_dir: str, split: str) -> list[dict[str, Any]]:
    """Rows of a prepared split: id, input_ids, labels, position_ids, prompt, reference, fold."""
    import pyarrow.parquet as pq

    path = os.path.join(run_dir, "prep", f"{split}.parquet")
    if not os.path.exists(path):
        raise DataInvalid(f"prepared split {split} is missing ({path}); run the prep stage first",
                          field="dataset")
    table = pq.read_table(path)
    cols = set(table.column_names)
    rows = table.to_pylist()
    for r in rows:
        r.setdefault("position_ids", None)
        r.setdefault("fold", 0)
        if "prompt" not in cols:
            r["prompt"] = None
        if "reference" not in cols:
            r["reference"] = None
    return rows


def collate(rows: list[dict[str, Any]], pad_id: int, device: Any, *, flatten: bool = False,
            flash: bool = False) -> dict[str, Any]:
    """A batch of ``rows``: tensors on ``device`` plus host-side counts.

    Right-padded ``[B, L]`` by default. No attention mask: pads sit after every real token, so
    the causal mask already hides them, and packed rows get block-diagonal attention from their
    restarting position_ids (transformers detects packing when the mask is None); unpacked
    batches carry no position_ids.

    ``flatten``: padding-free, one ``[1, T]`` sequence of all the rows with position_ids
    restarting at each row (and each packed document), the first label of every row dropped
    (it would be predicted from the previous row), so the loss is that of the padded batch; for
    varlen attention kernels (flash_attention_2, flex_attention), which keep documents apart.
    ``flash`` adds flash-attention's ``cu_seq_lens``/``max_length`` kwargs, computed here on the
    host so the kernel needs no device sync to find them.

    Host-side: ``tokens`` (real tokens), ``label_tokens``, ``padded_tokens`` (tokens the model
    runs on, padding included) and, for the chunked loss, ``target_index``/``targets`` (the flat
    positions that have a next-token label, and those labels).
    """
    import torch

    if flatten:
        ids = torch.cat([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows]).unsqueeze(0)
        labels = torch.cat([_first_dropped(r["labels"]) for r in rows]).unsqueeze(0)
        pos = torch.cat([torch.as_tensor(r["position_ids"], dtype=torch.long) if r.get("position_ids") is not None
                         else torch.arange(len(r["input_ids"])) for r in rows]).unsqueeze(0)
    else:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        pos = torch.arange(n, dtype=torch.long).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(r["labels"], dtype=torch.long)
            if r.get("position_ids") is not None:
                p = torch.as_tensor(r["position_ids"], dtype=torch.long)
                pos[i, :k] = p
                pos[i, k:] = torch.arange(n - k) + (int(p[-1]) + 1 if k else 0)
    target = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1).reshape(-1)
    index = (target != IGNORE_INDEX).nonzero().reshape(-1)
    packed = flatten or any(r.get("position_ids") is not None for r in rows)
    batch = {"input_ids": to_device(ids, device), "labels": to_device(labels, device),
             # None when nothing is packed: the model counts positions itself, without inspecting
             # them for packed documents (a device-to-host sync per forward on a GPU)
             "position_ids": to_device(pos, device) if packed else None,
             "target_index": to_device(index, device), "targets": to_device(target[index], device),
             "tokens": sum(len(r["input_ids"]) for r in rows), "label_tokens": int(index.numel()),
             "padded_tokens": int(ids.numel())}
    if flatten and flash:
        starts = (pos.reshape(-1) == 0).nonzero().reshape(-1)
        cu = torch.cat([starts, torch.tensor([pos.numel()])]).to(torch.int32)
        longest = int(cu.diff().max())
        cu = to_device(cu, device)
        batch["attention_kwargs"] = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                                     "max_length_q": longest, "max_length_k": longest}
    return batch


def _first_dropped(labels: Any) -> Any:
    import torch

    t = torch.as_tensor(labels, dtype=torch.long).clone()
    if t.numel():
        t[0] = IGNORE_INDEX
    return t


def to_device(t: Any, device: Any) -> Any:
    """To ``device``; to a GPU from pinned memory without blocking, so the host does not wait for
    the GPU to drain its queue before each copy."""
    if getattr(device, "type", device) == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def as_tensors(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its token lists as tensors (converted once, not at every step)."""
    import torch

    pos = row.get("position_ids")
    return {"input_ids": torch.tensor(row["input_ids"], dtype=torch.long),
            "labels": torch.tensor(row["labels"], dtype=torch.long),
            "position_ids": torch.tensor(pos, dtype=torch.long) if pos is not None else None}


def token_losses(model: Any, batch: dict[str, Any], amp: Any) -> tuple[Any, Any]:
    """Per-token next-token loss (``[B, L-1]``, 0 where no label) and the logits."""
    import torch
    import torch.nn.functional as F

    with amp:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits.float()
    # Shift the labels, not the logits: slicing [B, L, V] logits would copy them.
    labels = batch["labels"]
    target = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1),
                           ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
    return loss[:, :-1], logits[:, :-1]


def epoch_order(n: int, epoch: int, seed: int, world: int, rank: int) -> list[int]:
    """This rank's row indices for an epoch: a seeded permutation, padded by wrapping so every
    rank gets the same count (DDP needs the same number of steps everywhere)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per = math.ceil(n / world)
    perm += perm[: per * world - n]
    return perm[rank::world]


def amp_context(precision: Precision, device: Any) -> tuple[Any, Any]:
    """(autocast context, weight dtype). auto = bf16 on GPUs that support it, else fp32."""
    import torch

    cuda = device.type == "cuda"
    name = precision.value
    if name == "auto":
        name = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp32":
        return nullcontext(), torch.float32
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype), dtype
