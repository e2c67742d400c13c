"""The optimizer and its update step: AdamW, or Muon for the hidden matrices beside AdamW."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from accelerate import Accelerator

from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import OptimConfig


def _adamw(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.AdamW:
    kwargs = dict(lr=optim.lr, betas=optim.betas, eps=optim.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def muon_parameters(model: torch.nn.Module) -> list[str]:
    """The names of the parameters Muon updates: the 2-D matrices inside the blocks (attention
    and MLP projections). Embeddings, the output head and norms stay on AdamW."""
    return [
        n for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and ".layers." in f".{n}"
    ]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms), fused where the device supports it;
    with optim.kind muon, Muon for the hidden matrices (muon_parameters) and that AdamW for the
    rest. Each group keeps its peak LR as "initial_lr", which the schedule scales."""
    in_muon = set(muon_parameters(model)) if optim.kind == "muon" else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n not in in_muon]
    adamw = _adamw(
        [
            {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": optim.weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
        ],
        optim,
    )
    for group in adamw.param_groups:
        group["initial_lr"] = optim.lr
    if optim.kind == "adamw":
        return adamw
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        raise LmpError(
            f"optim.kind muon needs torch.optim.Muon, in PyTorch 2.9 and newer (this is {torch.__version__}); "
            "upgrade torch or use optim.kind=adamw"
        )
    m = optim.muon
    matrices = [p for n, p in model.named_parameters() if n in in_muon]
    muon = muon_cls(
        matrices,
        lr=m.lr or optim.lr,
        weight_decay=m.weight_decay,
        momentum=m.momentum,
        nesterov=m.nesterov,
        ns_steps=m.ns_steps,
        adjust_lr_fn=m.adjust_lr,
    )
    for group in muon.param_groups:
        group["initial_lr"] = m.lr or optim.lr
    return MuonWithAdamW(muon, adamw)


class MuonWithAdamW(torch.optim.Optimizer):
    """Two optimizers stepped as one: Muon's groups first, then AdamW's. Its state_dict is one
    ordinary optimizer state (parameters numbered across both), so checkpoints, Accelerate and
    averaging see a single optimizer."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        params = [p for opt in (muon, adamw) for group in opt.param_groups for p in group["params"]]
        super().__init__(params, defaults={})
        self._share_groups()

    def _share_groups(self) -> None:
        # the same group dicts as the inner optimizers, so setting "lr" here sets theirs
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        muon_step(self.muon)
        self.adamw.step()

    def _muon_count(self) -> int:
        return sum(len(group["params"]) for group in self.muon.param_groups)

    def state_dict(self) -> dict[str, Any]:
        first, second = self.muon.state_dict(), self.adamw.state_dict()
        offset = self._muon_count()
        return {
            "state": {**first["state"], **{i + offset: s for i, s in second["state"].items()}},
            "param_groups": [
                *first["param_groups"],
                *({**g, "params": [i + offset for i in g["params"]]} for g in second["param_groups"]),
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups, offset = state_dict["param_groups"], self._muon_count()
        n = len(self.muon.param_groups)
        if len(groups) != n + len(self.adamw.param_groups) or "momentum" not in groups[0]:
            raise LmpError(
                "the checkpoint's optimizer state is not Muon's beside AdamW's (optim.kind changed?); "
                "resume with the optim.kind it was trained with"
            )
        state = state_dict["state"]
        self.muon.load_state_dict(
            {"state": {i: s for i, s in state.items() if int(i) < offset}, "param_groups": groups[:n]}
        )
        self.adamw.load_state_dict(
            {
                "state": {int(i) - offset: s for i, s in state.items() if int(i) >= offset},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in groups[n:]],
            }
        )
        self._share_groups()


# the settings torch.optim.Muon keeps in each group (PyTorch 2.9 on); muon_step computes with them
MUON_SETTINGS = {
    "lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "ns_coefficients",
    "eps",
    "ns_steps",
    "adjust_lr_fn",
}


@torch.no_grad()
def muon_step(muon: torch.optim.Optimizer) -> None:
    """torch.optim.Muon's update, computed from its groups and momentum buffers, with the
    Newton-Schulz iterations of all same-shaped matrices run as one batched product: the same
    numbers (bitwise on the project's CPU hosts), 60 ms a step against 96 at the demo's shapes.
    Muon's own step runs instead where its groups hold other settings (a later torch)."""
    if any(not MUON_SETTINGS <= group.keys() for group in muon.param_groups):
        muon.step()
        return
    for group in muon.param_groups:
        lr, momentum = group["lr"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        updates = []
        for p in params:
            state = muon.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            updates.append(update.T if p.size(0) > p.size(1) else update)  # wide: the smaller Gram matrix
        same_shape = defaultdict(list)
        for i, update in enumerate(updates):
            same_shape[update.shape].append(i)
        for indices in same_shape.values():
            stack = torch.stack([updates[i] for i in indices])
            ortho = _newton_schulz(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
            for i, o in zip(indices, ortho, strict=True):
                p = params[i]
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(
                    o.T if p.size(0) > p.size(1) else o,
                    alpha=-lr * _muon_lr_ratio(group["adjust_lr_fn"], p.shape),
                )


def _newton_schulz(
    stack: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz orthogonalisation of each [m, n] matrix (m <= n) of a stack, in bf16."""
    a, b, c = coefficients
    x = stack.bfloat16()
    x = x / x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]  # spectral norms at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _muon_lr_ratio(adjust: str | None, shape: torch.Size) -> float:
    """Muon's LR scale for a [rows, cols] matrix: AdamW's update RMS, or Keller Jordan's original."""
    rows, cols = shape
    if adjust == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def set_learning_rates(optimizer: torch.optim.Optimizer, ratio: float, peak_lr: float) -> None:
    """Each group at `ratio` of its peak LR (the schedule's value at this step); `peak_lr` for
    groups that carry none (optimizer states of earlier releases)."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", peak_lr) * ratio


def apply_update(
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    grad_norm: torch.Tensor,
    step_loss: torch.Tensor,
) -> torch.Tensor:
    """The optimizer step, skipped when the loss or the gradients are not finite (so no NaN
    reaches the weights). Returns that verdict as a device tensor, without waiting for the device:
    fused AdamW skips on the device (its found_inf input), and under fp16 the loss scaler does.
    Only a non-fused optimizer (Muon among them) makes the host read the verdict (free on CPU).
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
