"""A first-batch check of torch.compile: the compiled model against the eager one.

Inductor and the kernels it calls can miscompute on particular CPUs and shapes (seen: compiled
bf16 training at tiny shapes on Xeons with AMX gave non-finite gradients at step 1 while eager bf16
was fine). Rather than train on garbage, every compiled run first scores one batch both ways,
loss and gradient norm, and trains eagerly when they disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from rich.console import Console

from lm_pretrain.train.forward import forward_loss

# bf16 rounding moves the loss by about 1e-5 and the gradient norm by about 1e-3 between eager
# and compiled; a miscompilation gives NaN/inf or errors of order one
TOLERANCE = 0.05


def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


def compiled_disagreement(
    compiled: torch.nn.Module,
    eager: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    autocast: Callable[[], object] = nullcontext,
    no_sync: Callable[[], object] = nullcontext,
    backward: bool = True,
) -> str | None:
    """None when `compiled` and `eager` (the same weights) give the same loss and, with
    `backward`, the same gradient norm on loss_fn's batch; otherwise what differs, in words.

    Gradients are left zeroed (None). `no_sync` keeps a DDP wrapper from all-reducing the check's
    gradients; without `backward` (FSDP, whose gradients reduce-scatter) only the loss is compared.
    """
    params = [p for p in eager.parameters() if p.requires_grad]
    results = []
    for model in (eager, compiled):
        with no_sync() if model is compiled else nullcontext(), torch.enable_grad():
            # the compiled model is called as the training step calls it (accelerate's forward
            # applies autocast itself): under an outer autocast dynamo would compile a second
            # training graph, which training never runs (a minute of a cold first run on a CPU)
            with nullcontext() if model is compiled else autocast():
                loss = loss_fn(model)
            if backward:
                loss.float().backward()
        results.append((loss.item(), _grad_norm(params) if backward else 0.0))
        for p in params:
            p.grad = None
    (eager_loss, eager_norm), (loss, norm) = results
    if not (math.isfinite(eager_loss) and math.isfinite(eager_norm)):
        return None  # the model itself diverges here; the non-finite step guard speaks for that
    if not math.isfinite(loss) or abs(loss - eager_loss) > TOLERANCE * abs(eager_loss):
        return f"loss {loss:.4g} compiled, {eager_loss:.4g} eager"
    if not math.isfinite(norm) or abs(norm - eager_norm) > TOLERANCE * eager_norm:
        return f"gradient norm {norm:.4g} compiled, {eager_norm:.4g} eager (loss {loss:.4g} both)"
    return None


def compiled_or_eager(
    compiled: torch.nn.Module,
    eager: torch.nn.Module,
    core: torch.nn.Module,
    batch: tuple[torch.Tensor, ...],
    accelerator: Accelerator,
    document_bos: int | None,
    fsdp: bool,
    console: Console,
) -> torch.nn.Module:
    """The model to train: `compiled` when it agrees with the eager `core` on `batch`, else
    `eager` (DDP-wrapped, not compiled), with a warning; every process decides alike."""
    inputs, targets, *rows = (t.to(accelerator.device) for t in batch)
    problem = compiled_disagreement(
        compiled,
        core,
        lambda m: forward_loss(m, inputs, targets, document_bos, rows[0] if rows else None),
        accelerator.autocast,
        lambda: accelerator.no_sync(compiled),
        backward=not fsdp,
    )
    # every process trains the same way, whichever of them saw the problem
    flagged = torch.tensor(float(problem is not None), device=accelerator.device)
    if accelerator.reduce(flagged, "sum").item() == 0:
        return compiled
    if accelerator.is_main_process:
        seen = f"{problem} on a validation batch" if problem else "seen by another process"
        console.print(
            f"warning: torch.compile miscomputes this model on this machine ({seen}): "
            "training without compile. Set train.compile=false to skip the check.",
            style="yellow",
            highlight=False,
        )
    return eager
