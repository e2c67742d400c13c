"""The training loop: batch -> forward/backward with accumulation -> clip -> update -> schedule
-> callbacks -> stop check. Everything else (averaging, metrics, zero-shot eval, milestones, the
progress plot, non-finite steps, MeCo) attaches as a callback (train/callbacks/)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from rich.console import Console

from lm_pretrain.data.loader import PackedWindows
from lm_pretrain.data.mixture import MixedWindows
from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import Decoder
from lm_pretrain.recipe import Recipe
from lm_pretrain.track import MetricsSink, TrainProgress
from lm_pretrain.train import sharding
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.checkpoint import rng_state, save_checkpoint
from lm_pretrain.train.distill import Teachers
from lm_pretrain.train.forward import forward, validation_loss, validation_losses
from lm_pretrain.train.optim import apply_update, set_learning_rates
from lm_pretrain.train.schedule import Schedule
from lm_pretrain.train.signals import StopFlag, StopVote
from lm_pretrain.train.state import TrainState

SCALER_FILE = "scaler.pt"


@dataclass
class Trainer:
    """One training run's moving parts; fit() trains them. `model` is what trains (DDP/compiled
    wrappers included), `core` the plain Decoder sharing its parameters: what is saved, averaged
    and scored."""

    recipe: Recipe
    run_dir: Path
    tokenizer_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module
    core: Decoder
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    state: TrainState
    steps: int
    accum: int
    batches: Iterator[tuple[torch.Tensor, ...]]
    windows: PackedWindows | MixedWindows
    words_per_token: float
    val_batches: list
    val_mntp_batches: list
    document_bos: int | None
    sink: MetricsSink
    stop: StopFlag
    console: Console
    callbacks: list[Callback] = field(default_factory=list)
    # per-source validation of corpora with several sources: each batch's target sources, their names
    val_sources: list[torch.Tensor] | None = None
    source_names: list[str] = field(default_factory=list)
    lr: float = 0.0
    data_wait: float = 0.0  # seconds spent waiting for batches, reset by the metrics callback
    started: float = 0.0  # perf_counter() at which the run's training time would have been zero
    progress: TrainProgress | None = None
    teachers: Teachers | None = None  # distill: the frozen models whose distribution the loss mixes in

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def fsdp(self) -> bool:
        return self.recipe.train.distributed == "fsdp"

    @property
    def tokens_per_step(self) -> int:
        return self.recipe.train.batch_size * self.recipe.seq_len

    def emit(self, hook: str, *args: Any) -> list[Any]:
        return [getattr(callback, hook)(self, *args) for callback in self.callbacks]

    def fit(self) -> bool:
        """Train to the last step or a stop signal; True when a signal stopped the run (saved)."""
        cfg, state = self.recipe.train, self.state
        stop_vote = StopVote(self.accelerator.num_processes)
        self.started = time.perf_counter() - state.seconds
        self.model.train()
        self.stop.armed = True
        stopped = False
        with TrainProgress(self.console, self.steps, state.step, enabled=self.is_main) as self.progress:
            self.emit("on_start")
            while state.step < self.steps:
                self.emit("before_step")
                loss, finite = self.train_step()
                self.emit("after_update", loss, finite)
                self.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.samples += cfg.batch_size
                state.tokens += self.tokens_per_step
                state.words = self.words_seen()

                last = state.step == self.steps
                record: dict[str, Any] = {}
                if state.step % cfg.log_every == 0 or last:
                    self.emit("on_log", record)
                if state.step % cfg.eval_every == 0 or last:
                    self.validate(record)
                self.emit("on_record", record)
                if record:
                    self.sink.log(record)
                    self.emit("after_record", record)
                self.progress.update(state.step, record if "loss" in record else None)

                stopped = stop_vote(self.stop.signum is not None)
                self.emit("after_step")
                if state.step % self.recipe.checkpoint.every == 0 or last or stopped:
                    self.save()
                if stopped:
                    self.progress.print(
                        f"stopped by signal after step {state.step}; saved. Run the same command to resume."
                    )
                    break
        self.stop.armed = False
        return stopped

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accum` micro-batches: the summed loss and whether the update
        was applied (finite), both on the device."""
        accelerator, model = self.accelerator, self.model
        step_loss = torch.zeros((), device=accelerator.device)
        token_losses = any(callback.needs_token_losses for callback in self.callbacks)
        for i in range(self.accum):
            inputs, targets, *rows = (t.to(accelerator.device, non_blocking=True) for t in self.next_batch())
            # only the last micro-batch all-reduces (FSDP: reduce-scatters) gradients
            if self.fsdp:
                self.core.set_requires_gradient_sync(i == self.accum - 1)
            sync = accelerator.no_sync(model) if i < self.accum - 1 and not self.fsdp else nullcontext()
            with sync:
                bidirectional = rows[0] if rows else None
                out = forward(
                    model, inputs, targets, self.document_bos, bidirectional, token_losses, self.teachers
                )
                loss = out.loss / self.accum
                accelerator.backward(loss)
            if token_losses:
                self.emit("after_micro_batch", targets, bidirectional, out.token_losses)
            step_loss += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.recipe.optim.grad_clip or math.inf)
        grad_norm = sharding.full(grad_norm)  # under FSDP a replicated DTensor
        # the schedule is a pure function of the step: the step is all the state it has
        ratio = self.schedule(self.state.step)
        self.lr = self.recipe.optim.lr * ratio
        set_learning_rates(self.optimizer, ratio, self.recipe.optim.lr)
        return step_loss, apply_update(self.optimizer, accelerator, grad_norm, step_loss)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        waited = time.perf_counter()
        try:
            return next(self.batches)
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            raise LmpError(
                f"the data worker process died ({exc}); the machine may be out of memory. "
                "Run the same command to resume from the newest checkpoint"
            ) from None
        finally:
            self.data_wait += time.perf_counter() - waited

    def words_seen(self) -> int:
        """Words in the windows drawn so far: per source under data.mixture, else at the corpus's
        average words per token."""
        if isinstance(self.windows, MixedWindows):
            return round(self.windows.words_seen(self.state.samples))
        return round(self.state.tokens * self.words_per_token)

    def record_base(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record`, given the step's position when it has nothing yet."""
        if not record:
            record.update(step=self.state.step, tokens=self.state.tokens, words=self.state.words)
        return record

    def validation_loss(self, batches: list | None = None) -> float:
        return validation_loss(self.core, batches or self.val_batches, self.accelerator, self.document_bos)

    def validate_before_training(self) -> None:
        """A new run's step-0 validation loss, the first point of its curves."""
        record: dict[str, Any] = {}
        self._score_validation(record)
        self.state.first_val_loss = self.state.val_loss
        self.sink.log(record)

    def _score_validation(self, record: dict[str, Any]) -> None:
        state = self.state
        # with several sources, each one's loss too, from the same passes
        state.val_loss, by_source = validation_losses(
            self.core,
            self.val_batches,
            self.accelerator,
            self.document_bos,
            self.val_sources,
            self.source_names,
        )
        state.val_loss_step = state.step
        self.record_base(record)["val_loss"] = state.val_loss
        record.update({f"val_loss/{name}": loss for name, loss in by_source.items()})

    def validate(self, record: dict[str, Any]) -> None:
        """The validation loss (per source too, and the masked one of hybrid objectives) into
        state and record."""
        state = self.state
        self._score_validation(record)
        message = f"step {state.step}: validation loss {state.val_loss:.4f}"
        if self.val_mntp_batches:
            record["val_mntp_loss"] = self.validation_loss(self.val_mntp_batches)
            message += f", masked next-token {record['val_mntp_loss']:.4f}"
        message += "".join(part for part in self.emit("after_validation", record) if part)
        self.progress.print(message)

    def full_model(self) -> Decoder | None:
        """The model with whole weights on the main process (collective under FSDP)."""
        return sharding.plain_copy(self.core, self.is_main) if self.fsdp else self.core

    def save(self, name: str | None = None) -> None:
        """A checkpoint (default step-<N>; a name such as a milestone's is always kept)."""
        self.emit("before_checkpoint")
        self.state.seconds = time.perf_counter() - self.started
        rng_states = gather_object([rng_state()])  # every process's, in rank order
        weights = self.full_model()
        optimizer = self.optimizer
        optimizer_state = sharding.full_optimizer_state(optimizer) if self.fsdp else optimizer.state_dict()
        if self.is_main:
            files = {k: v for callback in self.callbacks for k, v in callback.checkpoint_files().items()}
            if self.accelerator.scaler is not None:  # fp16 on GPU
                files[SCALER_FILE] = self.accelerator.scaler.state_dict()
            save_checkpoint(
                self.run_dir,
                weights,
                optimizer_state,
                self.tokenizer_dir,
                self.state.to_dict(),
                self.recipe.checkpoint.keep_last,
                name,
                files,
                rng_states,
            )
        self.accelerator.wait_for_everyone()
