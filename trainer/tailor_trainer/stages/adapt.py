"""The adapt stage: check the adaptation against the model's structure and record the plan.

The model is built on the meta device (no weights) and changed by
:func:`tailor_trainer.adaptation.apply_adaptation`, the same code every training worker runs on
the real weights, so a spec that cannot work fails here, before any heavy work.
Writes ``adapt/plan.json`` (docs/stage-contracts.md).
"""

from __future__ import annotations

import os
from typing import Any

from tailor_trainer import storage
from tailor_trainer.adaptation import apply_adaptation, load_base, preflight
from tailor_trainer.stages.base import StageContext


def run_adapt(ctx: StageContext) -> dict[str, Any]:
    """Check the adaptation against the model's structure (no weights loaded) and record the plan."""
    cfg = ctx.config
    preflight(cfg)
    ctx.progress(stage="adapt", message="checking the adaptation")
    model = load_base(ctx.base_model_dir(), meta=True)
    _, plan = apply_adaptation(model, cfg.adaptation, seed=cfg.hyperparameters.seed)
    body = plan.to_json()
    out = ctx.stage_dir("adapt")
    storage.write_json_atomic(os.path.join(out, "plan.json"), body)
    ctx.progress(stage="adapt", trainableParameters=plan.trainable_parameters,
                 totalParameters=plan.total_parameters,
                 message=f"{plan.trainable_parameters:,} of {plan.total_parameters:,} parameters trainable "
                         f"({plan.trainable_percent:.2f}%)")
    return {**body, "plan": "plan.json", "modelType": getattr(model.config, "model_type", None)}
