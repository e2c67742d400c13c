"""The training loop: recipe -> prepared data -> model -> steps -> metrics, checkpoints, export.

Accelerate owns devices, processes and mixed precision; everything else is plain PyTorch and
visible here in one loop.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console

from lm_pretrain.data.loader import IGNORE_INDEX, PackedWindows, validation_batches
from lm_pretrain.data.prepare import prepare_data
from lm_pretrain.data.tokenizer import save_hf_tokenizer, special_token_ids
from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import Decoder, DecoderConfig
from lm_pretrain.recipe import Recipe
from lm_pretrain.track import MetricsSink, TrainProgress, write_status
from lm_pretrain.train.checkpoint import (
    load_checkpoint,
    publish,
    save_checkpoint,
    step_checkpoints,
    write_model_folder,
)
from lm_pretrain.train.schedule import lr_multiplier


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    first_val_loss: float | None
    final_val_loss: float
    unigram_entropy: float
    seconds: float


def _accelerator(precision: str) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    if precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        precision = "fp16"  # older GPUs: fp16 autocast with a loss scaler instead
    if precision == "fp16" and not on_gpu:
        raise LmpError("train.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed)


def build_optimizer(model: Decoder, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms), fused where the device supports it."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": recipe.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=recipe.optim.lr, betas=recipe.optim.betas, eps=recipe.optim.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def total_steps(recipe: Recipe) -> int:
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps
    return math.ceil(recipe.train.max_tokens / (recipe.train.batch_size * recipe.seq_len))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list, accelerator: Accelerator) -> float:
    """Mean next-token cross-entropy (nats) over the fixed validation windows."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
        with accelerator.autocast():
            loss = model(inputs, targets).loss
        n = (targets != IGNORE_INDEX).sum()
        loss_sum += loss.float() * n
        count += n
    model.train()
    return (loss_sum / count).item()


def train(recipe: Recipe, run_dir: Path, console: Console | None = None) -> TrainResult:
    """Train `recipe` into `run_dir`, resuming from its newest checkpoint when it has one.

    <run>/status.json says what became of the run: running, finished or failed.
    """
    console = console or Console()
    is_main = os.environ.get("RANK", "0") == "0"  # set by torch.distributed launchers
    try:
        result = _train(recipe, run_dir, console)
    except BaseException as exc:
        if is_main and run_dir.is_dir():
            write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if is_main:
        write_status(run_dir, "finished", step=result.steps)
    return result


def _train(recipe: Recipe, run_dir: Path, console: Console) -> TrainResult:
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    accelerator = _accelerator(recipe.train.precision)
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    cfg = recipe.train
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if cfg.batch_size % (micro * world):
        raise LmpError(
            f"train.batch_size {cfg.batch_size} must be a multiple of micro_batch_size {micro} x "
            f"{world} processes"
        )
    accum = cfg.batch_size // (micro * world)
    seq_len = recipe.seq_len
    steps = total_steps(recipe)

    with accelerator.main_process_first():
        data = prepare_data(recipe, console=console if is_main else None, show_progress=is_main)
    ids = special_token_ids(data.tokenizer, recipe.tokenizer)
    tokenizer_dir = run_dir / "tokenizer"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
        write_status(run_dir, "running")
        tokenizer_dir.mkdir(exist_ok=True)
        save_hf_tokenizer(data.tokenizer, tokenizer_dir, recipe.tokenizer, recipe.model.max_seq_len)
    accelerator.wait_for_everyone()

    set_seed(recipe.seed)
    model = Decoder(
        DecoderConfig.from_recipe(
            recipe.model,
            vocab_size=data.tokenizer.get_vocab_size(),
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )
    )
    optimizer = build_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, steps, recipe.schedule)
    )
    state = {"step": 0, "samples": 0, "tokens": 0, "val_loss": None, "first_val_loss": None, "seconds": 0.0}
    existing = step_checkpoints(run_dir)
    if existing:
        state = load_checkpoint(existing[-1], model, optimizer, scheduler)
        console.print(f"resuming from {existing[-1]} (step {state['step']})")
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.compile:
        model = torch.compile(model)

    windows = PackedWindows(data.train.tokens, seq_len, recipe.seed, ids["bos"])
    val_batches = validation_batches(data.val.tokens, seq_len, cfg.eval_tokens, micro, ids["bos"])
    sink = MetricsSink(run_dir, recipe, enabled=is_main)
    if is_main:
        n_params = accelerator.unwrap_model(model).num_parameters()
        console.print(
            f"model: {n_params / 1e6:.2f}M parameters | {steps} steps x {cfg.batch_size} sequences x "
            f"{seq_len} tokens = {steps * cfg.batch_size * seq_len / 1e6:.1f}M tokens "
            f"({steps * cfg.batch_size / windows.windows_per_epoch:.2f} epochs) | "
            f"{accelerator.device}, {recipe.train.precision}, {world} process(es), accumulation {accum}"
        )

    def save(step_state: dict) -> None:
        if is_main:
            save_checkpoint(
                run_dir,
                accelerator.unwrap_model(model),
                optimizer,
                scheduler,
                tokenizer_dir,
                step_state,
                recipe.checkpoint.keep_last,
            )
        accelerator.wait_for_everyone()

    if state["step"] == 0:
        state["first_val_loss"] = state["val_loss"] = validation_loss(model, val_batches, accelerator)
        sink.log({"step": 0, "tokens": 0, "val_loss": state["val_loss"]})

    step = state["step"]
    started = time.perf_counter() - state["seconds"]
    interval_start, interval_tokens = time.perf_counter(), 0
    loss_acc = torch.zeros((), device=accelerator.device)
    steps_acc = 0
    model.train()
    with TrainProgress(console, steps, step, enabled=is_main) as progress:
        while step < steps:
            first = state["samples"] + accelerator.process_index * micro * accum
            for i in range(accum):
                inputs, targets = windows.batch(first + i * micro, micro)
                inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
                # only the last micro-batch all-reduces gradients across processes
                sync = accelerator.no_sync(model) if i < accum - 1 else nullcontext()
                with sync:
                    loss = model(inputs, targets).loss / accum
                    accelerator.backward(loss)
                loss_acc += loss.detach()
            if recipe.optim.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_acc += 1
            state["samples"] += cfg.batch_size
            state["tokens"] += cfg.batch_size * seq_len
            interval_tokens += cfg.batch_size * seq_len

            record = None
            if step % cfg.log_every == 0 or step == steps:
                # the only host sync of the step loop: once per log interval
                train_loss = accelerator.reduce(loss_acc, "mean").item() / steps_acc
                now = time.perf_counter()
                record = {
                    "step": step,
                    "tokens": state["tokens"],
                    "epoch": round(windows.epoch_of(state["samples"]), 4),
                    "loss": train_loss,
                    "lr": lr,
                    "tokens_per_s": interval_tokens / (now - interval_start),
                }
                loss_acc.zero_()
                steps_acc = 0
                interval_start, interval_tokens = now, 0
            if step % cfg.eval_every == 0 or step == steps:
                state["val_loss"] = validation_loss(model, val_batches, accelerator)
                record = {
                    **(record or {"step": step, "tokens": state["tokens"]}),
                    "val_loss": state["val_loss"],
                }
                progress.print(f"step {step}: validation loss {state['val_loss']:.4f}")
            if record is not None:
                sink.log(record)
                progress.update(step, record if "loss" in record else None)
            else:
                progress.update(step)
            if step % recipe.checkpoint.every == 0 or step == steps:
                state["step"] = step
                state["seconds"] = time.perf_counter() - started
                save(dict(state))

    seconds = time.perf_counter() - started
    if is_main:
        final = run_dir / "final"
        tmp = run_dir / ".tmp-final"
        write_model_folder(
            accelerator.unwrap_model(model),
            tokenizer_dir,
            tmp,
            {"kind": "final", "recipe": recipe.name, **state, "unigram_entropy": data.unigram_entropy},
        )
        publish(tmp, final)
        (run_dir / "summary.json").write_text(
            json.dumps({**state, "unigram_entropy": data.unigram_entropy, "seconds": seconds}, indent=2)
            + "\n"
        )
    sink.close()
    accelerator.wait_for_everyone()
    return TrainResult(
        run_dir=run_dir,
        steps=step,
        tokens=state["tokens"],
        first_val_loss=state["first_val_loss"],
        final_val_loss=state["val_loss"],
        unigram_entropy=data.unigram_entropy,
        seconds=seconds,
    )
