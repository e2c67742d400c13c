"""<run>/progress.png, redrawn after each validation or zero-shot score: one file shows how the
run goes."""

from __future__ import annotations

from typing import Any

from lm_pretrain.plot import write_run_plot
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.loop import Trainer


class ProgressPlot(Callback):
    def after_record(self, t: Trainer, record: dict[str, Any]) -> None:
        if t.is_main and ("val_loss" in record or any(key.startswith("eval/") for key in record)):
            write_run_plot(t.run_dir)
