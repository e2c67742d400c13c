"""train.seq_len_schedule: says when a stage begins, and logs each log step's length (seq_len).
The batches themselves come from the data loader (data/loader.py TrainBatches)."""

from __future__ import annotations

from typing import Any

from lm_pretrain.data.loader import length_at
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.loop import Trainer


class SequenceLengths(Callback):
    def __init__(self, stages: list[tuple[int, int]]) -> None:
        self.stages = stages

    def before_step(self, t: Trainer) -> None:
        step = t.state.step
        length = length_at(self.stages, step)
        if step == 0 or length != length_at(self.stages, step - 1):
            per_step = t.recipe.train.batch_size * t.recipe.seq_len // length
            t.progress.print(f"step {step}: sequence length {length} ({per_step} sequences per step)")

    def on_log(self, t: Trainer, record: dict[str, Any]) -> None:
        record["seq_len"] = length_at(self.stages, t.state.step - 1)  # the step just trained
