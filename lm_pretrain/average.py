"""Weight averages kept during training: an EMA, or the mean of the last K snapshots (LAWA).

An average of the weights along a constant-LR (or WSD stable-stage) trajectory approximates what a
learning-rate decay would give, so evaluating it beside the raw weights judges a run mid-way.

    averager = WeightAverager(model, kind="ema", decay=0.999)       # or kind="last_k", k=4
    ...each step: if averager.due(step): averager.update(model)
    ...at eval:   with averager.applied(model): avg_loss = validation_loss(model, ...)

The average lives in fp32 on the parameters' device; `state_dict()` / `load_state_dict()` carry it
through a checkpoint so a resumed run continues the same average.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from lm_pretrain.errors import LmpError

Kind = Literal["ema", "last_k"]


class WeightAverager:
    """An EMA (`kind="ema"`) or last-K mean (`kind="last_k"`) of a model's parameters.

    ema: the first update copies the weights, then avg = decay * avg + (1 - decay) * weights.
    last_k: each update stores a snapshot; the average is the plain mean of the newest k.
    `every` is the step interval between updates (`due(step)` says when); the EMA decays once per
    update, so its horizon is about every / (1 - decay) steps. Pass the unwrapped model
    (accelerator.unwrap_model) so parameter names carry no DDP or torch.compile prefix.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kind: Kind,
        decay: float = 0.999,
        k: int = 4,
        every: int = 1,
        device: str | torch.device | None = None,
    ):
        if kind not in ("ema", "last_k"):
            raise LmpError(f"train.average.kind must be ema or last_k, got {kind!r}")
        if not 0 < decay < 1:
            raise LmpError(f"train.average.decay must be in (0, 1), got {decay}")
        if k < 1 or every < 1:
            raise LmpError(f"train.average.k and .every must be >= 1, got k={k}, every={every}")
        self.kind, self.decay, self.k, self.every = kind, decay, k, every
        # named_parameters() lists a tied embedding once, so it is averaged once
        self.names = [name for name, _ in model.named_parameters()]
        # where the average lives: the parameters' device unless told (e.g. "cpu" to spare a GPU)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.updates = 0
        self.ema: list[torch.Tensor] | None = None
        self.snapshots: deque[list[torch.Tensor]] = deque(maxlen=k)

    def due(self, step: int) -> bool:
        """Whether the caller should update at this (1-based, completed) optimizer step."""
        return step % self.every == 0

    def _params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = dict(model.named_parameters())
        if list(params) != self.names:
            raise LmpError("the model's parameters differ from those the average was built for")
        return list(params.values())

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's current weights into the average."""
        current = [p.detach().to(self.device, torch.float32) for p in self._params(model)]
        if self.kind == "ema":
            if self.ema is None:
                self.ema = [t.clone() for t in current]
            else:
                for avg, new in zip(self.ema, current, strict=True):
                    avg.lerp_(new, 1.0 - self.decay)
        else:
            self.snapshots.append([t.clone() for t in current])
        self.updates += 1

    @property
    def ready(self) -> bool:
        """True once there is something to evaluate (after the first update)."""
        return self.updates > 0

    @torch.no_grad()
    def averaged(self) -> dict[str, torch.Tensor]:
        """name -> fp32 averaged parameter (new tensors for last_k, the live EMA for ema)."""
        if not self.ready:
            raise LmpError("the weight average has no update yet; call update(model) first")
        if self.kind == "ema":
            tensors = self.ema
        else:
            tensors = [_mean(group) for group in zip(*self.snapshots, strict=True)]
        return dict(zip(self.names, tensors, strict=True))

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Swap the averaged weights into `model` for the block; the raw weights come back after,
        bit for bit, even if the block raises."""
        params = self._params(model)
        averaged = self.averaged()
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p, name in zip(params, self.names, strict=True):
                p.copy_(averaged[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, saved in zip(params, backup, strict=True):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the average after a resume (tensors moved to CPU)."""
        return {
            "kind": self.kind,
            "decay": self.decay,
            "k": self.k,
            "every": self.every,
            "names": list(self.names),
            "updates": self.updates,
            "ema": None if self.ema is None else [t.cpu() for t in self.ema],
            "snapshots": [[t.cpu() for t in snap] for snap in self.snapshots],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); LmpError if it is of another kind or another model."""
        if state["kind"] != self.kind or state["names"] != self.names:
            raise LmpError(
                f"the saved weight average is a {state['kind']} over {len(state['names'])} tensors, this run "
                f"wants a {self.kind} over {len(self.names)}; keep train.average as it was, or start a new run"
            )
        self.decay, self.k, self.every, self.updates = (
            state["decay"],
            state["k"],
            state["every"],
            state["updates"],
        )
        self.ema = None if state["ema"] is None else [t.to(self.device) for t in state["ema"]]
        self.snapshots = deque(
            ([t.to(self.device) for t in snap] for snap in state["snapshots"]), maxlen=self.k
        )


def _mean(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Sum oldest first, then divide: one fixed order, so the result is reproducible exactly."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total / len(tensors)
