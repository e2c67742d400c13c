"""Packed training windows: deterministic, shuffled per epoch, resumable in constant time.

The train tokens are one stream (each document is BOS + text + EOS). An epoch cuts it into
windows of seq_len + 1 tokens, starting at a per-epoch random offset so that window
boundaries move between epochs, and visits them in a per-epoch random order. Sample g of the
run is therefore a pure function of (seed, g): resuming needs only the count of samples
consumed, never a replay of earlier batches.

TrainBatches lays out one process's micro-batches step after step; train_loader runs it in a
background worker process, so batches (and masking) are ready before the step asks for them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import IGNORE_INDEX

if TYPE_CHECKING:
    from lm_pretrain.data.masking import MntpMasker


class PackedWindows:
    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        seed: int,
        bos_token_id: int,
        doc_offsets: np.ndarray | None = None,
        prefix_lengths: np.ndarray | None = None,
    ) -> None:
        """With `prefix_lengths` (and the documents' offsets), the prefix tokens that follow each
        document's BOS are inputs only: no loss is taken on them (metadata conditioning)."""
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.prefix_lengths = prefix_lengths
        self.seq_len = seq_len
        self.seed = seed
        self.bos_token_id = bos_token_id
        # leave room for the largest epoch offset so every epoch has the same window count
        self.windows_per_epoch = (len(tokens) - 1 - seq_len) // seq_len
        if self.windows_per_epoch < 1:
            raise LmpError(
                f"the training split has {len(tokens)} tokens, too few for even two windows of "
                f"seq_len {seq_len}; use a larger corpus or a smaller train.seq_len"
            )
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._offset = 0

    def _set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset = int(rng.integers(self.seq_len))
            self._order = rng.permutation(self.windows_per_epoch)
            self._epoch = epoch

    def start(self, sample: int) -> int:
        """Where in the token stream global sample number `sample` starts."""
        epoch, index = divmod(sample, self.windows_per_epoch)
        self._set_epoch(epoch)
        return self._offset + int(self._order[index]) * self.seq_len

    def window(self, sample: int) -> np.ndarray:
        """The seq_len + 1 tokens of global sample number `sample`."""
        start = self.start(sample)
        return self.tokens[start : start + self.seq_len + 1]

    def batch(self, first_sample: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and aligned targets for samples first_sample .. first_sample + size - 1."""
        starts = [self.start(first_sample + i) for i in range(size)]
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        inputs, targets = split_inputs_targets(torch.from_numpy(rows), self.bos_token_id)
        if self.prefix_lengths is not None:
            # target t of a window is stream position start + 1 + t
            positions = np.asarray(starts)[:, None] + 1 + np.arange(self.seq_len)[None, :]
            targets[torch.from_numpy(self._in_prefix(positions))] = IGNORE_INDEX
        return inputs, targets

    def _in_prefix(self, positions: np.ndarray) -> np.ndarray:
        doc = np.searchsorted(self.doc_offsets, positions, side="right") - 1
        into = positions - self.doc_offsets[doc]  # 0 is the document's BOS
        return (into >= 1) & (into <= self.prefix_lengths[doc])

    def epoch_of(self, samples_done: int) -> float:
        return samples_done / self.windows_per_epoch

    def __getstate__(self) -> dict:
        # a worker started by spawn / forkserver reopens the token file instead of receiving a copy
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap):
            t = self.tokens
            state["tokens"] = ("memmap", t.filename, t.dtype.str, t.shape, t.offset)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["tokens"], tuple):
            _, filename, dtype, shape, offset = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)


def seq_len_stages(schedule: list[tuple[float, int]], steps: int) -> list[tuple[int, int]]:
    """train.seq_len_schedule as (first step after the stage, length) over `steps` steps."""
    return [(round(fraction * steps), length) for fraction, length in schedule]


def length_at(stages: list[tuple[int, int]], step: int) -> int:
    """The sequence length of `step` (0-based) under seq_len_stages; the last stage's beyond."""
    return next((length for end, length in stages if step < end), stages[-1][1])


class TrainBatches(torch.utils.data.IterableDataset):
    """One process's micro-batches, in training order, from a resume point to the last step.

    Step s uses global samples samples_done + [rank x micro x accum, (rank + 1) x micro x accum): the
    same split of the global batch as DDP. Before `meta_until` tokens the metadata-prefixed windows
    are used (MeCo); with a masker, rows become masked next-token rows. Items are
    (inputs, targets) or (inputs, targets, bidirectional rows).

    With a sequence-length schedule (`stages`, windows per length in `stage_windows`) a step at
    length L takes seq_len / L times the sequences, so every step keeps its tokens; its samples are
    numbered step x batch_size x seq_len / L in the windows of length L, where the same fraction of
    an epoch has passed as in tokens. Every step is a pure function of (seed, step).
    """

    def __init__(
        self,
        windows: PackedWindows,
        *,
        micro: int,
        accum: int,
        batch_size: int,
        rank: int,
        seq_len: int,
        start: tuple[int, int, int],
        last_step: int,
        main_steps: int,
        meta_windows: PackedWindows | None = None,
        meta_until: int = 0,
        masker: MntpMasker | None = None,
        stages: list[tuple[int, int]] | None = None,
        stage_windows: dict[int, tuple[PackedWindows, PackedWindows | None]] | None = None,
    ) -> None:
        self.windows, self.meta_windows, self.meta_until = windows, meta_windows, meta_until
        self.micro, self.accum, self.batch_size, self.rank, self.seq_len = (
            micro,
            accum,
            batch_size,
            rank,
            seq_len,
        )
        self.start, self.last_step, self.main_steps = (
            start,
            last_step,
            main_steps,
        )  # start: step, samples, tokens
        self.masker = masker
        self.stages, self.stage_windows = stages, stage_windows

    def _layout(self, step: int, samples: int) -> tuple[PackedWindows, PackedWindows | None, int, int]:
        """(windows, metadata windows, micro-batch rows, first sample) of `step`."""
        if self.stages is None:
            return self.windows, self.meta_windows, self.micro, samples
        length = length_at(self.stages, step)
        factor = self.seq_len // length
        windows, meta = self.stage_windows[length]
        return windows, meta, self.micro * factor, step * self.batch_size * factor

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        step, samples, tokens = self.start
        while step < self.last_step:
            windows, meta, micro, step_first = self._layout(step, samples)
            source = meta if tokens < self.meta_until else windows
            first = step_first + self.rank * micro * self.accum
            for i in range(self.accum):
                inputs, targets = source.batch(first + i * micro, micro)
                progress = step / self.main_steps
                if self.masker is None:
                    yield inputs, targets
                elif self.masker.hard:  # masked in the training process (MntpMasker.in_training_process)
                    yield (
                        inputs,
                        targets,
                        torch.tensor(first + i * micro),
                        torch.tensor(progress, dtype=torch.float64),
                    )
                else:
                    yield self.masker.batch(inputs, targets, first + i * micro, progress)
            step, samples, tokens = (
                step + 1,
                samples + self.batch_size,
                tokens + self.batch_size * self.seq_len,
            )


def train_loader(
    batches: TrainBatches, background: bool, pin_memory: bool
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batches, prepared by one worker process ahead of the training loop (or in the loop)."""
    if not background:
        return iter(batches)
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,  # items are whole micro-batches already
        num_workers=1,  # one: every worker of an iterable dataset would yield the whole stream
        prefetch_factor=min(64, 2 * batches.accum),  # two optimizer steps ahead
        pin_memory=pin_memory,
        worker_init_fn=_ignore_stop_signals,
    )
    return iter(loader)


def close_loader(loader: Iterator) -> None:
    """End the data worker now. Needed when training raises: the traceback keeps the loader
    alive, and at exit multiprocessing would wait forever for a worker that ignores SIGTERM."""
    shutdown = getattr(loader, "_shutdown_workers", None)  # DataLoader's own orderly shutdown
    if shutdown is not None:
        shutdown()
    for worker in getattr(loader, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join()


def _ignore_stop_signals(worker_id: int) -> None:
    # SLURM signals every process of a job step, and Ctrl-C the whole process group: the worker
    # must outlive the trainer's final save
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def split_inputs_targets(rows: torch.Tensor, bos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 tokens -> (inputs, next-token targets).

    A BOS target is never trained: BOS only ever starts a document, so predicting it would
    teach nothing the model uses and would flatter the loss.
    """
    inputs = rows[:, :-1].contiguous()
    targets = rows[:, 1:].clone()
    targets[targets == bos_token_id] = IGNORE_INDEX
    return inputs, targets


def document_masks(
    inputs: torch.Tensor, bos_token_id: int, bidirectional: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and attention mask that keep packed documents apart (data.packing: document).

    Every BOS starts a document: positions restart there, and a token attends only to earlier
    tokens of its own document (a block-diagonal causal mask, True = may attend, [B, 1, T, T]).
    The partial document a window starts inside counts as one document from position 0. Rows
    flagged in `bidirectional` ([B] bool, masked next-token rows) see their whole document.
    """
    doc = torch.cumsum((inputs == bos_token_id).long(), dim=1)
    same_doc = doc.unsqueeze(2) == doc.unsqueeze(1)
    return document_positions(inputs, bos_token_id), (
        same_doc & causal_mask(inputs, bidirectional)
    ).unsqueeze(1)


def document_positions(inputs: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """Position ids [B, T] that restart at 0 at every BOS (and at the start of each row)."""
    starts = inputs == bos_token_id
    index = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    # the index of each token's document start: a running maximum of the start positions
    start_index = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return index - start_index


def document_bounds(inputs: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """Where the documents of the flattened batch begin, as variable-length attention takes them:
    int32 cumulative offsets [0, ..., B*T], a document starting at every BOS and at every row start.

    The same documents as document_masks draws; finding them reads the batch on the host.
    """
    starts = inputs == bos_token_id
    starts[:, 0] = True
    offsets = starts.flatten().nonzero().flatten()
    end = torch.tensor([inputs.numel()], device=inputs.device)
    return torch.cat([offsets, end]).to(torch.int32)


def causal_mask(inputs: torch.Tensor, bidirectional: torch.Tensor | None) -> torch.Tensor:
    """[T, T] lower-triangular mask, or [B, T, T] with the flagged rows all True."""
    T = inputs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=inputs.device).tril()
    if bidirectional is None:
        return causal
    return causal | bidirectional.to(inputs.device)[:, None, None]


def validation_window_starts(n_tokens: int, seq_len: int, max_tokens: int) -> np.ndarray:
    """Where each validation window starts: spread evenly over the whole split, so that a budget
    smaller than the split still samples every part of it (the split is ordered by source)."""
    available = (n_tokens - 1) // seq_len
    count = min(max(1, max_tokens // seq_len), available)
    if count < 1:
        raise LmpError(
            f"the validation split has {n_tokens} tokens, fewer than one window of seq_len "
            f"{seq_len}; raise data.validation_fraction or lower train.seq_len"
        )
    return (np.arange(count) * available // count) * seq_len


def validation_batches(
    tokens: np.ndarray, seq_len: int, max_tokens: int, batch_size: int, bos_token_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed windows of the validation split (validation_window_starts), the same at every eval."""
    starts = validation_window_starts(len(tokens), seq_len, max_tokens)
    rows = np.stack([tokens[i : i + seq_len + 1] for i in starts])
    rows_t = torch.from_numpy(rows.astype(np.int64))
    return [
        split_inputs_targets(rows_t[i : i + batch_size], bos_token_id)
        for i in range(0, len(starts), batch_size)
    ]


def validation_sources(
    doc_offsets: np.ndarray, doc_sources: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int
) -> list[torch.Tensor]:
    """For validation_batches, each target position's source index (that of its document)."""
    positions = starts[:, None] + 1 + np.arange(seq_len)[None, :]  # the targets' tokens
    docs = np.clip(np.searchsorted(doc_offsets, positions, side="right") - 1, 0, len(doc_sources) - 1)
    by_window = torch.from_numpy(doc_sources[docs].astype(np.int64))
    return list(by_window.split(batch_size))
