"""hybrid.masking hard: each token's recent masked-prediction loss, the hardness by which the
masker chooses what to mask (data/masking.py).

Kept per token id as decayed sums of the losses (and counts) of the masked targets of every step,
all processes' together, so every process masks with the same table and a run does not depend on
their number. A step whose update was skipped (non-finite) adds nothing. Saved in checkpoints
(token_hardness.pt), so a resumed run masks exactly as the uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm_pretrain.model.decoder import IGNORE_INDEX
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.checkpoint import load_state_file
from lm_pretrain.train.loop import Trainer

HARDNESS_FILE = "token_hardness.pt"
# a token's hardness is its mean recent loss smoothed toward the mean over all tokens by this many
# pseudo-observations, so a token seen once is not taken at its word
PRIOR_WEIGHT = 1.0


class TokenHardness(Callback):
    needs_token_losses = True

    def __init__(self, vocab_size: int, half_life: int, device: torch.device) -> None:
        self.decay = 0.5 ** (1 / half_life)
        self.sums = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.counts = torch.zeros_like(self.sums)
        self.step_sums = torch.zeros_like(self.sums)
        self.step_counts = torch.zeros_like(self.sums)
        self._table: np.ndarray | None = None

    def after_micro_batch(
        self, t: Trainer, targets: torch.Tensor, bidirectional: torch.Tensor | None, losses: torch.Tensor
    ) -> None:
        """Add one micro-batch's masked targets (no host sync: ignored ones weigh zero)."""
        keep = targets != IGNORE_INDEX
        if bidirectional is not None:
            keep &= bidirectional[:, None]
        keep = keep.reshape(-1)
        ids = torch.where(keep, targets.reshape(-1), 0)
        self.step_sums.index_add_(0, ids, torch.where(keep, losses.double(), 0.0))
        self.step_counts.index_add_(0, ids, keep.double())

    def after_update(self, t: Trainer, loss: torch.Tensor, finite: torch.Tensor) -> None:
        step_sums, step_counts = self.step_sums, self.step_counts
        if t.accelerator.num_processes > 1:
            step_sums = t.accelerator.reduce(step_sums, "sum")
            step_counts = t.accelerator.reduce(step_counts, "sum")
        self.sums = torch.where(finite, self.decay * self.sums + step_sums, self.sums)
        self.counts = torch.where(finite, self.decay * self.counts + step_counts, self.counts)
        self.step_sums.zero_()
        self.step_counts.zero_()
        self._table = None

    def table(self) -> np.ndarray:
        """Each token id's hardness: its smoothed mean recent loss (the overall mean when unseen)."""
        if self._table is None:
            sums, counts = self.sums.cpu().numpy(), self.counts.cpu().numpy()
            total = counts.sum()
            prior = sums.sum() / total if total > 0 else 1.0
            self._table = (sums + PRIOR_WEIGHT * prior) / (counts + PRIOR_WEIGHT)
        return self._table

    def on_log(self, t: Trainer, record: dict[str, Any]) -> None:
        # how far the masking leans: the hardest tenth of seen tokens' loss over the mean
        seen = self.counts.cpu().numpy() > 0.5
        if seen.sum() >= 10:
            h = self.table()[seen]
            record["hard_mask_top10"] = float(np.sort(h)[-max(1, len(h) // 10) :].mean() / h.mean())

    def checkpoint_files(self) -> dict[str, Any]:
        return {HARDNESS_FILE: {"sums": self.sums.cpu(), "counts": self.counts.cpu()}}

    def load_checkpoint(self, folder: Path) -> None:
        if (folder / HARDNESS_FILE).is_file():
            state = load_state_file(folder / HARDNESS_FILE)
            self.sums = state["sums"].to(self.sums.device, torch.float64)
            self.counts = state["counts"].to(self.counts.device, torch.float64)
            self._table = None
