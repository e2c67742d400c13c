"""Learning-rate schedules as pure functions of progress: multiplier = f(step, total steps)."""

from __future__ import annotations

import math

from lm_pretrain.recipe import ScheduleConfig


def _steps(value: float, total: int) -> int:
    """A recipe length: a fraction of training when below 1, else a number of steps."""
    return round(value * total) if value < 1 else int(value)


def _decay_shape(progress: float, shape: str) -> float:
    """1 at the start of a decay, 0 at its end; progress runs from 0 to 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # 1-sqrt: keeps the LR high longer, then drops fast


def lr_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    """The factor applied to the peak LR at optimizer step `step` (0-based) of `total`."""
    warmup = _steps(cfg.warmup, total)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * _decay_shape(progress, "cosine")
    # wsd: warmup, a constant stage, then a decay over the last `decay` steps
    decay = _steps(cfg.decay, total)
    decay_start = total - decay
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, decay))
    return floor + (1.0 - floor) * _decay_shape(progress, cfg.decay_shape)
