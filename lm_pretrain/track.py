"""Metrics sinks (metrics.jsonl, wandb, TensorBoard) and the training progress display."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

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


class Tracker(Protocol):
    """Where logged records go: one per backend (metrics.jsonl, wandb, TensorBoard)."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}


class JsonlTracker:
    """<run>/metrics.jsonl: one JSON object per logged step, flushed at once (lmp runs/plot read it)."""

    def __init__(self, run_dir: Path) -> None:
        self._file = open(run_dir / METRICS_FILE, "a")  # noqa: SIM115 - closed in close()

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbTracker:
    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        import wandb

        self._run = wandb.init(
            project=recipe.tracking.wandb_project,
            name=recipe.name,
            dir=str(run_dir),
            mode=recipe.tracking.wandb,  # "offline" unless the user opted into "online"
            config=recipe.model_dump(mode="json"),
            resume="allow",
        )

    def log(self, record: dict[str, Any]) -> None:
        self._run.log(_numbers(record), step=record["step"])

    def close(self) -> None:
        import wandb

        self._run.finish()
        # finish() can return before wandb's service has written the run file (seen with wandb
        # 0.31); teardown waits for the service to exit, so the offline run is complete on disk
        wandb.teardown()


class TensorBoardTracker:
    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            from lm_pretrain.errors import LmpError

            raise LmpError(
                "tracking.tensorboard is true but tensorboard is not installed: "
                "pip install 'lm-pretrain[tensorboard]' or set tracking.tensorboard=false"
            ) from exc
        self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _numbers(record).items():
            self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._writer.close()


# trackers beside metrics.jsonl: when a recipe turns each on, and its class (run_dir, recipe);
# a new backend is a class above, its recipe field under `tracking`, and a line here
TRACKERS: dict[str, tuple[Callable[[Recipe], bool], Callable[[Path, Recipe], Tracker]]] = {
    "wandb": (lambda recipe: recipe.tracking.wandb != "off", WandbTracker),
    "tensorboard": (lambda recipe: recipe.tracking.tensorboard, TensorBoardTracker),
}


class MetricsSink:
    """Every logged record, time-stamped, to the recipe's trackers: metrics.jsonl always, wandb
    and TensorBoard when tracking asks. Disabled on all but the main process."""

    def __init__(self, run_dir: Path, recipe: Recipe, enabled: bool = True) -> None:
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        self.trackers.append(JsonlTracker(run_dir))
        self.trackers += [make(run_dir, recipe) for wanted, make in TRACKERS.values() if wanted(recipe)]

    def log(self, record: dict[str, Any]) -> None:
        record = {**record, "time": round(time.time(), 3)}
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


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
