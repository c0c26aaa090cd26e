"""What a stage gets and what it is: :class:`StageContext` and the :class:`Stage` Protocol.

Stage modules import these from here (not from the package, whose registry imports the stages).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from tailor_trainer.config import TrainerConfig
from tailor_trainer.errors import ModelInvalid

Progress = Callable[..., None]


@dataclass
class StageContext:
    """Everything a stage may use: the config, the local run directory and the progress callback."""

    config: TrainerConfig
    run_dir: str
    """Local path of the run directory (TrainerConfig.outputUri resolved)."""
    config_hash: str
    progress: Progress = field(default=lambda **_: None)
    """``progress(stage=..., step=..., loss=..., ...)``: fields of the progress document."""
    model_dir: Optional[str] = None
    """Local directory of the base model (resolved once by the pipeline)."""
    mirror: Optional[Any] = None
    """``storage.RunMirror`` when the output is remote (s3): ``run_dir`` is then its local copy."""

    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.run_dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def base_model_dir(self) -> str:
        if self.model_dir is None:
            from tailor_trainer import storage

            try:
                self.model_dir = storage.resolve_model_dir(self.config.model.uri, self.config.model.revision)
            except storage.StorageError as e:
                raise ModelInvalid(str(e), field="spec.baseModel.uri") from e
        return self.model_dir


class Stage(Protocol):
    name: str

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Do the stage's work; return the manifest body (the pipeline adds stage/configHash)."""
        ...
