"""The fixed evaluation set (FineTuneJob spec.evaluation.datasetRef), prepared like a held-out split.

The operator resolves the Dataset (Ready, at the pinned revision) and hands its spec, revision and
content fingerprint over as ``TrainerConfig.evalDataset``. The evaluate stage reads it here with
the same prep engine and options the Dataset's validation used (so the rows kept, and so the
fingerprint, are the validation's), tokenized with this run's tokenizer and maxSeqLength, never
packed (every row is scored as its own example). All its splits are the evaluation set: it is a
Dataset kept for measuring, not for training. A source whose rows changed since the validation
(another fingerprint) fails the run with DatasetChanged rather than move the yardstick.

Staged in ``<run>/evaluate/evalset/prep/<split>.parquet`` (the layout batches.load_rows reads) and
removed once read, so it is not uploaded with the stage's outputs.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from tailor_trainer.batches import load_rows
from tailor_trainer.config import TrainerConfig
from tailor_trainer.data.engine import PrepOptions, prepare
from tailor_trainer.data.split import SPLITS
from tailor_trainer.errors import DataInvalid, StageError

FIELD = "spec.evaluation.datasetRef"


class EvalSetChanged(StageError):
    """The evaluation Dataset's rows are not the ones its validation saw."""

    reason = "DatasetChanged"


def load_eval_set(cfg: TrainerConfig, out_dir: str, tokenizer: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The evaluation set's rows (sorted by id) and what it is (dataset, revision, fingerprint)."""
    ds = cfg.eval_dataset
    assert ds is not None
    root = os.path.join(out_dir, "evalset")
    work = os.path.join(root, "prep")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(work)
    hp = cfg.hyperparameters
    result = prepare(ds, PrepOptions(tokenizer=tokenizer, max_seq_length=hp.max_seq_length,
                                     overlong=hp.overlong, packing=False, seed=ds.split.seed, out_dir=work))
    if result.error is not None:
        raise DataInvalid(f"evaluation Dataset {ds.name}: {result.error.reason}: {result.error.message}",
                          field=FIELD)
    if ds.content_fingerprint is not None and result.fingerprint != ds.content_fingerprint:
        raise EvalSetChanged(
            f"the data of evaluation Dataset {ds.name} changed after it was validated: revision "
            f"{ds.revision or ds.content_fingerprint} has content fingerprint {ds.content_fingerprint}, but "
            f"this run read {result.rows_read} rows with fingerprint {result.fingerprint}; nothing was "
            "scored on them (the Dataset is re-validated, and the next run uses its new revision)", field=FIELD)
    rows = [r for split in SPLITS for r in load_rows(root, split)]
    shutil.rmtree(root, ignore_errors=True)  # in memory now; not uploaded with evaluate/
    if not rows:
        raise DataInvalid(f"evaluation Dataset {ds.name} has no rows to score", field=FIELD)
    rows.sort(key=lambda r: r["id"])
    info = {"dataset": ds.name, "revision": ds.revision or result.fingerprint, "fingerprint": result.fingerprint}
    return rows, info


__all__ = ["EvalSetChanged", "FIELD", "load_eval_set"]
