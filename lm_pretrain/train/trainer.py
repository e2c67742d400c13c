"""The training loop: recipe -> prepared data -> model -> steps -> metrics, checkpoints, export.

Accelerate owns devices, processes and mixed precision; everything else is plain PyTorch and
visible here in one loop.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from rich.console import Console

from lm_pretrain.average import WeightAverager
from lm_pretrain.data.loader import (
    PackedWindows,
    TrainBatches,
    close_loader,
    train_loader,
    validation_batches,
)
from lm_pretrain.data.masking import VALIDATION_SAMPLES, MntpMasker
from lm_pretrain.data.prepare import prepare_data
from lm_pretrain.data.tokenizer import save_hf_tokenizer, special_token_ids
from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import Decoder, DecoderConfig
from lm_pretrain.recipe import Recipe
from lm_pretrain.run_folder import (
    BRANCH_FILE,
    RECIPE_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    write_atomic,
    write_status,
)
from lm_pretrain.track import MetricsSink, truncate_metrics
from lm_pretrain.train import sharding
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.callbacks.averaging import WeightAveraging
from lm_pretrain.train.callbacks.meco import MecoCooldown
from lm_pretrain.train.callbacks.metrics import StepMetrics
from lm_pretrain.train.callbacks.milestones import Milestones
from lm_pretrain.train.callbacks.nonfinite import NonFiniteSteps
from lm_pretrain.train.callbacks.progress_plot import ProgressPlot
from lm_pretrain.train.callbacks.zero_shot import ZeroShotEval
from lm_pretrain.train.checkpoint import (
    load_state_file,
    load_weights,
    publish,
    read_checkpoint,
    set_rng_state,
    write_model_folder,
)
from lm_pretrain.train.compile_check import compiled_disagreement
from lm_pretrain.train.forward import (
    forward_loss,
    make_accelerator,
    packing_bos,
    split_batch,
    validation_loss,
)
from lm_pretrain.train.loop import SCALER_FILE, Trainer
from lm_pretrain.train.optim import build_optimizer
from lm_pretrain.train.schedule import Decay, make_schedule, total_steps
from lm_pretrain.train.signals import StopFlag
from lm_pretrain.train.start import Branch, check_same_data, lock_run_folder, lr_jump_warning, plan_start
from lm_pretrain.train.state import TrainState


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    first_val_loss: float | None
    final_val_loss: float | None
    unigram_entropy: float
    seconds: float  # training time of the run over all its attempts (and its parent's, for a branch)
    continued: bool = False  # started from a checkpoint (resumed or branched), not from scratch
    stopped_by_signal: bool = False
    already_finished: bool = False  # the run had reached its length: nothing was trained or written


def train(
    recipe: Recipe,
    run_dir: Path,
    console: Console | None = None,
    branch: Branch | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train `recipe` into `run_dir`, resuming from its newest checkpoint when it has one.
    `callbacks` (train/callbacks/) run after lmp's own, e.g. to log elsewhere or add a metric.

    <run>/status.json says what became of the run: running, finished, stopped or failed.
    """
    console = console or Console()
    is_main = os.environ.get("RANK", "0") == "0"  # set by torch.distributed launchers
    try:
        # cleanup: what must end even when training raises (the data worker would outlive us)
        with StopFlag() as stop, ExitStack() as cleanup:
            result = _train(recipe, run_dir, console, branch, resume, stop, cleanup, callbacks)
    except KeyboardInterrupt:
        if is_main and _started_here(run_dir):
            write_status(run_dir, "stopped", signal=int(signal.SIGINT), saved=False)
        raise
    except BaseException as exc:
        # only a run this process started is failed; a refused command leaves the folder as it was
        if is_main and _started_here(run_dir):
            write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if is_main:
        if result.stopped_by_signal:
            write_status(run_dir, "stopped", step=result.steps, signal=stop.signum)
        else:
            write_status(run_dir, "finished", step=result.steps)
    return result


def _finished_result(run_dir: Path, start_from: Path | None, steps: int) -> TrainResult | None:
    """The result of a run that already trained `steps` steps and wrote final/, else None."""
    # summary.json is written last: without it the final export is redone
    if start_from is None or start_from.parent.parent != run_dir or not (run_dir / SUMMARY_FILE).is_file():
        return None
    step = json.loads((start_from / "trainer_state.json").read_text())["step"]
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except ValueError:  # cut short by a kill: redo the final export, which rewrites it
        return None
    if step < steps or summary.get("step") != step:  # not done, or final/ is from an earlier length
        return None
    return TrainResult(
        run_dir,
        summary["step"],
        summary["tokens"],
        summary.get("first_val_loss"),
        summary.get("val_loss"),
        summary["unigram_entropy"],
        0.0,
        already_finished=True,
    )


def _started_here(run_dir: Path) -> bool:
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return status.get("state") == "running" and status.get("pid") == os.getpid()


def _train(
    recipe: Recipe,
    run_dir: Path,
    console: Console,
    branch: Branch | None,
    resume: bool,
    stop: StopFlag,
    cleanup: ExitStack,
    extra_callbacks: Sequence[Callback] = (),
) -> TrainResult:
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    accelerator = make_accelerator(recipe.train.precision)
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    cfg = recipe.train
    micro, accum = split_batch(cfg, world, f"{world} processes")
    seq_len = recipe.seq_len
    tokens_per_step = cfg.batch_size * seq_len

    plan = plan_start(recipe, run_dir, branch, resume)
    start_from, branch_record = plan.checkpoint, plan.branch_record

    with accelerator.main_process_first():
        report = is_main and not os.environ.get("LMP_DATA_REPORTED")  # lmp train --nproc did already
        data = prepare_data(recipe, console=console if report else None, show_progress=report)
    # words seen are counted at the corpus's average: windows are uniform samples of the stream
    words_per_token = sum(data.word_counts["train"].values()) / data.train.n_tokens
    main_steps = total_steps(recipe, words_per_token)
    steps = main_steps
    decay = None
    if branch_record is not None and branch_record["decay_steps"] is not None:
        start = branch_record["parent_step"]
        steps = start + branch_record["decay_steps"]
        if "start_lr_ratio" not in branch_record:
            # the LR the parent's own schedule has at the branch point, fixed when the branch starts
            parent = make_schedule(
                plan.parent_recipe.schedule, total_steps(plan.parent_recipe, words_per_token), tokens_per_step
            )
            branch_record["start_lr_ratio"] = parent(start)
            decay_start = parent.total - parent.decay
            if parent.decay and start > decay_start:
                ratio = branch_record["start_lr_ratio"]
                where = (
                    f"at the end of its run's decay (LR {ratio:.3g} of the peak)"
                    if ratio <= plan.parent_recipe.schedule.min_lr_ratio + 1e-6
                    else f"inside its run's decay, which began at step {decay_start} (LR {ratio:.3g} of the peak)"
                )
                raise LmpError(
                    f"--branch-from {branch_record['checkpoint']} is {where}: a decay branch would decay "
                    f"from there. Branch from a checkpoint before step {decay_start}, or from a main run "
                    "trained without a final decay (--set schedule.decay=0 --out runs/<main>)"
                )
        decay = Decay(
            start,
            branch_record["decay_steps"],
            branch_record["start_lr_ratio"],
            recipe.schedule.min_lr_ratio,
            recipe.schedule.decay_shape,
        )
    if branch_record is not None and decay is None and steps <= branch_record["parent_step"]:
        raise LmpError(
            f"this fork continues the schedule from step {branch_record['parent_step']}, but the recipe "
            f"trains {steps} steps in all, so it would train nothing; raise train.max_steps (or "
            "max_tokens / max_words_seen) above that with --set, or give --decay-steps / "
            "--decay-fraction for a decay branch"
        )
    schedule = make_schedule(recipe.schedule, main_steps, tokens_per_step, decay)
    finished = _finished_result(run_dir, start_from, steps)
    if finished is not None:
        return finished

    # read and loaded before the run is marked running: a damaged checkpoint is refused untouched
    checkpoint = read_checkpoint(start_from, accelerator.process_index) if start_from is not None else None
    lr_jump = None
    if checkpoint is not None:
        check_same_data(start_from, checkpoint.state, data, recipe)
        if plan.changes and branch_record is None:
            lr_jump = lr_jump_warning(
                plan.previous_recipe, schedule, checkpoint.state["step"], words_per_token
            )
    ids = special_token_ids(data.tokenizer, recipe.tokenizer)
    tokenizer_dir = run_dir / "tokenizer"
    set_seed(recipe.seed)
    model = Decoder(
        DecoderConfig.from_recipe(
            recipe.model,
            vocab_size=data.tokenizer.get_vocab_size(),
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
            objective=recipe.objective,
        )
    )
    model.activation_checkpointing = cfg.activation_checkpointing
    fsdp = cfg.distributed == "fsdp"
    if checkpoint is not None:
        load_weights(model, checkpoint, start_from)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_folder(run_dir, cleanup)
        # status.json first: it is what marks a folder as lmp's own (see _is_run_folder)
        write_status(run_dir, "running")
        write_atomic(run_dir / RECIPE_FILE, recipe.to_yaml())
        if branch_record is not None:
            write_atomic(run_dir / BRANCH_FILE, json.dumps(branch_record, indent=2) + "\n")
        tokenizer_dir.mkdir(exist_ok=True)
        save_hf_tokenizer(data.tokenizer, tokenizer_dir, recipe.tokenizer, recipe.model.max_seq_len)
    accelerator.wait_for_everyone()
    if fsdp:
        sharding.shard(model.to(accelerator.device))
    optimizer = build_optimizer(model, recipe.optim)
    callbacks: list[Callback] = [NonFiniteSteps(accelerator.device), StepMetrics(accelerator.device)]
    if cfg.average is not None:
        a = cfg.average
        averager = WeightAverager(model, a.kind, decay=a.decay, k=a.k, every=a.every)
        callbacks.append(WeightAveraging(averager, a.kind))
    state = TrainState(corpus=data.corpus_fingerprint)
    if checkpoint is not None:
        if fsdp:
            sharding.load_full_optimizer_state(optimizer, checkpoint.optimizer_state)
        else:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        if checkpoint.rng is not None:
            set_rng_state(checkpoint.rng)
        state = TrainState.from_dict(checkpoint.state, corpus=data.corpus_fingerprint)
        if accelerator.scaler is not None and (start_from / SCALER_FILE).is_file():  # fp16 on GPU
            accelerator.scaler.load_state_dict(load_state_file(start_from / SCALER_FILE))
    if is_main:
        if start_from is not None:
            verb = "resuming" if branch is None else "branching"
            console.print(f"{verb} from {start_from} (step {state.step})")
            for key, before, now in plan.changes:
                console.print(f"  changed {key}: {before!r} -> {now!r}", highlight=False)
            if lr_jump:
                console.print(lr_jump, style="yellow", highlight=False)
        # drop whatever a killed earlier attempt logged after the state we start from
        truncate_metrics(run_dir, state.step if start_from is not None else -1)
    # the plain Decoder, sharing its parameters with the DDP / compiled wrappers: what is saved,
    # averaged and probed (a compiled wrapper would prefix every parameter name)
    core = model
    if fsdp:
        optimizer = accelerator.prepare(optimizer)  # the model is sharded already, not DDP-wrapped
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    eager_model = model
    if cfg.compile:
        model = torch.compile(model)

    windows = PackedWindows(data.train.tokens, seq_len, recipe.seed, ids["bos"])
    # MeCo: windows of the metadata-prefixed documents until the cooldown, then plain ones. The
    # switch is read off the global token count, so a resumed run switches at the same step.
    meta_windows, meta_until = None, 0
    if data.train_meta is not None:
        meta = data.train_meta
        meta_windows = PackedWindows(
            meta.tokens, seq_len, recipe.seed, ids["bos"], meta.doc_offsets, meta.prefix_lengths
        )
        meta_until = round((1 - recipe.data.metadata.cooldown_fraction) * steps) * tokens_per_step
    document_bos = packing_bos(recipe, ids["bos"])
    if data.val.n_docs == 0:
        raise LmpError(
            f"no document could be held out for validation: the corpus has {data.train.n_docs} "
            "document(s). Lower data.lines_per_document (or separate documents by blank lines) so "
            "it splits into more"
        )
    val_batches = validation_batches(data.val.tokens, seq_len, cfg.eval_tokens, micro, ids["bos"])
    masker, val_mntp_batches = None, []
    if recipe.objective != "causal":
        masker = MntpMasker(
            recipe.hybrid, recipe.objective, recipe.seed, ids.values(), ids["mask"], core.config.vocab_size
        )
        # the masked validation loss: every row masked at the final rate, the same draw every time
        for b, (inputs, targets) in enumerate(val_batches):
            rows = torch.ones(len(inputs), dtype=torch.bool)
            first = VALIDATION_SAMPLES + b * micro
            samples = range(first, first + len(inputs))
            masked = masker.mask_rows(inputs, targets, rows, samples, recipe.hybrid.mask_rate_end)
            val_mntp_batches.append((*masked, rows))
    if cfg.compile:
        # the batch the training graph sees: masked next-token rows for the hybrid objectives
        inputs, targets, *rows = (t.to(accelerator.device) for t in (val_mntp_batches or val_batches)[0])
        problem = compiled_disagreement(
            model,
            core,
            lambda m: forward_loss(m, inputs, targets, document_bos, rows[0] if rows else None),
            accelerator.autocast,
            lambda: accelerator.no_sync(model),
            backward=not fsdp,
        )
        # every process trains the same way, whichever of them saw the problem
        flagged = torch.tensor(float(problem is not None), device=accelerator.device)
        if accelerator.reduce(flagged, "sum").item() > 0:
            model = eager_model
            if is_main:
                seen = f"{problem} on a validation batch" if problem else "seen by another process"
                console.print(
                    f"warning: torch.compile miscomputes this model on this machine ({seen}): "
                    "training without compile. Set train.compile=false to skip the check.",
                    style="yellow",
                    highlight=False,
                )
    sink = MetricsSink(run_dir, recipe, enabled=is_main)
    if recipe.eval is not None:
        from lm_pretrain.eval.runner import TrainingEvaluator

        # masked next-token and hybrid models are scored with both backends
        backends = ["causal"] if masker is None else ["causal", "mntp"]
        evaluator = TrainingEvaluator(recipe.eval, tokenizer_dir, backends)
        for note in evaluator.notes if is_main else []:
            console.print(f"note: {note}", highlight=False)
        callbacks.append(ZeroShotEval(evaluator, recipe.eval.every or cfg.eval_every))
    if is_main:
        n_params = core.num_parameters()
        console.print(
            f"model: {n_params / 1e6:.2f}M parameters | {steps} steps x {cfg.batch_size} sequences x "
            f"{seq_len} tokens = {steps * tokens_per_step / 1e6:.1f}M tokens, "
            f"{steps * tokens_per_step * words_per_token / 1e6:.1f}M words "
            f"({steps * cfg.batch_size / windows.windows_per_epoch:.2f} epochs) | "
            f"{accelerator.device}, {recipe.train.precision}, {world} process(es), accumulation {accum}"
        )

    if start_from is None:
        state.first_val_loss = state.val_loss = validation_loss(model, val_batches, accelerator, document_bos)
        state.val_loss_step = 0
        sink.log({"step": 0, "tokens": 0, "words": 0, "val_loss": state.val_loss})
    if meta_windows is not None:
        callbacks.append(MecoCooldown(meta_until))
    callbacks += [ProgressPlot(), Milestones(), *extra_callbacks]

    batches = TrainBatches(
        windows,
        micro=micro,
        accum=accum,
        batch_size=cfg.batch_size,
        rank=accelerator.process_index,
        seq_len=seq_len,
        start=(state.step, state.samples, state.tokens),
        last_step=steps,
        main_steps=main_steps,
        meta_windows=meta_windows,
        meta_until=meta_until,
        masker=masker,
    )
    for callback in callbacks if start_from is not None else []:
        callback.load_checkpoint(start_from)
    loader = train_loader(batches, cfg.data_worker, pin_memory=accelerator.device.type == "cuda")
    cleanup.callback(close_loader, loader)
    trainer = Trainer(
        recipe=recipe,
        run_dir=run_dir,
        tokenizer_dir=tokenizer_dir,
        accelerator=accelerator,
        model=model,
        core=core,
        optimizer=optimizer,
        schedule=schedule,
        state=state,
        steps=steps,
        accum=accum,
        batches=loader,
        windows=windows,
        words_per_token=words_per_token,
        val_batches=val_batches,
        val_mntp_batches=val_mntp_batches,
        document_bos=document_bos,
        sink=sink,
        stop=stop,
        console=console,
        callbacks=callbacks,
    )
    stopped = trainer.fit()

    seconds = time.perf_counter() - trainer.started
    exported = None if stopped else trainer.full_model()
    if is_main and not stopped:
        tmp = run_dir / ".tmp-final"
        provenance = {
            "kind": "final",
            "recipe": recipe.name,
            **state.to_dict(),
            "unigram_entropy": data.unigram_entropy,
        }
        write_model_folder(exported, tokenizer_dir, tmp, provenance)
        publish(tmp, run_dir / "final")
        trainer.emit("on_export")
        summary = {**state.to_dict(), "unigram_entropy": data.unigram_entropy, "seconds": seconds}
        write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    sink.close()
    accelerator.wait_for_everyone()
    return TrainResult(
        run_dir=run_dir,
        steps=state.step,
        tokens=state.tokens,
        first_val_loss=state.first_val_loss,
        final_val_loss=state.val_loss,
        unigram_entropy=data.unigram_entropy,
        seconds=seconds,
        continued=start_from is not None,
        stopped_by_signal=stopped,
    )
