"""FSDP (``resources.strategy`` fsdp): PyTorch FSDP2, one shard group per transformer block.

The training recipe shards the model before it builds the optimizer, gathers full copies of the
trainable weights for checkpoints, early stopping and the final save (every checkpoint holds
unsharded tensors, so a run may resume on another number of workers), and reshards them on
resume.
"""

from __future__ import annotations

from typing import Any


def shard_model(model: Any, device_type: str, world: int) -> None:
    """Shard every transformer block (the classes the model lists in ``_no_split_modules``, added
    identity blocks included), then the rest (embeddings, head, PEFT extras) at the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in names]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def gather_trainable(params: list[tuple[str, Any]], keep: bool) -> dict[str, Any]:
    """Full CPU copies of the trainable (sharded) parameters; a collective: every rank calls it
    with the same list. Ranks with ``keep`` False take part but keep nothing."""
    out = {}
    for name, p in params:
        full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if keep:
            out[name] = full.to("cpu", copy=True).contiguous()
        del full
    return out


def load_sharded(model: Any, optimizer: Any, weights: dict[str, Any], optim_state: dict[str, Any]) -> None:
    """Resume under FSDP: full (unsharded) checkpoint tensors, resharded onto this world."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state,
                             options=StateDictOptions(full_state_dict=True))
