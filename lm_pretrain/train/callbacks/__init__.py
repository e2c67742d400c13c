"""Features that attach to the training loop (train/loop.py) instead of growing it.

A callback overrides the hooks it needs; the Trainer calls each hook on every callback in list
order, passing itself, so a callback reads what it needs (trainer.state, trainer.core,
trainer.progress, ...). Per step, in order:

    before_step(t)                   before the batch is read
    after_micro_batch(t, targets, bidirectional, losses)
                                     after each micro-batch's backward, for callbacks that set
                                     needs_token_losses: each target's loss, detached
    after_update(t, loss, finite)    after the optimizer step; device tensors: no sync here
    on_log(t, record)                at log steps: fill the record's training fields
    after_validation(t, record)      after the validation loss: add fields, return text for the
                                     printed line (or None)
    on_record(t, record)             every step: add fields (record may be empty: no record)
    after_record(t, record)          after a non-empty record is written to the metrics
    after_step(t)                    at the end of the step, before the regular checkpoint

and around them on_start(t), before_checkpoint(t) (at every save), on_export(t) (after final/ is
written, main process only). A callback's own state reaches checkpoints through
checkpoint_files() (file name -> tensors and plain values, saved with torch.save) and comes back
through load_checkpoint(folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lm_pretrain.train.loop import Trainer


class Callback:
    needs_token_losses = False  # True: the loss keeps each target's loss for after_micro_batch

    def on_start(self, t: Trainer) -> None:
        pass

    def before_step(self, t: Trainer) -> None:
        pass

    def after_micro_batch(
        self, t: Trainer, targets: torch.Tensor, bidirectional: torch.Tensor | None, losses: torch.Tensor
    ) -> None:
        pass

    def after_update(self, t: Trainer, loss: torch.Tensor, finite: torch.Tensor) -> None:
        pass

    def on_log(self, t: Trainer, record: dict[str, Any]) -> None:
        pass

    def after_validation(self, t: Trainer, record: dict[str, Any]) -> str | None:
        return None

    def on_record(self, t: Trainer, record: dict[str, Any]) -> None:
        pass

    def after_record(self, t: Trainer, record: dict[str, Any]) -> None:
        pass

    def after_step(self, t: Trainer) -> None:
        pass

    def before_checkpoint(self, t: Trainer) -> None:
        pass

    def on_export(self, t: Trainer) -> None:
        pass

    def checkpoint_files(self) -> dict[str, Any]:
        return {}

    def load_checkpoint(self, folder: Path) -> None:
        pass
