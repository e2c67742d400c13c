"""The optimizer and its update step."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from lm_pretrain.recipe import OptimConfig


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms), fused where the device supports it."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=optim.lr, betas=optim.betas, eps=optim.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def apply_update(
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    grad_norm: torch.Tensor,
    step_loss: torch.Tensor,
) -> torch.Tensor:
    """The optimizer step, skipped when the loss or the gradients are not finite (so no NaN
    reaches the weights). Returns that verdict as a device tensor, without waiting for the device:
    fused AdamW skips on the device (its found_inf input), and under fp16 the loss scaler does.
    Only a non-fused optimizer makes the host read the verdict (free on CPU).
    """
    if accelerator.scaler is not None:
        # fp16: the scaler skips a step whose scaled gradients overflowed and lowers its scale,
        # which is routine; only a non-finite loss counts as a bad step
        optimizer.step()
        return torch.isfinite(accelerator.reduce(step_loss, "sum"))
    # a non-finite loss makes the gradient norm non-finite too
    finite = torch.isfinite(grad_norm)
    inner = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper
    if inner.defaults.get("fused"):
        inner.found_inf = (~finite).float()
        optimizer.step()
    elif finite:
        optimizer.step()
    return finite
