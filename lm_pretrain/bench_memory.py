"""Peak memory of one training step, measured as RSS in a fresh process (peak RSS is per process,
and allocator caches would otherwise be shared between the models compared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lm_pretrain.bench import Shape


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Samples this process's RSS every `interval` seconds in a thread; .peak is the highest seen."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.peak = _rss_mb()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._work, daemon=True)

    def _work(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        self.peak = max(self.peak, _rss_mb())


def _memory_child(shape: Shape, which: str) -> float:
    """Peak memory (MiB) of a training step above the memory held before it, in a fresh process.

    The first step pages in code and creates the optimizer state; the second is the one measured,
    so the figure is activations, gradients and temporaries (the loss's logits among them).
    """
    from lm_pretrain.bench import (
        BackgroundBatches,
        Trainee,
        _hf_loss,
        _lmp_loss,
        _lmp_plain_loss,
        build_models,
    )

    device = torch.device("cpu")
    lmp, hf = build_models(shape, device)
    choices = {
        "hf": (hf, _hf_loss),
        "lmp": (lmp, _lmp_loss),
        "lmp-plain": (lmp, _lmp_plain_loss),
        "lmp-checkpointed": (lmp, _lmp_loss),
    }
    model, loss_fn = choices[which]
    lmp.activation_checkpointing = which == "lmp-checkpointed"
    del lmp, hf  # only the measured model stays alive
    trainee = Trainee(which, model, loss_fn, device)
    data = BackgroundBatches(shape, device)
    batches = [data.next() for _ in range(2)]
    data.close()
    trainee.step(*batches[0], record=False)
    before = _rss_mb()
    with RssSampler() as sampler:
        trainee.step(*batches[1], record=False)
    return sampler.peak - before


def step_memory_mb(shape: Shape, which: list[str]) -> dict[str, float | None]:
    """_memory_child for each of `which`, each in a subprocess of its own (peak RSS is per process,
    and allocator caches are shared), all started at once (most of each is imports); None where
    one failed."""
    # glibc then maps every large block on its own and unmaps it when freed, so RSS follows live tensors
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "MALLOC_MMAP_THRESHOLD_": "65536"}
    code = (
        "import json, sys; from lm_pretrain.bench import Shape; from lm_pretrain.bench_memory import _memory_child; "
        "print(json.dumps(_memory_child(Shape(**json.loads(sys.argv[1])), sys.argv[2])))"
    )
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(asdict(shape)), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for name in which
    }
    out: dict[str, float | None] = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate()
        lines = stdout.strip().splitlines()
        out[name] = float(lines[-1]) if proc.returncode == 0 and lines else None
    return out
