"""Learning-rate schedules, each a pure function of progress (optimizer steps done).

A schedule maps step -> multiplier of the peak LR. Recipe lengths are fractions of training
(below 1) or counts of `schedule.unit` (steps or tokens), resolved to steps once here.

    constant  warmup -> peak
    cosine    warmup -> cosine decay to min_lr_ratio at the last step
    wsd       warmup -> peak (stable) -> decay over the last `decay` to min_lr_ratio
    infinite  warmup -> cosine cooldown to constant_lr_ratio -> constant -> anneal over the
              last `decay` to min_lr_ratio (decay 0: no anneal; branch one off later)

A decay branch (`lmp train --branch-from`) is the same decay started from any step of a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lm_pretrain.errors import LmpError

if TYPE_CHECKING:  # recipe.py reads SCHEDULE_KINDS from here for its allowed values
    from lm_pretrain.recipe import Recipe, ScheduleConfig


def decay_shape(progress: float, shape: str) -> float:
    """1 at the start of a decay, 0 at its end; progress runs from 0 to 1."""
    progress = min(1.0, max(0.0, progress))
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # 1-sqrt: stays high longer, then drops fast


@dataclass(frozen=True)
class Decay:
    """A decay from `start_ratio` (of the peak) at step `start` to `end_ratio` over `steps` steps."""

    start: int
    steps: int
    start_ratio: float
    end_ratio: float
    shape: str

    def __call__(self, step: int) -> float:
        progress = (step - self.start + 1) / max(1, self.steps)
        return self.end_ratio + (self.start_ratio - self.end_ratio) * decay_shape(progress, self.shape)


@dataclass(frozen=True)
class Schedule:
    cfg: ScheduleConfig
    total: int
    warmup: int
    decay: int
    cooldown: int
    branch: Decay | None = None  # a decay branch overrides the recipe's shape from its start

    def __call__(self, step: int) -> float:
        if self.branch is not None and step >= self.branch.start:
            return self.branch(step)
        return self.base(step)

    def base(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return SCHEDULE_KINDS[self.cfg.kind].after_warmup(self, step)

    def key_points(self) -> list[tuple[str, int]]:
        """Named stage boundaries, for printing and plotting."""
        points = [("start", 0), ("warmup end", self.warmup)]
        stages = SCHEDULE_KINDS[self.cfg.kind].stages
        if "cooldown" in stages:
            points.append(("cooldown end", self.warmup + self.cooldown))
        if "decay" in stages and self.decay:
            points.append(("first decay step", self.total - self.decay))
        if self.branch is not None:
            points.append(("first branch decay step", self.branch.start))
        points.append(("last step", self.total - 1))
        return points


# ---------------------------------------------------------------- the kinds (after warmup)


def _constant(s: Schedule, step: int) -> float:
    return 1.0


def _cosine(s: Schedule, step: int) -> float:
    return Decay(s.warmup, max(1, s.total - s.warmup), 1.0, s.cfg.min_lr_ratio, "cosine")(step)


def _final_decay(s: Schedule, step: int, plateau: float) -> float:
    """`plateau` until the last `decay` steps, then the decay to min_lr_ratio; decay 0: no decay
    at all, also past the last step (where a branch may start its own)."""
    decay_start = s.total - s.decay
    if step < decay_start or s.decay == 0:
        return plateau
    return Decay(decay_start, s.decay, plateau, s.cfg.min_lr_ratio, s.cfg.decay_shape)(step)


def _wsd(s: Schedule, step: int) -> float:
    return _final_decay(s, step, 1.0)


def _infinite(s: Schedule, step: int) -> float:
    plateau = s.cfg.constant_lr_ratio
    if step < s.warmup + s.cooldown:
        return Decay(s.warmup, s.cooldown, 1.0, plateau, "cosine")(step)
    return _final_decay(s, step, plateau)


@dataclass(frozen=True)
class ScheduleKind:
    """A schedule shape: the multiplier after warmup, the recipe lengths it uses besides warmup
    (of "cooldown", "decay"), and whether it always ends decayed (cosine)."""

    after_warmup: Callable[[Schedule, int], float]
    stages: tuple[str, ...] = ()
    always_decays: bool = False

    def decays_at_end(self, cfg: ScheduleConfig) -> bool:
        return self.always_decays or ("decay" in self.stages and cfg.decay > 0)


# schedule.kind's allowed values: a new kind is a function above and a line here
SCHEDULE_KINDS: dict[str, ScheduleKind] = {
    "constant": ScheduleKind(_constant),
    "cosine": ScheduleKind(_cosine, always_decays=True),
    "wsd": ScheduleKind(_wsd, ("decay",)),
    "infinite": ScheduleKind(_infinite, ("cooldown", "decay")),
}


def make_schedule(
    cfg: ScheduleConfig, total_steps: int, tokens_per_step: int, branch: Decay | None = None
) -> Schedule:
    def steps(value: float) -> int:
        if value < 1:
            return round(value * total_steps)
        return round(value / tokens_per_step) if cfg.unit == "tokens" else int(value)

    warmup, decay, cooldown = steps(cfg.warmup), steps(cfg.decay), steps(cfg.cooldown)
    lengths = {"warmup": warmup, "cooldown": cooldown, "decay": decay}
    stages = {k: lengths[k] for k in ("warmup", *SCHEDULE_KINDS[cfg.kind].stages)}
    if sum(stages.values()) > total_steps:
        named = " + ".join(f"schedule.{k} {v:,}" for k, v in stages.items())
        raise LmpError(
            f"{named} steps exceed the {total_steps:,} training steps; shorten them (values below 1 "
            "are fractions of training) or train longer"
        )
    return Schedule(cfg, total_steps, warmup, decay, cooldown, branch)


def total_steps(recipe: Recipe, words_per_token: float | None = None) -> int:
    """Optimizer steps of the run, from max_steps, max_tokens or the words-seen bound."""
    tokens_per_step = recipe.train.batch_size * recipe.seq_len
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps
    if recipe.train.max_tokens is not None:
        return math.ceil(recipe.train.max_tokens / tokens_per_step)
    if words_per_token is None:
        raise ValueError("a words-seen bound needs the corpus's words per token")
    return math.ceil(recipe.max_words_seen / (tokens_per_step * words_per_token))
