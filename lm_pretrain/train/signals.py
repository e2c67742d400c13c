"""Stopping on signals: SLURM preemption and time limits (SIGTERM, SIGUSR1) and Ctrl-C save a
checkpoint after the current step and exit with EXIT_STOPPED; every process stops at the same step."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

# `lmp train` exits with this code when a signal stopped it after saving: resubmit to resume
EXIT_STOPPED = 75


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM preemption, time limit); checked once per step.

    Ctrl-C (SIGINT) in the training loop (`armed`) also stops with a checkpoint; a second Ctrl-C,
    or one outside the loop, interrupts at once (KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (*STOP_SIGNALS, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            if not self.armed or self.signum is not None:
                raise KeyboardInterrupt
            if os.environ.get("RANK", "0") == "0":
                sys.stderr.write(
                    "\nCtrl-C: saving a checkpoint after this step (Ctrl-C again quits without)\n"
                )
        self.signum = signum


class StopVote:
    """Whether any process got a stop signal, agreed by all without a device sync per step: each
    step's vote is summed on a CPU (gloo) group in the background and read one step later, so
    every process stops at the same step, one step after the first signal."""

    def __init__(self, num_processes: int) -> None:
        self.group = torch.distributed.new_group(backend="gloo") if num_processes > 1 else None
        self.votes = torch.zeros(1)
        self.pending: Any = None

    def __call__(self, flag: bool) -> bool:
        if self.group is None:
            return flag
        if self.pending is not None:
            self.pending.wait()
            if self.votes.item() > 0:
                return True
        self.votes = torch.tensor([1.0 if flag else 0.0])
        self.pending = torch.distributed.all_reduce(self.votes, group=self.group, async_op=True)
        return False
