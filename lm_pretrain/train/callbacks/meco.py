"""MeCo: the cooldown, where training switches from metadata-prefixed documents to plain ones
(the data loader switches on the global token count; this says when)."""

from __future__ import annotations

from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.loop import Trainer


class MecoCooldown(Callback):
    def __init__(self, cooldown_tokens: int) -> None:
        self.cooldown_tokens = cooldown_tokens

    def before_step(self, t: Trainer) -> None:
        if t.state.tokens == self.cooldown_tokens:
            t.progress.print(
                f"step {t.state.step}: metadata cooldown begins, documents without their prefixes"
            )
