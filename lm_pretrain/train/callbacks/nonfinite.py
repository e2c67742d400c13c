"""Steps whose loss or gradients are not finite: their update is skipped (train/optim.py), they
are counted on the device and read at log and checkpoint steps, and past train.skip_nonfinite
the run stops."""

from __future__ import annotations

from typing import Any

import torch

from lm_pretrain.errors import LmpError
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.loop import Trainer


class NonFiniteSteps(Callback):
    def __init__(self, device: torch.device) -> None:
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.last_skipped = torch.zeros((), dtype=torch.long, device=device)

    def after_update(self, t: Trainer, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.skipped += ~finite
        self.last_skipped = torch.where(finite, self.last_skipped, t.state.step + 1)

    def on_log(self, t: Trainer, record: dict[str, Any]) -> None:
        self.settle(t)

    def before_checkpoint(self, t: Trainer) -> None:
        self.settle(t)

    def settle(self, t: Trainer) -> None:
        """Account for the updates skipped since the last call (read from the device), and stop
        the run once more than train.skip_nonfinite were."""
        skipped = int(self.skipped.item())
        if skipped == 0:
            return
        self.skipped.zero_()
        t.state.skipped_steps += skipped
        last, allowed = int(self.last_skipped.item()), t.recipe.train.skip_nonfinite
        if t.state.skipped_steps > allowed:
            raise LmpError(
                f"non-finite loss or gradients at step {last} ({t.state.skipped_steps} so far, "
                f"train.skip_nonfinite is {allowed}); lower optim.lr, lengthen "
                f"schedule.warmup or use precision fp32. Checkpoints saved so far are finite."
            )
        where = f"step {last}" if skipped == 1 else f"{skipped} steps up to step {last}"
        t.progress.print(f"{where}: non-finite loss or gradients, update skipped")
