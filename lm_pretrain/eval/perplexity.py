"""Perplexity and bits per byte on held-out text: a run's validation split, or any text file.

bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text, a tokenizer-independent
number (models with different vocabularies compare fairly). For the validation split the scored
text is the bytes of the target tokens (special tokens have none); for a file it is the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lm_pretrain.errors import LmpError
from lm_pretrain.eval.scoring import ScoringModel
from lm_pretrain.model.decoder import IGNORE_INDEX
from lm_pretrain.run_folder import RECIPE_FILE


def run_folder_of(model_path: Path) -> Path | None:
    """The lmp run a model folder belongs to (runs/<name>, its final/ or checkpoints/step-N)."""
    for candidate in (model_path, model_path.parent, model_path.parent.parent):
        if (candidate / RECIPE_FILE).is_file():
            return candidate
    return None


def _byte_lengths(tokenizer: object) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens), for byte-level BPE vocabularies."""
    bytes_of = _byte_level_decoder()
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    lengths = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), np.int64)
    for token, token_id in vocab.items():
        if token_id in special:
            continue
        if all(ch in bytes_of for ch in token):
            lengths[token_id] = len(token)  # one printable stand-in character per byte
        else:  # not a byte-level token: fall back to its decoded text
            lengths[token_id] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return lengths


def _byte_level_decoder() -> set[str]:
    """The 256 stand-in characters byte-level BPE uses for raw bytes (GPT-2's byte alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.add(chr(256 + extra))
            extra += 1
    return chars


@torch.no_grad()
def _score_windows(sm: ScoringModel, inputs: torch.Tensor, targets: torch.Tensor, batch: int) -> float:
    total = 0.0
    for start in range(0, len(inputs), batch):
        x = inputs[start : start + batch].to(sm.device)
        y = targets[start : start + batch].to(sm.device)
        logits = sm.model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(nll)
    return total


def _result(nats: float, tokens: int, n_bytes: int, source: str) -> dict:
    if tokens == 0 or n_bytes == 0:
        raise LmpError(f"no text to score in {source}")
    return {
        "source": source,
        "tokens": tokens,
        "bytes": n_bytes,
        "nats_per_token": nats / tokens,
        "perplexity": math.exp(nats / tokens),
        "bits_per_byte": nats / math.log(2) / n_bytes,
    }


def validation_perplexity(sm: ScoringModel, run_dir: Path, max_tokens: int | None = None) -> dict:
    """Perplexity of the run's own validation split (the shards its recipe prepares, cached)."""
    from lm_pretrain.data.loader import validation_batches
    from lm_pretrain.data.prepare import prepare_data
    from lm_pretrain.recipe import load_recipe

    recipe = load_recipe(run_dir / RECIPE_FILE)
    data = prepare_data(recipe, show_progress=False)
    tokens = np.asarray(data.val.tokens)
    seq_len = min(recipe.seq_len, int(getattr(sm.model.config, "max_position_embeddings", recipe.seq_len)))
    budget = max_tokens or len(tokens)
    batches = validation_batches(tokens, seq_len, budget, 8, data.special_ids["bos"])
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    nats = _score_windows(sm, inputs, targets, 8)
    scored = targets[targets != IGNORE_INDEX]
    n_bytes = int(_byte_lengths(sm.tokenizer)[scored.numpy()].sum())
    return _result(nats, int(scored.numel()), n_bytes, f"{run_dir} validation split")


def file_perplexity(sm: ScoringModel, path: Path, max_tokens: int | None = None) -> dict:
    """Perplexity of a UTF-8 text file: consecutive windows, each token predicted once."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LmpError(f"cannot read held-out text {path}: {exc}; pass a UTF-8 text file") from None
    ids = sm.tokenizer(text, add_special_tokens=True)["input_ids"]
    if max_tokens is not None and len(ids) > max_tokens + 1:
        ids = ids[: max_tokens + 1]
        text = sm.tokenizer.decode(ids, skip_special_tokens=True)
    seq_len = int(getattr(sm.model.config, "max_position_embeddings", 1024))
    seq_len = min(seq_len, 1024)
    stream = torch.tensor(ids, dtype=torch.long)
    inputs, targets = [], []
    for start in range(0, len(ids) - 1, seq_len):
        window = stream[start : start + seq_len + 1]
        x, y = window[:-1], window[1:]
        pad = seq_len - len(x)  # the last window is shorter: pad it, padding is never a target
        inputs.append(torch.nn.functional.pad(x, (0, pad), value=0))
        targets.append(torch.nn.functional.pad(y, (0, pad), value=IGNORE_INDEX))
    if not inputs:
        raise LmpError(f"{path} is too short to score (fewer than two tokens)")
    nats = _score_windows(sm, torch.stack(inputs), torch.stack(targets), 8)
    return _result(nats, len(ids) - 1, len(text.encode("utf-8")), str(path))
