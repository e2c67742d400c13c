"""Metrics sinks (metrics.jsonl, wandb, TensorBoard) and the training progress display."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lm_pretrain.recipe import Recipe
from lm_pretrain.run_folder import METRICS_FILE


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep only the metrics up to `last_step`, so a resumed run's log tells one history."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsSink:
    """Appends one JSON object per logged step to <run>/metrics.jsonl; mirrors to wandb/TensorBoard."""

    def __init__(self, run_dir: Path, recipe: Recipe, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self._file = open(self.path, "a") if enabled else None  # noqa: SIM115 - closed in close()
        self._wandb: Any = None
        self._tb: Any = None
        if not enabled:
            return
        if recipe.tracking.wandb != "off":
            import wandb

            self._wandb = wandb.init(
                project=recipe.tracking.wandb_project,
                name=recipe.name,
                dir=str(run_dir),
                mode=recipe.tracking.wandb,  # "offline" unless the user opted into "online"
                config=recipe.model_dump(mode="json"),
                resume="allow",
            )
        if recipe.tracking.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                from lm_pretrain.errors import LmpError

                raise LmpError(
                    "tracking.tensorboard is true but tensorboard is not installed: "
                    "pip install 'lm-pretrain[tensorboard]' or set tracking.tensorboard=false"
                ) from exc
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


class TrainProgress:
    """A live bar with loss, lr, tokens/s and ETA on a terminal; plain log lines elsewhere (CI, files)."""

    def __init__(self, console: Console, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.console = console
        self.live = enabled and console.is_terminal
        self.enabled = enabled
        self.total = total_steps
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any] | None = None) -> None:
        stats = None
        if record is not None:
            stats = f"loss {record['loss']:.3f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
            if not self.live and self.enabled:
                self.console.print(f"step {step}/{self.total}  {stats}", highlight=False)
        self._progress.update(self._task, completed=step, **({"stats": stats} if stats else {}))

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)
