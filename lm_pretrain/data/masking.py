"""Masked next-token prediction (MNTP) batches for the hybrid objective (GPT-BERT, BabyLM 2024).

A packed window (inputs, next-token targets) becomes an MNTP row by corrupting some input tokens:
the output at position k must predict the original token k + 1 wherever k + 1 was chosen, with
attention in both directions. A causal row is left as it is. Which rows are masked and how is a pure
function of (seed, global sample number, step), so a resumed run masks exactly as before; with
hybrid.masking hard also of each token's recent loss (train/callbacks/hard_tokens.py), state that
checkpoints carry. Hard masking runs in the training process, where that state is current; random
masking runs ahead in the data worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from lm_pretrain.model.decoder import IGNORE_INDEX
from lm_pretrain.recipe import HybridConfig

# keeps the masking random streams apart from the window-order streams, which are seeded [seed, epoch]
_STREAM = 0x6D6E7470
# validation rows are masked as samples numbered from here, far beyond any training sample
VALIDATION_SAMPLES = 1 << 62


class MntpMasker:
    def __init__(
        self,
        cfg: HybridConfig,
        objective: str,
        seed: int,
        special_ids: Iterable[int],
        mask_token_id: int,
        vocab_size: int,
    ) -> None:
        if objective not in ("masked_next_token", "hybrid"):
            raise ValueError(f"objective {objective!r} has no masked rows")
        self.cfg = cfg
        self.masked_fraction = 1.0 if objective == "masked_next_token" else cfg.masked_fraction
        self.seed = seed
        self.hard = cfg.masking == "hard"
        self.special = np.array(sorted(set(special_ids)), dtype=np.int64)
        self.mask_token_id = mask_token_id
        # random replacements are ordinary tokens, never BOS, EOS, padding or the mask itself
        self.replacements = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), self.special)

    def rate(self, progress: float) -> float:
        """The share of tokens chosen in a masked row at this point of training (0..1)."""
        start, end = self.cfg.mask_rate_start, self.cfg.mask_rate_end
        return start + (end - start) * min(max(progress, 0.0), 1.0)

    def is_masked(self, sample: int) -> bool:
        """Masked rows are spread evenly over the sample stream: any run of n samples holds
        masked_fraction x n of them, give or take one, so every batch has the recipe's mix."""
        f = self.masked_fraction
        return math.floor((sample + 1) * f) > math.floor(sample * f)

    def batch(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        first_sample: int,
        progress: float,
        hardness: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, bidirectional rows) for samples first_sample .. first_sample + B - 1;
        hardness (per token id, hard masking) weights which tokens are chosen."""
        samples = range(first_sample, first_sample + inputs.shape[0])
        rows = torch.tensor([self.is_masked(g) for g in samples], dtype=torch.bool)
        inputs, targets = self.mask_rows(inputs, targets, rows, samples, self.rate(progress), hardness)
        return inputs, targets, rows

    def mask_rows(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        rows: torch.Tensor,
        samples: Iterable[int],
        rate: float,
        hardness: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of inputs and targets in which each row flagged in `rows` is an MNTP row."""
        inputs, targets = inputs.clone(), targets.clone()
        samples = list(samples)
        if len(samples) != len(inputs):
            raise ValueError(f"{len(samples)} sample numbers for {len(inputs)} rows")
        for b, sample in enumerate(samples):
            if rows[b]:
                x, y = self._mask_row(inputs[b].numpy(), targets[b].numpy(), sample, rate, hardness)
                inputs[b], targets[b] = torch.from_numpy(x), torch.from_numpy(y)
        return inputs, targets

    def _mask_row(
        self, x: np.ndarray, y: np.ndarray, sample: int, rate: float, hardness: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _STREAM, sample])
        T = len(x)
        # position k may be chosen when it was itself a trained target (y[k - 1]: not a BOS, not a
        # metadata prefix) and is no special token; position 0 has no output before it
        candidate = np.zeros(T, dtype=bool)
        candidate[1:] = (y[:-1] != IGNORE_INDEX) & ~np.isin(x[1:], self.special)
        n_candidates = int(candidate.sum())
        out_y = np.full(T, IGNORE_INDEX, dtype=np.int64)
        if n_candidates == 0:
            return x.copy(), out_y
        # spans of 1..max_span tokens share one draw, so they are chosen (and replaced) together
        lengths = rng.integers(1, self.cfg.max_span + 1, size=T)
        span = np.repeat(np.arange(T), lengths)[:T]
        n_spans = int(span[-1]) + 1
        order, kind = rng.random(n_spans)[span], rng.random(n_spans)[span]
        if hardness is not None:
            order = self._hard_order(order, x, candidate, span, hardness)
        order[~candidate] = np.inf
        count = min(n_candidates, max(1, int(n_candidates * rate + rng.random())))
        chosen = np.argpartition(order, count - 1)[:count]

        out_x = x.copy()
        out_y[chosen - 1] = x[chosen]
        c = self.cfg
        to_mask = chosen[kind[chosen] >= c.random_fraction + c.keep_fraction]
        to_random = chosen[kind[chosen] < c.random_fraction]
        out_x[to_mask] = self.mask_token_id
        out_x[to_random] = self.replacements[rng.integers(len(self.replacements), size=len(to_random))]
        return out_x, out_y

    def _hard_order(
        self, order: np.ndarray, x: np.ndarray, candidate: np.ndarray, span: np.ndarray, hardness: np.ndarray
    ) -> np.ndarray:
        """Keys whose smallest `count` are a weighted draw without replacement (Efraimidis and
        Spirakis: an exponential key of rate w per span), a span weighing as its hardest token."""
        h = hardness[x]
        mix = self.cfg.hard_mix
        weight = np.where(candidate, (1 - mix) + mix * h / max(float(h[candidate].mean()), 1e-6), 0.0)
        starts = np.flatnonzero(np.diff(span, prepend=-1))
        span_weight = np.maximum.reduceat(weight, starts)[span]
        with np.errstate(divide="ignore"):
            return np.where(span_weight > 0, -np.log1p(-order) / span_weight, np.inf)

    def in_training_process(
        self, items: Iterator[tuple[torch.Tensor, ...]], hardness: Callable[[], np.ndarray]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Hard masking of the data worker's unmasked items (inputs, targets, first sample,
        progress), each with the hardness current when the training loop asks for it."""
        for inputs, targets, first_sample, progress in items:
            yield self.batch(inputs, targets, int(first_sample), float(progress), hardness())


def objective_weights(targets: torch.Tensor, bidirectional: torch.Tensor) -> torch.Tensor | None:
    """Per-target loss weights that give each objective its share of rows, as GPT-BERT does.

    A masked row has far fewer targets than a causal one (15-30% against all), so a plain mean over
    targets would let the few causal rows dominate. Instead each objective's loss is the mean over
    its own targets, weighted by its share of the batch's rows. None when the batch has one kind.
    """
    kinds = [rows for rows in (bidirectional, ~bidirectional) if rows.any()]
    if len(kinds) < 2:
        return None
    valid = (targets != IGNORE_INDEX).float()
    weights = torch.zeros_like(valid)
    for rows in kinds:
        share = rows.float().mean()
        weights[rows] = valid[rows] * share / valid[rows].sum().clamp(min=1.0)
    return weights
