"""The parts a run is built from, each from the recipe and the prepared data: the model, the
restored optimizer state, the training windows (per length for a sequence-length schedule), the
validation sets, and lmp's own callbacks in the order they run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console

from lm_pretrain.average import WeightAverager
from lm_pretrain.data.loader import (
    PackedWindows,
    seq_len_stages,
    validation_batches,
    validation_sources,
    validation_window_starts,
)
from lm_pretrain.data.masking import VALIDATION_SAMPLES, MntpMasker
from lm_pretrain.data.mixture import (
    MixedWindows,
    MixturePlan,
    source_tokens,
    source_words_per_token,
    stage_weights,
)
from lm_pretrain.data.prepare import PreparedData
from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import Decoder, DecoderConfig
from lm_pretrain.recipe import Recipe
from lm_pretrain.train import sharding
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.callbacks.averaging import WeightAveraging
from lm_pretrain.train.callbacks.hard_tokens import TokenHardness
from lm_pretrain.train.callbacks.meco import MecoCooldown
from lm_pretrain.train.callbacks.metrics import StepMetrics
from lm_pretrain.train.callbacks.milestones import Milestones
from lm_pretrain.train.callbacks.nonfinite import NonFiniteSteps
from lm_pretrain.train.callbacks.progress_plot import ProgressPlot
from lm_pretrain.train.callbacks.sequence_lengths import SequenceLengths
from lm_pretrain.train.callbacks.zero_shot import ZeroShotEval
from lm_pretrain.train.checkpoint import Checkpoint, load_state_file, set_rng_state
from lm_pretrain.train.loop import SCALER_FILE
from lm_pretrain.train.state import TrainState


def validation_sets(
    recipe: Recipe, data: PreparedData, ids: dict[str, int], micro: int
) -> tuple[list, MntpMasker | None, list]:
    """The fixed validation windows, the masker of a masked or hybrid objective, and the masked
    validation batches: every row masked at the final rate, the same draw every time."""
    if data.val.n_docs == 0:
        raise LmpError(
            f"no document could be held out for validation: the corpus has {data.train.n_docs} "
            "document(s). Lower data.lines_per_document (or separate documents by blank lines) so "
            "it splits into more"
        )
    val_batches = validation_batches(
        data.val.tokens, recipe.seq_len, recipe.train.eval_tokens, micro, ids["bos"]
    )
    if recipe.objective == "causal":
        return val_batches, None, []
    vocab = data.tokenizer.get_vocab_size()
    masker = MntpMasker(recipe.hybrid, recipe.objective, recipe.seed, ids.values(), ids["mask"], vocab)
    masked_batches = []
    for b, (inputs, targets) in enumerate(val_batches):
        rows = torch.ones(len(inputs), dtype=torch.bool)
        first = VALIDATION_SAMPLES + b * micro
        samples = range(first, first + len(inputs))
        masked = masker.mask_rows(inputs, targets, rows, samples, recipe.hybrid.mask_rate_end)
        masked_batches.append((*masked, rows))
    return val_batches, masker, masked_batches


def build_model(recipe: Recipe, data: PreparedData, ids: dict[str, int]) -> Decoder:
    config = DecoderConfig.from_recipe(
        recipe.model,
        vocab_size=data.tokenizer.get_vocab_size(),
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        objective=recipe.objective,
    )
    model = Decoder(config)
    model.activation_checkpointing = recipe.train.activation_checkpointing
    return model


def restore(
    checkpoint: Checkpoint,
    folder: Path,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    fsdp: bool,
    corpus: str,
) -> TrainState:
    """Load a checkpoint's optimizer, RNG and loss-scaler state; its TrainState."""
    if fsdp:
        sharding.load_full_optimizer_state(optimizer, checkpoint.optimizer_state)
    else:
        optimizer.load_state_dict(checkpoint.optimizer_state)
    if checkpoint.rng is not None:
        set_rng_state(checkpoint.rng)
    if accelerator.scaler is not None and (folder / SCALER_FILE).is_file():  # fp16 on GPU
        accelerator.scaler.load_state_dict(load_state_file(folder / SCALER_FILE))
    return TrainState.from_dict(checkpoint.state, corpus=corpus)


def train_windows(
    recipe: Recipe, data: PreparedData, bos: int | None, steps: int, main_steps: int
) -> tuple[PackedWindows | MixedWindows, PackedWindows | MixedWindows | None, int]:
    """The training windows (under data.mixture, per source); for MeCo also the metadata-prefixed
    ones and the token count at which the cooldown switches to plain ones (read off the global
    count, so a resumed run switches at the same step)."""
    meta = data.train_meta
    if recipe.data.mixture is not None:
        stages = stage_weights(recipe.data.mixture, data.train.sources, source_tokens(data.train))
        plan = MixturePlan(stages, main_steps, recipe.train.batch_size, recipe.seed)
        args = (plan, recipe.seq_len, recipe.seed, bos, source_words_per_token(data))
        windows = MixedWindows(data.train, *args)
        meta_windows = MixedWindows(meta, *args, prefixed=True) if meta is not None else None
    else:
        windows = PackedWindows(data.train.tokens, recipe.seq_len, recipe.seed, bos)
        meta_windows = None
        if meta is not None:
            meta_windows = PackedWindows(
                meta.tokens, recipe.seq_len, recipe.seed, bos, meta.doc_offsets, meta.prefix_lengths
            )
    if meta is None:
        return windows, None, 0
    tokens_per_step = recipe.train.batch_size * recipe.seq_len
    return (
        windows,
        meta_windows,
        round((1 - recipe.data.metadata.cooldown_fraction) * steps) * tokens_per_step,
    )


def own_callbacks(
    recipe: Recipe,
    core: Decoder,
    device: torch.device,
    tokenizer_dir: Path,
    masked: bool,
    meco_cooldown: int | None,
    console: Console | None,
    main_steps: int,
) -> list[Callback]:
    """lmp's own callbacks for this recipe, in the order they run (console: the main process's)."""
    callbacks: list[Callback] = [NonFiniteSteps(device), StepMetrics(device)]
    if masked and recipe.hybrid.masking == "hard":
        callbacks.append(TokenHardness(core.config.vocab_size, recipe.hybrid.hard_half_life, device))
    if recipe.train.average is not None:
        a = recipe.train.average
        averager = WeightAverager(core, a.kind, decay=a.decay, k=a.k, every=a.every)
        callbacks.append(WeightAveraging(averager, a.kind))
    if recipe.eval is not None:
        from lm_pretrain.eval.runner import TrainingEvaluator

        # masked next-token and hybrid models are scored with both backends
        evaluator = TrainingEvaluator(
            recipe.eval, tokenizer_dir, ["causal", "mntp"] if masked else ["causal"]
        )
        for note in evaluator.notes if console is not None else []:
            console.print(f"note: {note}", highlight=False)
        callbacks.append(ZeroShotEval(evaluator, recipe.eval.every or recipe.train.eval_every))
    if meco_cooldown is not None:
        callbacks.append(MecoCooldown(meco_cooldown))
    if recipe.train.seq_len_schedule is not None:
        callbacks.append(SequenceLengths(seq_len_stages(recipe.train.seq_len_schedule, main_steps)))
    return [*callbacks, ProgressPlot(), Milestones()]


def length_stages(recipe: Recipe, data: PreparedData, bos: int | None, main_steps: int) -> dict[str, Any]:
    """TrainBatches' stages and windows per length for train.seq_len_schedule (none without)."""
    schedule = recipe.train.seq_len_schedule
    if schedule is None:
        return {}
    meta = data.train_meta
    windows = {}
    for _, length in schedule:
        plain = PackedWindows(data.train.tokens, length, recipe.seed, bos)
        prefixed = None
        if meta is not None:
            prefixed = PackedWindows(
                meta.tokens, length, recipe.seed, bos, meta.doc_offsets, meta.prefix_lengths
            )
        windows[length] = (plain, prefixed)
    return {"stages": seq_len_stages(schedule, main_steps), "stage_windows": windows}


def source_validation(data: PreparedData, val_batches: list, eval_tokens: int) -> dict[str, Any]:
    """The Trainer's per-source validation for a corpus of several sources (none for one)."""
    if len(data.val.sources) < 2:
        return {}
    val = data.val
    seq_len = val_batches[0][0].shape[1]
    starts = validation_window_starts(len(val.tokens), seq_len, eval_tokens)
    sources = validation_sources(val.doc_offsets, val.doc_sources, starts, seq_len, len(val_batches[0][0]))
    return {"val_sources": sources, "source_names": list(val.sources)}
