"""`lmp eval`: load the model once, run each requested task, return the results for reporting."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from lm_pretrain.errors import LmpError
from lm_pretrain.eval.probe import probe_items
from lm_pretrain.eval.report import TaskResult, judge
from lm_pretrain.eval.scoring import (
    BACKENDS,
    ScoringModel,
    load_ensemble,
    load_scoring_model,
    score_candidates,
)
from lm_pretrain.eval.tasks import ALL_TASKS, DATA_TASKS, Item, load_task, locate, with_prefix
from lm_pretrain.host_memory import keep_freed_memory
from lm_pretrain.recipe import EvalConfig


@dataclass
class EvalResult:
    model: Path
    backend: str
    prefix: str = ""  # unscored text before every sentence (MeCo conditioning)
    precision: str = "fp32"  # of the zero-shot scoring (score_items)
    tasks: list[TaskResult] = field(default_factory=list)
    perplexity: dict | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "model": str(self.model),
            "backend": self.backend,
            "prefix": self.prefix,
            "precision": self.precision,
            "tasks": {r.task: r.to_json() for r in self.tasks},
            "averages": {r.task: r.mean for r in self.tasks},
            "perplexity": self.perplexity,
            "notes": self.notes,
        }


def parse_tasks(text: str | None, data_dir: Path | None, fast: bool = False) -> list[str]:
    """--tasks a,b,c; by default probe and perplexity, and with --data-dir the data tasks found
    there (a plain BLiMP folder: blimp)."""
    if text is None:
        found = []
        for task in DATA_TASKS if data_dir is not None else ():
            try:
                locate(task, data_dir, fast)
            except LmpError:
                continue
            found.append(task)
        if data_dir is not None and not found:
            locate(next(iter(DATA_TASKS)), data_dir, fast)  # raises, naming where it looked
        return [*found, "probe", "perplexity"]
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        raise LmpError(
            f"--tasks: unknown task(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(ALL_TASKS)}"
        )
    return list(dict.fromkeys(tasks))


PRECISIONS = ("fp32", "bf16")
# bf16 scores decide every item whose candidates lie further apart than this margin; closer items
# are scored again in fp32. Over full BLiMP on the demo model the gap between a pair's bf16 scores
# was off its fp32 value by at most 0.25 nats, growing with the scores' size (0.07 below 30 nats,
# 0.25 above 100), and at most 0.45 of this margin, which rescores 9% of the pairs (twice the
# margin: 18%, with 0 decisions changed by bf16 either way; scripts/bench_eval.py).
RECHECK_NATS = 0.25
RECHECK_FRACTION = 0.0025
# The rescored items show how far bf16 is off on the model at hand: where one's gap was off by more
# than this share of the margin, the margin doubles and the items within it are rescored too.
RECHECK_WORST_SHARE = 0.5


def recheck_margin(scores: np.ndarray, widen: float = 1.0) -> float:
    """How close (in nats) two of an item's bf16 scores may lie before the item is rescored."""
    return widen * (RECHECK_NATS + RECHECK_FRACTION * float(np.max(np.abs(scores))))


def needs_fp32(scores: np.ndarray, widen: float = 1.0) -> bool:
    """Whether bf16 scores leave two of an item's candidates too close to order."""
    if len(scores) < 2:
        return False
    return float(np.min(np.diff(np.sort(scores)))) < recheck_margin(scores, widen)


def gap_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """The most any gap between two of an item's candidate scores is off its exact value."""
    off = approx - exact
    return float(np.max(off) - np.min(off))


def score_items(
    sm: ScoringModel, items: list[Item], token_budget: int | None = None, precision: str = "fp32"
) -> list[np.ndarray]:
    """Every candidate of every item in batched calls, split back per item. precision "bf16": the
    forward passes run under bf16 autocast and items too close to call are rescored in fp32, so
    every decision is the fp32 one."""
    with torch.autocast(sm.device.type, enabled=False):
        if precision == "fp32":
            return score_items_as_set(sm, items, token_budget)
        with torch.autocast(sm.device.type, torch.bfloat16):
            raw = score_items_as_set(sm, items, token_budget)
        out, widen, rescored = list(raw), 1.0, set()
        while True:
            close = [k for k in range(len(raw)) if k not in rescored and needs_fp32(raw[k], widen)]
            if not close:
                return out
            for k, scores in zip(
                close, score_items_as_set(sm, [items[k] for k in close], token_budget), strict=True
            ):
                out[k] = scores
            rescored.update(close)
            worst = max(gap_error(raw[k], out[k]) / recheck_margin(raw[k], widen) for k in rescored)
            if worst <= RECHECK_WORST_SHARE:
                return out
            widen *= 2


def score_items_as_set(
    sm: ScoringModel, items: list[Item], token_budget: int | None = None
) -> list[np.ndarray]:
    """score_items in whatever autocast the caller runs, without rescoring."""
    if not items:
        return []
    sentences = [s for item in items for s in item.sentences]
    completions = [c for item in items for c in item.completions]
    sizes = [len(item.sentences) for item in items]
    flat = score_candidates(sm, sentences, completions, token_budget, group_sizes=sizes)
    out, start = [], 0
    for item in items:
        out.append(flat[start : start + len(item.sentences)])
        start += len(item.sentences)
    return out


def evaluate(
    model_path: Path | list[Path],
    tasks: list[str],
    data_dir: Path | None = None,
    backend: str = "causal",
    fast: bool = False,
    prefix: str = "",
    strict_ties: bool = False,
    text_file: Path | None = None,
    seed: int = 0,
    probe_size: int = 100,
    max_tokens: int | None = None,
    console: Console | None = None,
    explicit_tasks: bool = True,
    trust_remote_code: bool = False,
    precision: str = "fp32",
) -> EvalResult:
    from lm_pretrain.eval.perplexity import file_perplexity, run_folder_of, validation_perplexity
    from lm_pretrain.generate import resolve_model_folder

    console = console or Console(quiet=True)
    keep_freed_memory()  # each batch's temporaries reuse the last one's pages
    if backend not in BACKENDS:
        raise LmpError(f"--backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise LmpError(f"--precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    # several paths: an ensemble, scored by its members' averaged probabilities
    folders = [
        resolve_model_folder(Path(p)) for p in (model_path if isinstance(model_path, list) else [model_path])
    ]
    folder = folders[0]
    needs_data = [t for t in tasks if t in DATA_TASKS]
    if needs_data and data_dir is None:
        raise LmpError(
            f"task(s) {', '.join(needs_data)} need --data-dir: the BabyLM evaluation_data folder "
            "(or, for blimp, a folder of BLiMP *.jsonl files)"
        )
    # read every task file before the (slow) model load, so a bad path fails at once
    loaded: list[tuple[str, str, list[Item]]] = []
    for task in tasks:
        if task in DATA_TASKS:
            source, items = load_task(task, data_dir, fast)
            loaded.append((task, str(source), items))
        elif task == "probe":
            loaded.append(("probe", f"lmp templates, seed {seed}", probe_items(seed, probe_size)))

    if len(folders) > 1:
        sm = load_ensemble(folders, backend, trust_remote_code=trust_remote_code)
    else:
        sm = load_scoring_model(folder, backend, trust_remote_code=trust_remote_code)
    result = EvalResult(folder, backend, prefix, precision)
    if precision == "bf16" and any(task != "perplexity" for task in tasks):
        result.notes.append(
            f"zero-shot items scored under bf16 autocast; those whose candidates lay within {RECHECK_NATS} "
            f"nats (+{RECHECK_FRACTION:.2%} of their size) of each other, or further where the rescored "
            "items showed bf16 off by more than half that, were rescored in fp32 "
            "(the default, --precision fp32, scores everything in fp32)"
        )
    if len(folders) > 1:
        result.notes.append("an ensemble of " + ", ".join(str(f) for f in folders))
    for task, source, items in loaded:
        if prefix:
            items = [with_prefix(item, prefix) for item in items]
        with console.status(f"{task}: scoring {len(items):,} items"):
            scores = score_items(sm, items, precision=precision)
        result.tasks.append(judge(task, source, items, scores, strict_ties))

    if "perplexity" in tasks:
        run_dir = run_folder_of(folder)
        if text_file is not None:
            result.perplexity = file_perplexity(sm, text_file, max_tokens)
        elif backend != "causal":
            result.notes.append("perplexity skipped: it needs the causal backend")
        elif run_dir is not None:
            with console.status("perplexity: validation split"):
                result.perplexity = validation_perplexity(sm, run_dir, max_tokens)
        elif explicit_tasks:
            raise LmpError(
                f"{folder} is not part of an lmp run (no recipe.yaml above it), so there is no validation "
                "split; pass --text FILE for perplexity on a held-out file, or leave perplexity out of --tasks"
            )
        else:
            result.notes.append("perplexity skipped: not an lmp run folder and no --text given")
    return result


class _DecoderAsHF(torch.nn.Module):
    """An lmp Decoder seen through the calls scoring makes of a transformers model; bidirectional
    as the masked next-token export (modeling_lmp.py) runs it."""

    def __init__(self, decoder: torch.nn.Module, bidirectional: bool) -> None:
        super().__init__()
        self.decoder = decoder
        self.bidirectional = bidirectional

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple:
        if attention_mask is not None and attention_mask.dim() == 4:  # a token tree (scoring.py)
            return self.decoder(input_ids, position_ids=position_ids, attn_mask=attention_mask.bool())
        # other rows are unpadded, so the padding mask is all ones
        T = input_ids.shape[1]
        full = (
            torch.ones(1, 1, T, T, dtype=torch.bool, device=input_ids.device) if self.bidirectional else None
        )
        return self.decoder(input_ids, attn_mask=full)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.decoder.lm_head


class TrainingEvaluator:
    """The recipe's eval section: zero-shot tasks scored on the model being trained, in fp32 and by
    the same rules as `lmp eval` on its export. Task files are read once, when training starts, so a
    wrong eval.data_dir stops the run before its first step."""

    def __init__(self, cfg: EvalConfig, tokenizer_dir: Path, backends: Sequence[str]) -> None:
        from transformers import AutoTokenizer

        self.tasks: list[tuple[str, str, list[Item]]] = []
        self.notes: list[str] = []
        for task in cfg.tasks:
            if task == "probe":
                self.tasks.append((task, "lmp templates, seed 0", probe_items(0, cfg.probe_items)))
                continue
            source, items = load_task(task, Path(cfg.data_dir), cfg.fast)
            if cfg.fast and "fast" not in source.name and cfg.items_per_uid is None:
                self.notes.append(
                    f"eval.fast: {source} is a full set ({len(items):,} items), scored at every "
                    "evaluation; set eval.items_per_uid (e.g. 50) to score fewer"
                )
            if cfg.items_per_uid is not None:
                by_uid: dict[str, list[Item]] = defaultdict(list)
                for item in items:
                    by_uid[item.uid].append(item)
                items = [item for group in by_uid.values() for item in group[: cfg.items_per_uid]]
            self.tasks.append((task, str(source), items))
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, padding_side="right", local_files_only=True, trust_remote_code=False
        )
        self.tokenizer_dir = tokenizer_dir
        self.backends = list(backends)

    @torch.no_grad()
    def __call__(self, decoder: torch.nn.Module) -> dict[str, float]:
        """{"eval/<task>": mean accuracy %, ...}; masked next-token scores as eval/<task>_mntp."""
        device = next(decoder.parameters()).device
        was_training = decoder.training
        scores = {}
        try:
            for backend in self.backends:
                model = _DecoderAsHF(decoder, bidirectional=backend == "mntp").eval()
                sm = ScoringModel(model, self.tokenizer, backend, self.tokenizer_dir, device)
                for task, source, items in self.tasks:
                    # no group sizes: the shared-context path needs a key/value cache, which lmp's model lacks
                    sentences = [s for item in items for s in item.sentences]
                    completions = [c for item in items for c in item.completions]
                    flat = score_candidates(sm, sentences, completions)
                    bounds = np.cumsum([0] + [len(item.sentences) for item in items])
                    per_item = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
                    suffix = "" if backend == "causal" else f"_{backend}"
                    scores[f"eval/{task}{suffix}"] = judge(task, source, items, per_item).mean
        finally:
            decoder.train(was_training)
        return scores
