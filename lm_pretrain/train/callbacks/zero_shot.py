"""recipe.eval: zero-shot scores (grammar probe, BLiMP, ...) every eval.every steps, logged as
eval/<task> and printed."""

from __future__ import annotations

from typing import Any

from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.loop import Trainer


class ZeroShotEval(Callback):
    def __init__(self, evaluator: Any, every: int) -> None:  # eval.runner.TrainingEvaluator
        self.evaluator, self.every = evaluator, every

    def on_record(self, t: Trainer, record: dict[str, Any]) -> None:
        step = t.state.step
        if step % self.every and step != t.steps:
            return
        scored = t.full_model()  # every process: a collective under FSDP
        if not t.is_main:
            return
        scores = self.evaluator(scored)
        t.record_base(record).update(scores)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.1f}%" for k, v in scores.items())
        t.progress.print(f"step {step}: zero-shot {shown}")
