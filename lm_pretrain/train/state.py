"""Where training stands: what trainer_state.json holds in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    step: int = 0
    samples: int = 0  # sequences consumed, all processes: the data position a resume continues from
    tokens: int = 0
    words: int = 0  # words seen, counted at the corpus's words per token (BabyLM's budget)
    val_loss: float | None = None
    val_loss_step: int | None = None  # the step val_loss was measured at: a checkpoint's own loss or not
    first_val_loss: float | None = None
    seconds: float = 0.0  # training time over all attempts
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    corpus: str | None = None  # the corpus fingerprint: a resume on other documents is refused

    def to_dict(self) -> dict[str, Any]:
        """The trainer_state.json keys (the same as the dict earlier releases wrote)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any], **defaults: Any) -> TrainState:
        """A saved state over `defaults`; keys this release does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{**defaults, **{k: v for k, v in saved.items() if k in known}})
