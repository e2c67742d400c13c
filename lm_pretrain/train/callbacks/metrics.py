"""The training fields of a log step's record: mean loss over the interval's applied updates,
LR, tokens/s and the share of time spent waiting for data. The loss stays on the device between
log steps, so the loop never waits for it."""

from __future__ import annotations

import time
from typing import Any

import torch

from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.loop import Trainer


class StepMetrics(Callback):
    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), dtype=torch.long, device=device)

    def on_start(self, t: Trainer) -> None:
        self.interval_start, self.interval_tokens = time.perf_counter(), 0

    def after_update(self, t: Trainer, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.finite_steps += finite
        self.interval_tokens += t.tokens_per_step

    def on_log(self, t: Trainer, record: dict[str, Any]) -> None:
        mean_loss = t.accelerator.reduce(self.loss_sum, "mean").item() / max(1, int(self.finite_steps.item()))
        now = time.perf_counter()
        elapsed = now - self.interval_start
        record.update(
            step=t.state.step,
            tokens=t.state.tokens,
            words=t.state.words,
            epoch=round(t.windows.epoch_of(t.state.samples), 4),
            loss=mean_loss,
            lr=t.lr,
            tokens_per_s=self.interval_tokens / elapsed,
            # share of the interval spent waiting for batches: near 0 when the worker keeps up
            data_share=t.data_wait / elapsed,
        )
        t.data_wait = 0.0
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        self.interval_start, self.interval_tokens = now, 0
