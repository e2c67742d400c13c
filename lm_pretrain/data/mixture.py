"""data.mixture: training windows drawn from each source at the recipe's weights, in stages.

Each source is a stream of windows of its own (PackedWindows over its documents), so a source with
a larger share than its size is visited more often: more passes over it. Within a stage, the run's
samples go in blocks of MIX_BLOCK, each holding every source's share of the block exactly (largest
remainders), spread evenly over it at seeded phases. Sample g's source and its index in that source's stream are then
closed-form functions of (seed, g): a resumed run, or one with another number of processes, draws
exactly the same windows, across stage changes too. Stages end at fractions of the main run's
steps; the last continues past it (decay branches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.table import Table

from lm_pretrain.data.loader import PackedWindows
from lm_pretrain.data.shards import TokenShard
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import MixtureConfig, Recipe

if TYPE_CHECKING:
    from lm_pretrain.data.prepare import PreparedData

MIX_BLOCK = 1024  # samples per block: shares exact to 1/1024 of the samples
_STREAM = 0x6D697820  # keeps the block orders apart from the window-order streams


def stage_weights(
    cfg: MixtureConfig, sources: list[str], sizes: np.ndarray | None = None
) -> list[tuple[float, np.ndarray]]:
    """(until, share per source in `sources` order) per stage; LmpError for a weight naming no
    source of the corpus or a stage where every source weighs 0. With relative_to_size the
    weights multiply each source's `sizes` (its training tokens)."""
    named = set(cfg.weights).union(*(stage.weights for stage in cfg.stages or []))
    unknown = sorted(named - set(sources) - {"default"})
    if unknown:
        raise LmpError(
            f"data.mixture names source {unknown[0]!r}, which the training corpus does not have "
            f"(its sources: {', '.join(sources)}); fix the name or drop it"
        )
    base = {name: cfg.weights.get(name, cfg.weights.get("default", 1.0)) for name in sources}
    stages = []
    for stage in cfg.stages or [None]:
        given = stage.weights if stage is not None else {}
        w = np.array([float(given.get(name, given.get("default", base[name]))) for name in sources])
        if cfg.relative_to_size:
            w = w * sizes
        until = stage.until if stage is not None else 1.0
        if w.sum() <= 0:
            raise LmpError(
                f"data.mixture stage until {until} gives every source weight 0, leaving it no data; "
                "give at least one source a positive weight"
            )
        stages.append((until, w / w.sum()))
    return stages


def block_counts(shares: np.ndarray, block: int = MIX_BLOCK) -> np.ndarray:
    """Each source's samples in a block of `block`: the shares, rounded by largest remainders."""
    exact = shares * block
    counts = np.floor(exact).astype(np.int64)
    left = block - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:left]] += 1
    return counts


@dataclass(frozen=True)
class _Stage:
    first: int  # the stage's first global sample
    end: int | None  # one past its last (None: open-ended)
    counts: np.ndarray  # samples per source in each block
    before: np.ndarray  # samples per source drawn in earlier stages


class MixturePlan:
    """Which source, and which of its windows, every global sample is."""

    def __init__(
        self, stages: list[tuple[float, np.ndarray]], main_steps: int, batch_size: int, seed: int
    ) -> None:
        self.seed = seed
        self.n_sources = len(stages[0][1])
        self.untils = [until for until, _ in stages]
        self.shares = [shares for _, shares in stages]
        self.stages: list[_Stage] = []
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        first, before = 0, np.zeros(self.n_sources, dtype=np.int64)
        for k, (until, shares) in enumerate(stages):
            last = k == len(stages) - 1
            end = None if last else round(until * main_steps) * batch_size
            stage = _Stage(first, end, block_counts(shares), before)
            self.stages.append(stage)
            if end is not None:
                before = before + self._drawn_in(k, end - first)
                first = end

    def _block(self, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position, how many of that source came earlier in the block)."""
        if (k, block) in self._blocks:
            return self._blocks[k, block]
        if len(self._blocks) > 8:  # batches walk the blocks in order: keep only recent ones
            self._blocks.clear()
        counts = self.stages[k].counts
        # each source's samples spread evenly over the block (at seeded phases), so that any run
        # of samples, a batch among them, holds every source's share give or take one
        phase = np.random.default_rng([self.seed, _STREAM, k, block]).random(self.n_sources)
        keys = np.concatenate([(np.arange(c) + phase[s]) / c for s, c in enumerate(counts) if c])
        order = np.repeat(np.arange(self.n_sources), counts)[np.argsort(keys, kind="stable")]
        rank = np.empty(len(order), dtype=np.int64)
        for s in range(self.n_sources):
            where = order == s
            rank[where] = np.arange(int(where.sum()))
        self._blocks[k, block] = order, rank
        return order, rank

    def _drawn_in(self, k: int, samples: int) -> np.ndarray:
        """Samples per source among the first `samples` of stage k."""
        blocks, rest = divmod(samples, MIX_BLOCK)
        drawn = blocks * self.stages[k].counts
        if rest:
            drawn = drawn + np.bincount(self._block(k, blocks)[0][:rest], minlength=self.n_sources)
        return drawn

    def _stage_of(self, sample: int) -> int:
        return next(k for k, st in enumerate(self.stages) if st.end is None or sample < st.end)

    def locate(self, sample: int) -> tuple[int, int]:
        """(source, index in that source's window stream) of global sample `sample`."""
        k = self._stage_of(sample)
        stage = self.stages[k]
        block, offset = divmod(sample - stage.first, MIX_BLOCK)
        order, rank = self._block(k, block)
        source = int(order[offset])
        return source, int(stage.before[source] + block * stage.counts[source] + rank[offset])

    def drawn(self, samples: int) -> np.ndarray:
        """Samples per source among the run's first `samples`."""
        k = self._stage_of(max(samples - 1, 0))
        return self.stages[k].before + self._drawn_in(k, samples - self.stages[k].first)


def source_shard(shard: TokenShard, source: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(tokens, document offsets, prefix lengths) of one source's documents, in corpus order."""
    mine = shard.doc_sources == source
    lengths = np.diff(shard.doc_offsets)
    offsets = np.concatenate([[0], np.cumsum(lengths[mine])])
    prefix = shard.prefix_lengths[mine] if shard.prefix_lengths is not None else None
    return np.asarray(shard.tokens)[np.repeat(mine, lengths)], offsets, prefix


class MixedWindows:
    """PackedWindows' interface (batch, epoch_of, windows_per_epoch) over per-source streams."""

    def __init__(
        self,
        shard: TokenShard,
        plan: MixturePlan,
        seq_len: int,
        seed: int,
        bos_token_id: int,
        words_per_token: np.ndarray,
        prefixed: bool = False,
    ) -> None:
        self.plan, self.seq_len, self.words_per_token = plan, seq_len, words_per_token
        used = np.flatnonzero(np.max(plan.shares, axis=0) > 0)
        self.streams: dict[int, PackedWindows] = {}
        for s in used:
            tokens, offsets, prefix = source_shard(shard, int(s))
            if len(tokens) < 2 * seq_len + 2:
                raise LmpError(
                    f"source {shard.sources[s]!r} has {len(tokens)} training tokens, too few for two "
                    f"windows of seq_len {seq_len}; give it weight 0 in data.mixture or use a shorter seq_len"
                )
            self.streams[int(s)] = PackedWindows(
                tokens,
                seq_len,
                seed,
                bos_token_id,
                offsets if prefixed else None,
                prefix if prefixed else None,
            )
        # "epochs" of a mixture: tokens drawn over the training split's tokens
        self.windows_per_epoch = max(1, shard.n_tokens // seq_len)

    def batch(self, first_sample: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        located = map(self.plan.locate, range(first_sample, first_sample + size))
        rows = [self.streams[source].batch(n, 1) for source, n in located]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def epoch_of(self, samples_done: int) -> float:
        return samples_done / self.windows_per_epoch

    def words_seen(self, samples_done: int) -> float:
        """The words in the first `samples_done` samples, at each source's words per token."""
        return float(self.plan.drawn(samples_done) @ self.words_per_token) * self.seq_len


def run_words_per_token(recipe: Recipe, data: PreparedData) -> float:
    """Words per training token: the corpus's, or under data.mixture the mixture's over the run."""
    if recipe.data.mixture is None:
        return sum(data.word_counts["train"].values()) / data.train.n_tokens
    stages = stage_weights(recipe.data.mixture, data.train.sources, source_tokens(data.train))
    return mixture_words_per_token(stages, source_words_per_token(data))


def source_tokens(shard: TokenShard) -> np.ndarray:
    """Training tokens per source index."""
    return np.bincount(shard.doc_sources, weights=np.diff(shard.doc_offsets), minlength=len(shard.sources))


def source_words_per_token(data: PreparedData) -> np.ndarray:
    """Words per token of each source's training text (0 for a source without tokens)."""
    tokens = source_tokens(data.train)
    words = np.array([data.word_counts["train"].get(name, 0) for name in data.train.sources], dtype=float)
    return np.divide(words, tokens, out=np.zeros_like(words), where=tokens > 0)


def mixture_words_per_token(stages: list[tuple[float, np.ndarray]], per_source: np.ndarray) -> float:
    """The mixture's words per token over a whole run: each stage's shares, weighted by its length."""
    starts = [0.0] + [until for until, _ in stages[:-1]]
    return float(
        sum(
            (until - start) * shares @ per_source
            for start, (until, shares) in zip(starts, stages, strict=True)
        )
    )


def mixture_table(
    plan: MixturePlan, shard: TokenShard, main_steps: int, batch_size: int, seq_len: int
) -> Table:
    """Each source's share of the tokens per stage and the passes over it that implies."""
    tokens = source_tokens(shard)
    table = Table(title="data.mixture: each source's share of the training tokens (passes over it)")
    table.add_column("source")
    ends = [round(until * main_steps) for until in plan.untils]
    for start, end in zip([0, *ends[:-1]], ends, strict=True):
        table.add_column(f"steps {start}-{end}", justify="right")
    table.add_column("whole run", justify="right")
    drawn_by_end = [plan.drawn(end * batch_size) for end in ends]
    per_stage = [
        b - a for a, b in zip([np.zeros_like(drawn_by_end[0]), *drawn_by_end[:-1]], drawn_by_end, strict=True)
    ]
    for s, name in enumerate(shard.sources):
        row = [name]
        for shares, drawn in zip(plan.shares, per_stage, strict=True):
            row.append(f"{100 * shares[s]:.1f}% ({drawn[s] * seq_len / max(tokens[s], 1):.2f})")
        row.append(f"{drawn_by_end[-1][s] * seq_len / max(tokens[s], 1):.2f} passes")
        table.add_row(*row)
    return table
