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
            with autocast():
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
