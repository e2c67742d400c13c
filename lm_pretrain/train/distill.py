"""distill: teachers for the student's loss (model/decoder.py chunked_distill_loss).

Teachers are loaded as lmp Decoders (lmp runs, checkpoints, exports and Llama-architecture
transformers folders: weights and config only, no code is run), frozen, and run without gradients
under the training autocast. They are never part of the student: its checkpoints do not hold them,
and a resumed run loads them again from the recipe's paths.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from rich.console import Console
from tokenizers import Tokenizer

from lm_pretrain.data.prepare import PreparedData
from lm_pretrain.data.tokenizer import first_token_difference
from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import Decoder, DistillTargets
from lm_pretrain.model.export import load_model
from lm_pretrain.recipe import Recipe
from lm_pretrain.run_folder import model_folder, read_json

TOKENIZER_FILE = "tokenizer.json"


class Teachers:
    def __init__(
        self,
        models: list[Decoder],
        share: float,
        temperature: float,
        autocast: Callable[[], AbstractContextManager],
    ) -> None:
        self.models, self.share, self.temperature, self.autocast = models, share, temperature, autocast

    @torch.no_grad()
    def targets(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor | None,
        mask: torch.Tensor | None,
        bounds: torch.Tensor | None,
    ) -> DistillTargets:
        """The teachers' part of the loss for this batch, seen as the student sees it."""
        with self.autocast():
            hiddens = tuple(
                m(
                    inputs, position_ids=positions, attn_mask=mask, cu_seqlens=bounds, return_hidden=True
                ).hidden
                for m in self.models
            )
        heads = tuple(m.lm_head.weight for m in self.models)
        return DistillTargets(hiddens, heads, self.share, self.temperature)


def _trained_on(folder: Path) -> str | None:
    """The corpus fingerprint an lmp model folder or checkpoint was trained on (None: unknown)."""
    for name in ("lmp.json", "trainer_state.json"):
        record = read_json(folder / name) if (folder / name).is_file() else None
        if isinstance(record, dict) and isinstance(record.get("corpus"), str):
            return record["corpus"]
    return None


def load_teachers(
    recipe: Recipe, data: PreparedData, device: torch.device, autocast: Callable, console: Console | None
) -> Teachers:
    """The recipe's teachers, checked against the student's tokenizer and the word budget."""
    cfg = recipe.distill
    models, foreign = [], []
    for given in cfg.teachers:
        folder = model_folder(Path(given))
        tokenizer_file = folder / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise LmpError(
                f"teacher {given}: {tokenizer_file} is missing, so lmp cannot check that it shares the "
                "student's tokenizer; use a run, checkpoint or model folder that holds its tokenizer.json"
            )
        try:
            teacher_tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises its own exception types
            raise LmpError(f"teacher {given}: {tokenizer_file} cannot be read ({exc})") from None
        difference = first_token_difference(data.tokenizer, teacher_tokenizer)
        if difference is not None:
            raise LmpError(
                f"teacher {given} has another tokenizer than the student ({difference}); distillation "
                "compares distributions token by token, so train the student with the teacher's tokenizer "
                f"(tokenizer.path: {tokenizer_file})"
            )
        model = load_model(folder, device)
        if model.config.vocab_size != data.tokenizer.get_vocab_size():
            raise LmpError(
                f"teacher {given} has {model.config.vocab_size} output rows for a vocabulary of "
                f"{data.tokenizer.get_vocab_size()}; use a teacher whose vocab_size equals its tokenizer's"
            )
        models.append(model.eval().requires_grad_(False))
        if _trained_on(folder) != data.corpus_fingerprint:
            foreign.append(given)
    _check_budget(recipe, data, foreign, console)
    return Teachers(models, cfg.weight, cfg.temperature, autocast)


def _check_budget(recipe: Recipe, data: PreparedData, foreign: list[str], console: Console | None) -> None:
    """Under a word budget, teachers trained on other text count their words (BabyLM 2025 rules)."""
    budget = recipe.data.word_budget
    if budget is None:
        return
    declared = recipe.distill.teacher_words
    if foreign and declared is None:
        raise LmpError(
            f"teacher {foreign[0]} was not trained by lmp on this corpus, and under data.word_budget the "
            "BabyLM rules count the words its training saw; declare them in distill.teacher_words"
        )
    corpus = sum(sum(split.values()) for split in data.word_counts.values())
    total = corpus + (declared or 0)
    line = (
        f"word budget: corpus {corpus:,} + teachers' declared {declared or 0:,} = {total:,} of "
        f"{budget:,} ({100 * total / budget:.1f}%)"
    )
    if total > budget:
        raise LmpError(f"{line}: the corpus and the teachers' training words together must fit the budget")
    if console is not None:
        console.print(line)


def teachers_info(teachers: Teachers) -> str:
    """One line on the teachers for the run's opening lines."""
    sizes = ", ".join(f"{m.num_parameters() / 1e6:.2f}M" for m in teachers.models)
    return (
        f"distillation: {len(teachers.models)} teacher(s) ({sizes}), share {teachers.share:g}, "
        f"temperature {teachers.temperature:g}"
    )
