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
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console

from lm_pretrain.data.loader import (
    PackedWindows,
    TrainBatches,
    close_loader,
    train_loader,
)
from lm_pretrain.data.mixture import MixedWindows, mixture_table, run_words_per_token
from lm_pretrain.data.prepare import PreparedData, prepare_data
from lm_pretrain.data.tokenizer import save_hf_tokenizer, special_token_ids
from lm_pretrain.host_memory import keep_freed_memory
from lm_pretrain.model.decoder import Decoder
from lm_pretrain.recipe import Recipe
from lm_pretrain.run_folder import (
    BRANCH_FILE,
    FINAL_DIR,
    RECIPE_FILE,
    STATE_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    TOKENIZER_DIR,
    lock_run_folder,
    write_atomic,
    write_status,
)
from lm_pretrain.track import MetricsSink, truncate_metrics
from lm_pretrain.train import sharding
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.callbacks.hard_tokens import TokenHardness
from lm_pretrain.train.checkpoint import (
    load_weights,
    publish,
    read_checkpoint,
    write_model_folder,
)
from lm_pretrain.train.compile_check import compiled_or_eager
from lm_pretrain.train.distill import load_teachers, teachers_info
from lm_pretrain.train.forward import (
    make_accelerator,
    packing_bos,
    split_batch,
)
from lm_pretrain.train.loop import Trainer
from lm_pretrain.train.optim import build_optimizer
from lm_pretrain.train.schedule import SCHEDULE_KINDS, Schedule
from lm_pretrain.train.setup import (
    build_model,
    length_stages,
    own_callbacks,
    restore,
    source_validation,
    train_windows,
    validation_sets,
)
from lm_pretrain.train.signals import StopFlag
from lm_pretrain.train.start import (
    Branch,
    StartPlan,
    check_same_data,
    lr_jump_warning,
    plan_start,
    run_length,
)
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
    step = json.loads((start_from / STATE_FILE).read_text())["step"]
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
    keep_freed_memory()  # each step's activations reuse the last one's pages
    accelerator = make_accelerator(recipe.train.precision)
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    cfg = recipe.train
    micro, accum = split_batch(cfg, world, f"{world} processes")
    seq_len = recipe.seq_len

    plan = plan_start(recipe, run_dir, branch, resume)
    start_from, branch_record = plan.checkpoint, plan.branch_record

    with accelerator.main_process_first():
        report = is_main and not os.environ.get("LMP_DATA_REPORTED")  # lmp train --nproc did already
        data = prepare_data(recipe, console=console if report else None, show_progress=report)
    # the run's length in words at the corpus's average (windows are uniform samples of the
    # stream), or the mixture's; the loop counts the words of what it draws
    words_per_token = run_words_per_token(recipe, data)
    steps, main_steps, schedule = run_length(recipe, plan, words_per_token)
    finished = _finished_result(run_dir, start_from, steps)
    if finished is not None:
        return finished

    # read and loaded before the run is marked running: a damaged checkpoint is refused untouched
    checkpoint = read_checkpoint(start_from, accelerator.process_index) if start_from is not None else None
    if checkpoint is not None:
        check_same_data(start_from, checkpoint.state, data, recipe)
    teachers = None  # loaded (and checked) before the run folder is touched
    if recipe.distill is not None:
        teachers = load_teachers(
            recipe, data, accelerator.device, accelerator.autocast, console if is_main else None
        )
    ids = special_token_ids(data.tokenizer, recipe.tokenizer)
    tokenizer_dir = run_dir / TOKENIZER_DIR
    set_seed(recipe.seed)
    model = build_model(recipe, data, ids)
    fsdp = cfg.distributed == "fsdp"
    if checkpoint is not None:
        load_weights(model, checkpoint, start_from)
    if is_main:
        _open_run_folder(run_dir, recipe, branch_record, data, tokenizer_dir, cleanup)
    accelerator.wait_for_everyone()
    if fsdp:
        sharding.shard(model.to(accelerator.device))
    optimizer = build_optimizer(model, recipe.optim)
    state = TrainState(corpus=data.corpus_fingerprint)
    if checkpoint is not None:
        state = restore(checkpoint, start_from, optimizer, accelerator, fsdp, data.corpus_fingerprint)
    if is_main:
        if start_from is not None:
            _say_where_it_starts(console, plan, branch, schedule, state.step, words_per_token)
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
        # forget earlier runs' graphs in this process (lmp sweep, a notebook): each run's model is
        # new, and their graphs would count toward dynamo's recompile limit and then run eagerly
        torch.compiler.reset()
        model = torch.compile(model)

    windows, meta_windows, meta_until = train_windows(recipe, data, ids["bos"], steps, main_steps)
    document_bos = packing_bos(recipe, ids["bos"])
    val_batches, masker, val_mntp_batches = validation_sets(recipe, data, ids, micro)
    if cfg.compile:
        # the batch the training graph sees: masked next-token rows for the hybrid objectives
        batch = (val_mntp_batches or val_batches)[0]
        model = compiled_or_eager(model, eager_model, core, batch, accelerator, document_bos, fsdp, console)
    sink = MetricsSink(run_dir, recipe, enabled=is_main)
    meco_cooldown = meta_until if meta_windows is not None else None
    callbacks = own_callbacks(
        recipe,
        core,
        accelerator.device,
        tokenizer_dir,
        masker is not None,
        meco_cooldown,
        console if is_main else None,
        main_steps,
    )
    callbacks += extra_callbacks
    if is_main:
        console.print(_run_line(recipe, core, steps, words_per_token, windows, accelerator, accum))
        if teachers is not None:
            console.print(teachers_info(teachers))
        if isinstance(windows, MixedWindows):
            console.print(mixture_table(windows.plan, data.train, main_steps, cfg.batch_size, seq_len))

    for callback in callbacks if start_from is not None else []:
        callback.load_checkpoint(start_from)
    batches = TrainBatches(
        windows, micro=micro, accum=accum, batch_size=cfg.batch_size, rank=accelerator.process_index,
        seq_len=seq_len, start=(state.step, state.samples, state.tokens), last_step=steps,
        main_steps=main_steps, meta_windows=meta_windows, meta_until=meta_until, masker=masker,
        **length_stages(recipe, data, ids["bos"], main_steps),
    )  # fmt: skip
    loader = train_loader(batches, cfg.data_worker, pin_memory=accelerator.device.type == "cuda")
    cleanup.callback(close_loader, loader)
    hardness = next((c for c in callbacks if isinstance(c, TokenHardness)), None)
    items = loader if hardness is None else masker.in_training_process(loader, hardness.table)
    trainer = Trainer(
        recipe=recipe, run_dir=run_dir, tokenizer_dir=tokenizer_dir, accelerator=accelerator,
        model=model, core=core, optimizer=optimizer, schedule=schedule, state=state, steps=steps,
        accum=accum, batches=items, windows=windows, words_per_token=words_per_token,
        val_batches=val_batches, val_mntp_batches=val_mntp_batches, document_bos=document_bos,
        sink=sink, stop=stop, console=console, callbacks=callbacks, teachers=teachers,
        **source_validation(data, val_batches, recipe.train.eval_tokens),
    )  # fmt: skip
    if start_from is None:
        trainer.validate_before_training()
    return _run(trainer, data.unigram_entropy, continued=start_from is not None)


def _open_run_folder(
    run_dir: Path,
    recipe: Recipe,
    branch_record: dict | None,
    data: PreparedData,
    tokenizer_dir: Path,
    cleanup: ExitStack,
) -> None:
    """Lock the run folder, mark the run running and write what it was started with."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_run_folder(run_dir, cleanup)
    # status.json first: it is what marks a folder as lmp's own (run_folder.is_run_folder)
    write_status(run_dir, "running")
    write_atomic(run_dir / RECIPE_FILE, recipe.to_yaml())
    if branch_record is not None:
        write_atomic(run_dir / BRANCH_FILE, json.dumps(branch_record, indent=2) + "\n")
    tokenizer_dir.mkdir(exist_ok=True)
    save_hf_tokenizer(data.tokenizer, tokenizer_dir, recipe.tokenizer, recipe.model.max_seq_len)


def _export_final(trainer: Trainer, model: Decoder, unigram_entropy: float, seconds: float) -> None:
    """final/ (and the callbacks' exports, e.g. final-avg/), then summary.json, written last."""
    state, run_dir = trainer.state, trainer.run_dir
    tmp = run_dir / ".tmp-final"
    provenance = {
        "kind": "final",
        "recipe": trainer.recipe.name,
        **state.to_dict(),
        "unigram_entropy": unigram_entropy,
    }
    write_model_folder(model, trainer.tokenizer_dir, tmp, provenance)
    publish(tmp, run_dir / FINAL_DIR)
    trainer.emit("on_export")
    summary = {**state.to_dict(), "unigram_entropy": unigram_entropy, "seconds": seconds}
    write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def _run(trainer: Trainer, unigram_entropy: float, continued: bool) -> TrainResult:
    """Fit, then export the trained model (unless a signal stopped the run)."""
    stopped = trainer.fit()
    state, is_main = trainer.state, trainer.is_main
    seconds = time.perf_counter() - trainer.started
    exported = None if stopped else trainer.full_model()  # every process: a collective under FSDP
    if is_main and not stopped:
        _export_final(trainer, exported, unigram_entropy, seconds)
    trainer.sink.close()
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        run_dir=trainer.run_dir,
        steps=state.step,
        tokens=state.tokens,
        first_val_loss=state.first_val_loss,
        final_val_loss=state.val_loss,
        unigram_entropy=unigram_entropy,
        seconds=seconds,
        continued=continued,
        stopped_by_signal=stopped,
    )


def _say_where_it_starts(
    console: Console,
    plan: StartPlan,
    branch: Branch | None,
    schedule: Schedule,
    step: int,
    words_per_token: float,
) -> None:
    """The checkpoint a run continues from, the recipe fields changed since, and an LR jump."""
    verb = "resuming" if branch is None else "branching"
    console.print(f"{verb} from {plan.checkpoint} (step {step})")
    for key, before, now in plan.changes:
        console.print(f"  changed {key}: {before!r} -> {now!r}", highlight=False)
    if plan.changes and plan.branch_record is None:
        jump = lr_jump_warning(plan.previous_recipe, schedule, step, words_per_token)
        if jump:
            console.print(jump, style="yellow", highlight=False)


def _run_line(
    recipe: Recipe,
    core: Decoder,
    steps: int,
    words_per_token: float,
    windows: PackedWindows,
    accelerator: Accelerator,
    accum: int,
) -> str:
    """What is about to train: size, length in steps, tokens, words and epochs, and where."""
    batch, seq = recipe.train.batch_size, recipe.seq_len
    tokens = steps * batch * seq
    return (
        f"model: {core.num_parameters() / 1e6:.2f}M parameters | {steps} steps x {batch} sequences x "
        f"{seq} tokens = {tokens / 1e6:.1f}M tokens, {tokens * words_per_token / 1e6:.1f}M words "
        f"({steps * batch / windows.windows_per_epoch:.2f} epochs) | {accelerator.device}, "
        f"{recipe.train.precision}, {accelerator.num_processes} process(es), accumulation {accum}"
    )


def finished_message(result: TrainResult, recipe: Recipe, run_dir: Path, seconds: float) -> str:
    """What `lmp train` prints at the end: the losses and what to try next, or, for a run that had
    finished already, how to train it further."""
    if result.already_finished:
        branch_file = run_dir / BRANCH_FILE
        decay = json.loads(branch_file.read_text()).get("decay_steps") if branch_file.is_file() else None
        longer = (
            f"A decay branch's length is set by its decay ({decay} steps): for another decay, branch "
            "again into a new folder with --out and other --decay-steps / --decay-fraction."
            if decay is not None
            else _longer_hint(recipe)
        )
        return (
            f"{run_dir} already finished its {result.steps} steps; its model is {run_dir / 'final'}. {longer}"
        )
    first = f"{result.first_val_loss:.4f} -> " if result.first_val_loss is not None else ""
    prompt = "And God said" if recipe.data.path == "builtin:demo" else "The"  # the demo has the Bible
    meta = recipe.data.metadata  # a MeCo model is steered by the metadata it was trained with
    prefix = (
        f" --prefix '{meta.resolved_template.format(value='<value>')}'".replace("\n", "\\n") if meta else ""
    )
    minutes = seconds / 60
    overall = f" ({result.seconds / 60:.1f} min of training in all)" if result.continued else ""
    return (
        f"\n[bold green]done[/] in {minutes:.1f} min{overall}: {result.steps} steps, "
        f"{result.tokens / 1e6:.2f}M tokens\n"
        f"validation loss {first}{result.final_val_loss:.4f} nats/token "
        f"(unigram entropy of the training tokens: {result.unigram_entropy:.4f})\n"
        f"model: {run_dir / 'final'}  (try: lmp generate {run_dir / 'final'} --prompt '{prompt}'{prefix})"
    )


def _longer_hint(recipe: Recipe) -> str:
    sched = recipe.schedule
    if SCHEDULE_KINDS[sched.kind].decays_at_end(sched):
        return (
            "Its LR has decayed to the end: a larger train.max_steps moves the decay later, so the LR "
            "jumps back up when it resumes. To go on at the stable LR, fork a checkpoint from before "
            "the decay into a new folder (--branch-from CKPT --set train.max_steps=N --out DIR)."
        )
    return "To train longer, raise train.max_steps (or max_tokens, max_words_seen) with --set."
