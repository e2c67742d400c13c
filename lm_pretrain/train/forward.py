"""The model's loss on a batch (causal, packed documents, masked next-token rows) and the
validation loss over fixed windows; the process setup (Accelerate, batch split) they run under."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from lm_pretrain.data.loader import (
    IGNORE_INDEX,
    causal_mask,
    document_bounds,
    document_masks,
    document_positions,
)
from lm_pretrain.data.masking import objective_weights
from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import DecoderOutput, use_varlen_attention
from lm_pretrain.recipe import Recipe, TrainConfig

if TYPE_CHECKING:
    from lm_pretrain.train.distill import Teachers


def make_accelerator(precision: str) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    if precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        precision = "fp16"  # older GPUs: fp16 autocast with a loss scaler instead
    if precision == "fp16" and not on_gpu:
        raise LmpError("train.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    # Accelerate keeps one precision per process; a second run in the same process (a notebook,
    # a test, a merge that scores checkpoints) may ask for another. The process group is kept.
    AcceleratorState._reset_state()
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed)


def packing_bos(recipe: Recipe, bos_token_id: int | None) -> int | None:
    """The BOS id that keeps packed documents apart (data.packing: document), else None."""
    return bos_token_id if recipe.data.packing == "document" else None


def _attention(
    inputs: torch.Tensor, bos_token_id: int | None, bidirectional: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(position ids, attention mask, document bounds) for a batch: packed documents kept apart
    with a BOS id, masked next-token rows attending both ways."""
    positions = mask = bounds = None
    if bos_token_id is not None and bidirectional is None and use_varlen_attention(inputs.device):
        # flash attention per document: no [T, T] mask, and no work across documents
        positions, bounds = document_positions(inputs, bos_token_id), document_bounds(inputs, bos_token_id)
    elif bos_token_id is not None:
        positions, mask = document_masks(inputs, bos_token_id, bidirectional)
    elif bidirectional is not None:
        mask = causal_mask(inputs, bidirectional).unsqueeze(1)
    return positions, mask, bounds


def forward_loss(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    bos_token_id: int | None,
    bidirectional: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's loss on a batch; with a BOS id, packed documents are kept apart. Rows flagged
    in `bidirectional` (masked next-token rows) attend both ways, each objective weighted by its
    share of rows."""
    return forward(model, inputs, targets, bos_token_id, bidirectional).loss


def forward(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    bos_token_id: int | None,
    bidirectional: torch.Tensor | None = None,
    token_losses: bool = False,
    teachers: Teachers | None = None,
) -> DecoderOutput:
    """forward_loss's model output (no logits), with each target's loss when asked; with
    teachers, the loss is the distillation mix."""
    weights = None if bidirectional is None else objective_weights(targets, bidirectional)
    positions, mask, bounds = _attention(inputs, bos_token_id, bidirectional)
    extra: dict = {"return_token_losses": True} if token_losses else {}
    if teachers is not None:
        extra["distill"] = teachers.targets(inputs, positions, mask, bounds)
    # return_logits=False: the chunked loss, which never holds full-vocabulary logits
    out = model(
        inputs,
        targets,
        position_ids=positions,
        attn_mask=mask,
        return_logits=False,
        loss_weights=weights,
        cu_seqlens=bounds,
        **extra,
    )
    return out


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, batches: list, accelerator: Accelerator, document_bos: int | None = None
) -> float:
    """Mean cross-entropy (nats) over the fixed validation windows: (inputs, targets) batches are
    scored causally, (inputs, targets, bidirectional rows) ones as masked next-token rows."""
    return validation_losses(model, batches, accelerator, document_bos)[0]


@torch.no_grad()
def validation_losses(
    model: torch.nn.Module,
    batches: list,
    accelerator: Accelerator,
    document_bos: int | None = None,
    sources: list[torch.Tensor] | None = None,
    names: list[str] | None = None,
) -> tuple[float, dict[str, float]]:
    """validation_loss and, given `sources` (each causal batch's source index per target
    position) and their names, the mean per source from the same forward passes. Sources without
    a scored target are left out."""
    model.eval()
    device = accelerator.device
    loss_sum, count = torch.zeros((), device=device), torch.zeros((), device=device)
    names = names or []
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    counts = torch.zeros(len(names), dtype=torch.float64, device=device)
    for i, (inputs, targets, *bidirectional) in enumerate(batches):
        inputs, targets = inputs.to(device), targets.to(device)
        rows = bidirectional[0].to(device) if bidirectional else None
        with accelerator.autocast():
            out = forward(model, inputs, targets, document_bos, rows, token_losses=sources is not None)
        scored = targets.reshape(-1) != IGNORE_INDEX
        loss_sum += out.loss.float() * scored.sum()
        count += scored.sum()
        if sources is not None:
            where = sources[i].to(device).reshape(-1)[scored]
            sums.index_add_(0, where, out.token_losses[scored].double())
            counts.index_add_(0, where, torch.ones_like(where, dtype=torch.float64))
    model.train()
    by_source = {name: (sums[k] / counts[k]).item() for k, name in enumerate(names) if counts[k] > 0}
    return (loss_sum / count).item(), by_source


def split_batch(cfg: TrainConfig, world: int, processes: str) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) of each of `world` processes, or LmpError naming
    `processes` (how the user chose their number)."""
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if micro == 0 or cfg.batch_size % (micro * world):
        per = f" x train.micro_batch_size {cfg.micro_batch_size}" if cfg.micro_batch_size else ""
        raise LmpError(
            f"train.batch_size {cfg.batch_size} must be divisible by {processes}{per}: each process "
            "takes an equal share of a batch"
        )
    return micro, cfg.batch_size // (micro * world)
