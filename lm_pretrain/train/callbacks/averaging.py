"""train.average: an EMA or last-k average of the weights beside the trained ones, validated at
each validation (val_loss_avg), saved in checkpoints (average.pt) and exported as final-avg/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lm_pretrain.average import WeightAverager
from lm_pretrain.run_folder import FINAL_AVERAGE_DIR
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.checkpoint import load_state_file, publish, write_model_folder
from lm_pretrain.train.loop import Trainer

AVERAGE_FILE = "average.pt"


class WeightAveraging(Callback):
    def __init__(self, averager: WeightAverager, kind: str) -> None:
        self.averager, self.kind = averager, kind

    def after_update(self, t: Trainer, loss: torch.Tensor, finite: torch.Tensor) -> None:
        # a step whose update was skipped is sampled too (the same weights)
        if self.averager.due(t.state.step + 1):
            self.averager.update(t.core)

    def after_validation(self, t: Trainer, record: dict[str, Any]) -> str | None:
        if not self.averager.ready:
            return None
        with self.averager.applied(t.core):
            record["val_loss_avg"] = t.validation_loss()
        return f", averaged weights ({self.kind}) {record['val_loss_avg']:.4f}"

    def on_export(self, t: Trainer) -> None:
        if not self.averager.ready:
            return
        with self.averager.applied(t.core):
            tmp = t.run_dir / ".tmp-final-avg"
            write_model_folder(t.core, t.tokenizer_dir, tmp, {"kind": "final-avg", **t.state.to_dict()})
            publish(tmp, t.run_dir / FINAL_AVERAGE_DIR)

    def checkpoint_files(self) -> dict[str, Any]:
        return {AVERAGE_FILE: self.averager.state_dict()}

    def load_checkpoint(self, folder: Path) -> None:
        if (folder / AVERAGE_FILE).is_file():
            self.averager.load_state_dict(load_state_file(folder / AVERAGE_FILE))
