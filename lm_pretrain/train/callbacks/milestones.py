"""BabyLM milestones: a checkpoint named by words seen (chck_1M, ..., chck_1000M) when training
crosses each, always kept (lmp export --milestones publishes them)."""

from __future__ import annotations

from lm_pretrain.milestones import milestone_name, milestone_words
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.loop import Trainer


class Milestones(Callback):
    def on_start(self, t: Trainer) -> None:
        self.pending = [m for m in milestone_words() if m > t.state.words]

    def after_step(self, t: Trainer) -> None:
        while self.pending and self.pending[0] <= t.state.words:
            name = milestone_name(self.pending.pop(0))
            t.save(name)
            t.progress.print(f"step {t.state.step}: {t.state.words:,} words seen, saved {name}")
