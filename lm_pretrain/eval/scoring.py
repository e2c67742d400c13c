"""Candidate log-probabilities by the official BabyLM rules, computed in length-bucketed batches.

The rules (evaluation_pipeline/sentence_zero_shot/dataset.py of the 2025 pipeline):
- A candidate is a sentence tokenized with the tokenizer's own special tokens. The scored tokens
  are those whose character span ends after the start of the completion (the scored suffix).
  Special tokens have empty spans and are never scored.
- causal: log p(token_j | tokens_<j) for scored j >= 1; the first token is only ever context,
  so without a BOS the first word goes unscored, as in the official code.
- mlm: pseudo-log-likelihood: token j replaced by the mask token, prediction read at j.
- mntp: the same masking, prediction read at j - 1 (masked next-token prediction).
- temperature 1: plain log-softmax over the vocabulary; a candidate's score is the sum.

Speed: identical rows are computed once (duplicate sentences, shared masked copies), rows of the
same length are stacked into one forward pass with no padding, short causal candidates are packed
as token trees: every distinct prefix of the whole set runs once, each token attending only to
its ancestors, and causal candidates too long for a tree row that share a long token prefix
(EWoK, entity tracking) run the prefix once and reuse its key/value cache. The output layer runs
on a chunk of positions at a time, so no batch's whole logits are ever written out.
`score_one_at_a_time` is the plain reference: one sentence per forward pass.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lm_pretrain.errors import LmpError
from lm_pretrain.generate import load_pretrained
from lm_pretrain.model import remote_code

BACKENDS = ("causal", "mlm", "mntp")
# logits held at once (rows x length x vocab floats): bounds memory on any vocabulary size
MAX_LOGIT_ELEMENTS = 64 * 1024 * 1024


@dataclass
class ScoringModel:
    model: torch.nn.Module
    tokenizer: object  # a transformers fast tokenizer
    backend: str
    folder: Path
    device: torch.device
    # whether the model scores a token tree (a 4-D attention mask with position ids) as it scores
    # the sequences one by one; None until checked on the first trees (_tree_agrees)
    tree_scoring: bool | None = None
    # whether the output layer runs on the model's last hidden states a chunk of positions at a
    # time (_flat_logits); None until checked on the first batch (_head_agrees)
    chunked_head: bool | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])


def load_scoring_model(
    folder: Path, backend: str = "causal", device: str | None = None, trust_remote_code: bool = False
) -> ScoringModel:
    """Load a model folder the way the official pipeline does: AutoModelForCausalLM for causal,
    AutoModelForMaskedLM for mlm/mntp, the tokenizer with padding_side="right". The folder's own
    Python runs only when it is lmp's modeling file or with `trust_remote_code` (remote_code.py)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    if backend not in BACKENDS:
        raise LmpError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    auto = AutoModelForCausalLM if backend == "causal" else AutoModelForMaskedLM
    wrong_kind = _load_hint(folder, backend)
    if wrong_kind:  # transformers would load e.g. a BERT as a causal model and score nonsense
        raise LmpError(f"{folder} does not fit the {backend} backend{wrong_kind}")
    trust = remote_code.trust_remote_code(folder, trust_remote_code)
    try:
        tokenizer, model = load_pretrained(folder, auto, trust, padding_side="right")
    except LmpError as exc:
        raise LmpError(f"{exc}{_load_hint(folder, backend)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise LmpError(
            f"{folder}: the tokenizer is not a fast tokenizer, and scoring needs character offsets; "
            "save a tokenizer.json with the model"
        )
    if backend != "causal" and tokenizer.mask_token_id is None:
        raise LmpError(f"{folder}: the tokenizer has no mask token, which the {backend} backend needs")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()
    return ScoringModel(model, tokenizer, backend, Path(folder), dev)


def _load_hint(folder: Path, backend: str) -> str:
    """A fix when the config says which auto class the model was saved for, and it is not ours."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    classes = " ".join(config.get("architectures") or []) + " " + " ".join(config.get("auto_map") or {})
    if backend == "causal" and "MaskedLM" in classes and "CausalLM" not in classes:
        return "; it is a masked or hybrid model: use --backend mntp or mlm"
    if backend != "causal" and "MaskedLM" not in classes:
        return "; it is a causal decoder: use --backend causal"
    return ""


def scored_positions(
    offsets: Sequence[tuple[int, int]], sentence: str, completion: str, backend: str
) -> list[int]:
    """Indices of the tokens whose character span overlaps `completion`, the end of `sentence`."""
    start_char = len(sentence) - len(completion)
    if backend == "causal" and offsets:
        start_char += offsets[0][0]  # as the official causal code does (0 whenever BOS leads)
    first = 0 if backend == "mlm" else 1  # causal/mntp: position 0 has nothing before it
    return [j for j, (start, end) in enumerate(offsets) if j >= first and end > start_char and end > start]


def encode(
    tokenizer: object, sentences: Sequence[str], completions: Sequence[str], backend: str
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(token ids, scored positions) per candidate, with one batched tokenizer call."""
    if not sentences:
        return []
    enc = tokenizer(list(sentences), return_offsets_mapping=True, add_special_tokens=True)
    out = []
    for ids, offsets, sentence, completion in zip(
        enc["input_ids"], enc["offset_mapping"], sentences, completions, strict=True
    ):
        out.append((tuple(ids), tuple(scored_positions(offsets, sentence, completion, backend))))
    return out


# Logits computed at once by the output layer in _flat_logits: 4M (16 MiB in fp32). A whole batch's
# logits (8,160 positions x 8,192 words: 134 MiB in bf16) come from fresh pages on every call, as
# glibc maps blocks above 32 MiB on their own; that cost the output layer's matmul 40% (0.141 s
# against 0.086 s into reused memory) and the logsumexp after it another pass over main memory.
HEAD_CHUNK_ELEMENTS = 4 * 1024 * 1024


def _flat_logits(sm: ScoringModel, **inputs: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """The model's logits over the flattened positions of `inputs` (rows x length), in the dtype
    the model computed them in (bf16 under autocast): where the output layer can run on the
    model's last hidden states, a chunk of positions at a time, else all at once."""
    if sm.chunked_head is None:
        sm.chunked_head = _head_agrees(sm, inputs)
    if not sm.chunked_head:
        logits = _output_logits(sm.model(**inputs))
        yield slice(0, None), logits.reshape(-1, logits.shape[-1])
        return
    head = sm.model.get_output_embeddings()
    hidden = _last_hidden(sm.model, head, inputs)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = max(1, HEAD_CHUNK_ELEMENTS // sm.vocab_size)
    for start in range(0, hidden.shape[0], chunk):
        span = slice(start, start + chunk)
        yield span, head(hidden[span])


def _last_hidden(model: torch.nn.Module, head: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The output layer's input in a forward pass of `model`, which computes no logits (its output
    layer is given no positions)."""
    captured = []

    def take(_: torch.nn.Module, args: tuple) -> tuple:
        captured.append(args[0])
        return (args[0][..., :0, :],)

    hook = head.register_forward_pre_hook(take)
    try:
        model(**inputs)
    finally:
        hook.remove()
    return captured[-1]


def _head_agrees(sm: ScoringModel, inputs: dict) -> bool:
    """Whether the output layer applied to the last hidden states gives the model's own logits
    (in fp32, on the first row): a model that scales or caps its logits after the output layer,
    or an ensemble, gets its logits whole."""
    head = sm.model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return False
    first = {k: v[:1] for k, v in inputs.items()}
    try:
        with torch.autocast(sm.device.type, enabled=False):
            whole = _output_logits(sm.model(**first))
            parts = head(_last_hidden(sm.model, head, first))
    except Exception:  # models raise many kinds where a hook changes what they see
        return False
    return whole.shape == parts.shape and torch.allclose(whole, parts, rtol=1e-4, atol=1e-4)


def _output_logits(out: object) -> torch.Tensor:
    """The logits of a forward pass's output (a tuple or a transformers output object)."""
    return out[0] if isinstance(out, tuple) else out.logits


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return _output_logits(model(input_ids=ids, attention_mask=torch.ones_like(ids))).float()


def _rows_per_batch(length: int, vocab: int, budget: int | None) -> int:
    limit = budget if budget is not None else MAX_LOGIT_ELEMENTS // max(vocab, 1)
    return max(1, limit // max(length, 1))


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits) read at `targets`, in float32, without writing a second logits-sized
    tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


# Scoring this many logits (tokens x vocabulary) or more runs target_logprobs compiled: eager
# logsumexp costs ~2 ns a logit on a CPU (a third of a bf16 forward pass), inductor's fused kernel
# a sixth of that, and its ~5 s compile pays for itself from about this size (full BLiMP: 1.7e10).
COMPILE_LOGPROBS_ELEMENTS = 2**32
_compiled: dict[str, object] = {}


def fused_target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """target_logprobs compiled (dynamic shapes, compiled once per process); eager wherever
    compilation fails (e.g. no C++ compiler for inductor), with a one-line warning."""
    fn = _compiled.get("fn")
    if fn is None:
        fn = _compiled["fn"] = torch.compile(target_logprobs, dynamic=True)
    if fn is target_logprobs:
        return target_logprobs(logits, targets)
    try:
        return fn(logits, targets)
    except Exception as exc:  # inductor raises many kinds; scoring goes on, eagerly
        first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        warnings.warn(f"scoring without torch.compile ({first_line[:200]}); it is slower", stacklevel=2)
        _compiled["fn"] = target_logprobs
        return target_logprobs(logits, targets)


@torch.no_grad()
def _causal_token_logprobs(
    sm: ScoringModel, sequences: list[tuple[int, ...]], token_budget: int | None, trees: bool = True
) -> list[np.ndarray]:
    """For each distinct sequence, log p(tok_j | tok_<j) for j = 1..n-1 (float32)."""
    result: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
    elements = sum(len(seq) for seq in sequences) * sm.vocab_size
    logprobs = fused_target_logprobs if elements >= COMPILE_LOGPROBS_ELEMENTS else target_logprobs
    plain = [i for i, seq in enumerate(sequences) if len(seq) >= 2]
    if trees and sm.tree_scoring is not False:
        short = [i for i in plain if len(sequences[i]) - 1 <= TREE_ROW_NODES]
        in_trees = _tree_logprobs(sm, sequences, short, token_budget, logprobs)
        for i, values in in_trees.items():
            result[i] = values
        plain = [i for i in plain if i not in in_trees]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index in plain:
        by_length[len(sequences[index])].append(index)
    for length, indices in sorted(by_length.items()):
        rows = _rows_per_batch(length, sm.vocab_size, token_budget)
        for start in range(0, len(indices), rows):
            chunk = indices[start : start + rows]
            ids = torch.tensor([sequences[i] for i in chunk], dtype=torch.long, device=sm.device)
            inputs, targets = ids[:, :-1], ids[:, 1:].reshape(-1)
            picked = torch.empty(targets.shape, dtype=torch.float32, device=sm.device)
            for span, logits in _flat_logits(sm, input_ids=inputs, attention_mask=torch.ones_like(inputs)):
                picked[span] = logprobs(logits, targets[span])
            picked = picked.view(len(chunk), -1).cpu().numpy()
            for row, i in enumerate(chunk):
                result[i] = picked[row]
    return result


@torch.no_grad()
def _masked_logprobs(
    sm: ScoringModel, rows: list[tuple[tuple[int, ...], int]], token_budget: int | None
) -> np.ndarray:
    """log p of token j in a copy of the sequence with j masked, read at j (mlm) or j - 1 (mntp)."""
    shift = 1 if sm.backend == "mntp" else 0
    mask_id = sm.tokenizer.mask_token_id
    out = np.zeros(len(rows), np.float32)
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, (seq, _) in enumerate(rows):
        by_length[len(seq)].append(index)
    for length, indices in sorted(by_length.items()):
        per_batch = _rows_per_batch(length, sm.vocab_size, token_budget)
        for start in range(0, len(indices), per_batch):
            chunk = indices[start : start + per_batch]
            ids = torch.tensor([rows[i][0] for i in chunk], dtype=torch.long, device=sm.device)
            pos = torch.tensor([rows[i][1] for i in chunk], dtype=torch.long, device=sm.device)
            arange = torch.arange(len(chunk), device=sm.device)
            targets = ids[arange, pos].clone()
            ids[arange, pos] = mask_id
            if type(sm.model).__name__ == "LmpForMaskedNextToken":
                # lmp's own masked class computes the output layer at the scored positions only
                result = sm.model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_at=pos - shift)
                logits = result.logits.float()
            else:
                logits = _logits(sm.model, ids)
            if logits.dim() == 3:  # every position (also an lmp export from before logits_at)
                logits = logits[arange, pos - shift]
            picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            out[chunk] = picked.cpu().numpy()
    return out


# a tree row holds at most this many tokens: longer rows pack shared prefixes a little better (full
# BLiMP: 61% of the positions at 96, 60% at 128, 58% at 256) but pay attention over the whole row;
# 96 scored BLiMP fastest of 64-192 on a CPU
TREE_ROW_NODES = 96
# trees are used where they compute at most this share of the positions the plain batches would
TREE_MAX_SHARE = 0.9


@dataclass
class _TreeRow:
    """Distinct prefixes of several sequences' inputs, one token each, in depth-first order; a
    member's path lists the tokens of its inputs, so a token's ancestors precede it."""

    tokens: list[int]
    depths: list[int]
    members: list[tuple[int, list[int]]]  # (sequence index, path)


def _tree_rows(sequences: list[tuple[int, ...]], indices: list[int]) -> list[_TreeRow]:
    """The inputs (all tokens but the last) of sequences[indices] as tree rows: sorted, each
    sequence shares the prefix it has with the one before it in its row."""
    rows: list[_TreeRow] = []
    prev: tuple[int, ...] = ()
    prev_path: list[int] = []
    for i in sorted(indices, key=lambda i: sequences[i]):
        inputs = sequences[i][:-1]
        shared = _common_prefix([prev, inputs]) if prev else 0
        if not rows or len(rows[-1].tokens) + len(inputs) - shared > TREE_ROW_NODES:
            rows.append(_TreeRow([], [], []))
            shared = 0
        row = rows[-1]
        path = prev_path[:shared] + list(range(len(row.tokens), len(row.tokens) + len(inputs) - shared))
        row.tokens += inputs[shared:]
        row.depths += range(shared, len(inputs))
        row.members.append((i, path))
        prev, prev_path = inputs, path
    return rows


def _score_tree_rows(
    sm: ScoringModel,
    sequences: list[tuple[int, ...]],
    rows: list[_TreeRow],
    logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[int, np.ndarray]:
    """One forward pass over `rows` (padded to the longest): each member's per-token log-probs."""
    width = max(len(row.tokens) for row in rows)
    ids = np.zeros((len(rows), width), np.int64)
    depths = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), 1, width, width), bool)
    mask[:, 0, np.arange(width), np.arange(width)] = True  # padding attends to itself only
    primary = np.zeros((len(rows), width), np.int64)  # one target per token for the kernel
    nodes, targets = [], []
    for b, row in enumerate(rows):
        n = len(row.tokens)
        ids[b, :n], depths[b, :n] = row.tokens, row.depths
        for i, path in row.members:
            p = np.asarray(path)
            mask[b, 0][np.ix_(p, p)] |= np.tri(len(p), dtype=bool)
            primary[b, p] = sequences[i][1:]  # where several sequences branch, the last one's
            nodes.append(b * width + p)
            targets.append(np.asarray(sequences[i][1:]))
    inputs = {
        "input_ids": torch.from_numpy(ids).to(sm.device),
        "attention_mask": torch.from_numpy(mask).to(sm.device),
        "position_ids": torch.from_numpy(depths).to(sm.device),
    }
    first = torch.from_numpy(primary).to(sm.device).flatten()
    node = torch.from_numpy(np.concatenate(nodes)).to(sm.device)
    target = torch.from_numpy(np.concatenate(targets)).to(sm.device)
    values = torch.empty(node.shape, dtype=torch.float32, device=sm.device)
    for span, logits in _flat_logits(sm, **inputs):
        picked = logprobs(logits, first[span])
        start, stop = span.start, span.stop if span.stop is not None else len(first)
        inside = (node >= start) & (node < stop)
        local, at = node[inside] - start, target[inside]
        # another target read at the same token: log p(t) = log p(primary) + logit(t) - logit(primary)
        shift = logits[local, at].float() - logits[local, first[node[inside]]].float()
        values[inside] = picked[local] + shift
    values = values.cpu().numpy()
    result, start = {}, 0
    for row in rows:
        for i, path in row.members:
            result[i] = values[start : start + len(path)]
            start += len(path)
    return result


def _tree_logprobs(
    sm: ScoringModel,
    sequences: list[tuple[int, ...]],
    indices: list[int],
    token_budget: int | None,
    logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[int, np.ndarray]:
    """Per-token log-probs of sequences[indices] scored as token trees; empty where trees would
    not save enough or the model does not score them as it scores plain rows."""
    rows = _tree_rows(sequences, indices) if indices else []
    positions = sum(len(sequences[i]) - 1 for i in indices)
    if not rows or sum(len(r.tokens) for r in rows) > TREE_MAX_SHARE * positions:
        return {}
    if sm.tree_scoring is None:  # checked where most is shared: a lone sequence would pass anyway
        shared_most = max(rows, key=lambda r: sum(len(path) for _, path in r.members) - len(r.tokens))
        sm.tree_scoring = _tree_agrees(sm, sequences, shared_most)
    if not sm.tree_scoring:
        return {}
    rows.sort(key=lambda r: len(r.tokens))  # rows of like width share a batch
    per_batch = _rows_per_batch(TREE_ROW_NODES, sm.vocab_size, token_budget)
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(rows), per_batch):
        out.update(_score_tree_rows(sm, sequences, rows[start : start + per_batch], logprobs))
    return out


def _tree_agrees(sm: ScoringModel, sequences: list[tuple[int, ...]], row: _TreeRow) -> bool:
    """Whether the model scores `row` as a tree as it scores its sequences alone, in fp32: a model
    that ignores a 4-D mask or position ids (or refuses them) is scored the plain way."""
    members = [i for i, _ in row.members]
    try:
        with torch.autocast(sm.device.type, enabled=False):
            tree = _score_tree_rows(sm, sequences, [row], target_logprobs)
            plain = _causal_token_logprobs(sm, [sequences[i] for i in members], None, trees=False)
    except Exception:  # models raise many kinds on arguments they do not take
        return False
    return all(np.allclose(tree[i], alone, atol=1e-3) for i, alone in zip(members, plain, strict=True))


def _common_prefix(seqs: list[tuple[int, ...]]) -> int:
    first, n = seqs[0], min(len(q) for q in seqs)
    for k in range(n):
        if any(q[k] != first[k] for q in seqs[1:]):
            return k
    return n


# a group's shared token prefix is run once when it is at least this long and at least half of the
# group's longest sequence (EWoK contexts, entity-tracking stories); short ones are not worth a pass
MIN_SHARED_PREFIX = 8


def _prefix_groups(
    encoded: list[tuple[tuple[int, ...], tuple[int, ...]]], group_sizes: Sequence[int], min_longest: int = 0
) -> dict[int, list[list[tuple[int, ...]]]]:
    """Items whose candidates share a long token prefix: prefix length -> groups of sequences.
    Groups whose longest sequence is shorter than `min_longest` are left out (to token trees)."""
    by_prefix: dict[int, list[list[tuple[int, ...]]]] = defaultdict(list)
    covered: set[tuple[int, ...]] = set()
    start = 0
    for size in group_sizes:
        seqs = list(dict.fromkeys(ids for ids, _ in encoded[start : start + size]))
        start += size
        if len(seqs) < 2 or any(q in covered for q in seqs):
            continue
        shared = _common_prefix(seqs)
        if (
            max(map(len, seqs)) >= min_longest
            and shared >= MIN_SHARED_PREFIX
            and 2 * shared >= max(map(len, seqs))
            and min(map(len, seqs)) > shared
        ):
            by_prefix[shared].append(seqs)
            covered.update(seqs)
    return by_prefix


@torch.no_grad()
def _causal_shared_prefix_logprobs(
    sm: ScoringModel, by_prefix: dict[int, list[list[tuple[int, ...]]]], token_budget: int | None
) -> dict[tuple[int, ...], np.ndarray]:
    """Per-token log-probs of sequences that share a prefix within their group: the prefix runs
    once per group, its key/value cache is copied to each candidate, then only the suffixes run."""
    out: dict[tuple[int, ...], np.ndarray] = {}
    for shared, groups in sorted(by_prefix.items()):
        longest = max(len(q) for g in groups for q in g)
        per_batch = max(1, _rows_per_batch(longest, sm.vocab_size, token_budget) // 4)
        for start in range(0, len(groups), per_batch):
            chunk = groups[start : start + per_batch]
            prefixes = torch.tensor([g[0][:shared] for g in chunk], dtype=torch.long, device=sm.device)
            result = sm.model(input_ids=prefixes, use_cache=True)
            prefix_lp = torch.log_softmax(result.logits.float(), dim=-1)  # [G, P, V]
            within = prefix_lp[:, :-1].gather(-1, prefixes[:, 1:].unsqueeze(-1)).squeeze(-1).cpu().numpy()
            rows = [(g_index, q) for g_index, g in enumerate(chunk) for q in g]
            owner = torch.tensor([g for g, _ in rows], device=sm.device)
            first_new = torch.tensor([q[shared] for _, q in rows], device=sm.device)
            boundary = prefix_lp[owner, -1].gather(-1, first_new.unsqueeze(-1)).squeeze(-1).cpu().numpy()
            width = max(len(q) for _, q in rows) - 1 - shared
            suffix_lp = None
            if width > 0:
                cache = _returned_cache(result)
                cache.reorder_cache(owner)  # one copy of its group's prefix cache per candidate
                # right padding: real tokens never attend to the pads after them
                pad = [list(q[shared:-1]) + [0] * (width - (len(q) - 1 - shared)) for _, q in rows]
                tgt = [list(q[shared + 1 :]) + [0] * (width - (len(q) - 1 - shared)) for _, q in rows]
                inputs = torch.tensor(pad, dtype=torch.long, device=sm.device)
                given = {_cache_argument(sm.model): cache}
                logits = sm.model(input_ids=inputs, use_cache=False, **given).logits.float()
                targets = torch.tensor(tgt, dtype=torch.long, device=sm.device).unsqueeze(-1)
                suffix_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1).cpu().numpy()
            for r, (g_index, q) in enumerate(rows):
                parts = [within[g_index], boundary[r : r + 1]]
                if suffix_lp is not None:
                    parts.append(suffix_lp[r, : len(q) - 1 - shared])
                out[q] = np.concatenate(parts)
    return out


def _cache_argument(model: torch.nn.Module) -> str:
    """The name a model's forward takes its key/value cache by: transformers 5 calls it `cache`
    (`past_key_values` is deprecated there, to go in 5.40), transformers 4 `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output: object) -> object:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def score_candidates(
    sm: ScoringModel,
    sentences: Sequence[str],
    completions: Sequence[str],
    token_budget: int | None = None,
    group_sizes: Sequence[int] | None = None,
) -> np.ndarray:
    """Summed log-probability of each candidate's completion (float64), batched. `group_sizes`
    (candidates per item, in order) lets a causal model run a context the candidates share once."""
    encoded = encode(sm.tokenizer, sentences, completions, sm.backend)
    scores = np.zeros(len(encoded), np.float64)
    if sm.backend == "causal":
        shared: dict[tuple[int, ...], np.ndarray] = {}
        if group_sizes is not None:
            # token trees share prefixes across all candidates, and faster than a key/value cache
            # (full BLiMP in bf16: 1.1x); the cache is for contexts longer than a tree row
            fits_tree = TREE_ROW_NODES + 2 if sm.tree_scoring is not False else 0
            by_prefix = _prefix_groups(encoded, group_sizes, min_longest=fits_tree)
            shared = _causal_shared_prefix_logprobs(sm, by_prefix, token_budget)
        rest = list(dict.fromkeys(ids for ids, _ in encoded if ids not in shared))
        per_token = dict(zip(rest, _causal_token_logprobs(sm, rest, token_budget), strict=True))
        per_token.update(shared)
        for k, (ids, positions) in enumerate(encoded):
            if positions:
                scores[k] = _sum(per_token[ids][[j - 1 for j in positions]])
        return scores
    rows: dict[tuple[tuple[int, ...], int], int] = {}
    for ids, positions in encoded:
        for j in positions:
            rows.setdefault((ids, j), len(rows))
    values = _masked_logprobs(sm, list(rows), token_budget)
    for k, (ids, positions) in enumerate(encoded):
        scores[k] = _sum(values[[rows[(ids, j)] for j in positions]])
    return scores


def _sum(values: np.ndarray) -> float:
    """One summation order for every scorer, so batched and reference scores compare exactly."""
    return float(np.sum(values.astype(np.float64))) if len(values) else 0.0


@torch.no_grad()
def score_one_at_a_time(sm: ScoringModel, sentences: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """Reference scorer: tokenize and run each sentence alone (the slow, obvious way)."""
    scores = np.zeros(len(sentences), np.float64)
    for k, (sentence, completion) in enumerate(zip(sentences, completions, strict=True)):
        enc = sm.tokenizer(sentence, return_offsets_mapping=True, add_special_tokens=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        positions = scored_positions(offsets, sentence, completion, sm.backend)
        if not positions:
            continue
        x = torch.tensor([ids], dtype=torch.long, device=sm.device)
        if sm.backend == "causal":
            logprobs = torch.log_softmax(_logits(sm.model, x[:, :-1]), dim=-1)[0]
            values = [logprobs[j - 1, ids[j]].item() for j in positions]
        else:
            shift = 1 if sm.backend == "mntp" else 0
            values = []
            for j in positions:
                masked = x.clone()
                masked[0, j] = sm.tokenizer.mask_token_id
                logprobs = torch.log_softmax(_logits(sm.model, masked)[0, j - shift], dim=-1)
                values.append(logprobs[ids[j]].item())
        scores[k] = _sum(np.array(values, np.float32))
    return scores


class _EnsembleCache:
    """The members' key/value caches, reordered together."""

    def __init__(self, caches: list) -> None:
        self.caches = caches

    def reorder_cache(self, index: torch.Tensor) -> None:
        for cache in self.caches:
            cache.reorder_cache(index)


class EnsembleLM(torch.nn.Module):
    """Several causal LMs sharing a tokenizer, seen as one: its logits are the log of the members'
    averaged probabilities, so every log-softmax taken of them scores the ensemble."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        # the shortest context any member takes
        self.config = min(
            (m.config for m in members), key=lambda c: getattr(c, "max_position_embeddings", 1 << 30)
        )

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.members[0].get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: _EnsembleCache | None = None,
        use_cache: bool = False,
    ) -> SimpleNamespace:
        caches = cache.caches if cache is not None else [None] * len(self.members)
        outs = [
            m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=use_cache,
                **{_cache_argument(m): c},
            )
            for m, c in zip(self.members, caches, strict=True)
        ]
        logprobs = torch.stack([torch.log_softmax(o.logits.float(), dim=-1) for o in outs])
        logits = torch.logsumexp(logprobs, dim=0) - math.log(len(outs))
        both = _EnsembleCache([_returned_cache(o) for o in outs]) if use_cache else None
        return SimpleNamespace(logits=logits, cache=both)


def load_ensemble(
    folders: list[Path], backend: str = "causal", trust_remote_code: bool = False
) -> ScoringModel:
    """The members as one ScoringModel (causal backend); LmpError when their tokenizers differ."""
    from lm_pretrain.data.tokenizer import first_token_difference

    if backend != "causal":
        raise LmpError(f"--ensemble scores causal LMs; the {backend} backend is not supported for ensembles")
    members = [load_scoring_model(folder, backend, trust_remote_code=trust_remote_code) for folder in folders]
    first = members[0]
    for other in members[1:]:
        difference = first_token_difference(
            first.tokenizer.backend_tokenizer,
            other.tokenizer.backend_tokenizer,
            (str(first.folder), str(other.folder)),
        )
        if difference is not None:
            raise LmpError(
                f"{other.folder} has another tokenizer than {first.folder} ({difference}); an ensemble "
                "averages distributions token by token, so its members must share one"
            )
    model = EnsembleLM([m.model for m in members]).to(first.device).eval()
    return ScoringModel(model, first.tokenizer, backend, first.folder, first.device)
