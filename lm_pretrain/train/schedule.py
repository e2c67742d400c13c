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
from dataclasses import dataclass

from lm_pretrain.errors import LmpError
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
        cfg = self.cfg
        if step < self.warmup:
            return (step + 1) / self.warmup
        if cfg.kind == "constant":
            return 1.0
        if cfg.kind == "cosine":
            span = max(1, self.total - self.warmup)
            return Decay(self.warmup, span, 1.0, cfg.min_lr_ratio, "cosine")(step)
        decay_start = self.total - self.decay
        # decay 0: no decay at all, also past the last step (where a branch may start its own)
        if cfg.kind == "wsd":
            if step < decay_start or self.decay == 0:
                return 1.0
            return Decay(decay_start, self.decay, 1.0, cfg.min_lr_ratio, cfg.decay_shape)(step)
        # infinite
        plateau = cfg.constant_lr_ratio
        if step < self.warmup + self.cooldown:
            return Decay(self.warmup, self.cooldown, 1.0, plateau, "cosine")(step)
        if step < decay_start or self.decay == 0:
            return plateau
        return Decay(decay_start, self.decay, plateau, cfg.min_lr_ratio, cfg.decay_shape)(step)

    def key_points(self) -> list[tuple[str, int]]:
        """Named stage boundaries, for printing and plotting."""
        points = [("start", 0), ("warmup end", self.warmup)]
        if self.cfg.kind == "infinite":
            points.append(("cooldown end", self.warmup + self.cooldown))
        if self.cfg.kind in ("wsd", "infinite") and self.decay:
            points.append(("first decay step", self.total - self.decay))
        if self.branch is not None:
            points.append(("first branch decay step", self.branch.start))
        points.append(("last step", self.total - 1))
        return points


def make_schedule(
    cfg: ScheduleConfig, total_steps: int, tokens_per_step: int, branch: Decay | None = None
) -> Schedule:
    def steps(value: float) -> int:
        if value < 1:
            return round(value * total_steps)
        return round(value / tokens_per_step) if cfg.unit == "tokens" else int(value)

    warmup, decay, cooldown = steps(cfg.warmup), steps(cfg.decay), steps(cfg.cooldown)
    stages = {"warmup": warmup}
    if cfg.kind == "infinite":
        stages["cooldown"] = cooldown
    if cfg.kind in ("wsd", "infinite"):
        stages["decay"] = decay
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
