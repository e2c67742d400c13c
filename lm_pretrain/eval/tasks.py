"""Readers for the zero-shot task files: the BabyLM 2025 `evaluation_data` layout and the original
BLiMP release. Every task becomes a list of `Item`s: candidate texts, the correct one first, each
with the part of it that is scored (its completion), exactly as the official pipeline builds them.

Layout (official repository, evaluation_data/):

    full_eval/blimp_filtered/*.jsonl      fast_eval/blimp_fast/*.jsonl
    full_eval/supplement_filtered/*.jsonl fast_eval/supplement_fast/*.jsonl
    full_eval/ewok_filtered/*.jsonl       fast_eval/ewok_fast/*.jsonl
    full_eval/entity_tracking/*.jsonl     fast_eval/entity_tracking_fast/*.jsonl
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lm_pretrain.errors import LmpError
from lm_pretrain.jsonl import json_objects


@dataclass(frozen=True)
class Item:
    """One ranking question: candidates[0] is correct. Only `completions[i]`, the end of
    `sentences[i]`, is scored; the rest of the sentence is context."""

    uid: str
    sentences: tuple[str, ...]
    completions: tuple[str, ...]
    field: str = ""
    term: str = ""
    pair_id: str = ""


def with_prefix(item: Item, prefix: str) -> Item:
    """The same item with `prefix` (e.g. MeCo metadata) as unscored context before every sentence."""
    return replace(item, sentences=tuple(prefix + s for s in item.sentences))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a malformed line is an LmpError naming file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LmpError(f"cannot read task file {path}: {exc}") from None
    rows = [
        row for _, row in json_objects(enumerate(lines, start=1), path, "re-download the evaluation data")
    ]
    if not rows:  # an empty task would drop out of the averages unseen
        raise LmpError(f"task file {path} holds no rows; re-download the evaluation data")
    return rows


def _need(row: dict[str, Any], keys: tuple[str, ...], path: Path, number: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise LmpError(
            f"{path}: row {number} lacks field(s) {', '.join(missing)} (has {', '.join(sorted(row))}); "
            f"is this the right folder for the task?"
        )


def _jsonl_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.jsonl"))  # sorted: the official reader's order is the OS's
    if not files:
        raise LmpError(f"no *.jsonl task files in {folder}")
    return files


def read_blimp(folder: Path) -> list[Item]:
    """BLiMP: the filtered BabyLM release (pair_id) or the original one (pairID); whole sentences."""
    items = []
    for path in _jsonl_files(folder):
        for number, row in enumerate(read_jsonl(path), start=1):
            _need(row, ("sentence_good", "sentence_bad", "UID", "field"), path, number)
            field = "syntax/semantics" if row["field"] == "syntax_semantics" else row["field"]
            good, bad = str(row["sentence_good"]), str(row["sentence_bad"])
            items.append(
                Item(
                    uid=str(row["UID"]),
                    sentences=(good, bad),
                    completions=(good, bad),
                    field=str(field),
                    term=str(row.get("linguistics_term", "")),
                    pair_id=str(row.get("pair_id", row.get("pairID", number - 1))),
                )
            )
    return items


def read_supplement(folder: Path) -> list[Item]:
    """BLiMP supplement: sentence_good / sentence_bad, the UID is the file's stem."""
    items = []
    for path in _jsonl_files(folder):
        for number, row in enumerate(read_jsonl(path), start=1):
            _need(row, ("sentence_good", "sentence_bad"), path, number)
            good, bad = str(row["sentence_good"]), str(row["sentence_bad"])
            items.append(
                Item(path.stem, (good, bad), (good, bad), "supplement", "supplement", str(number - 1))
            )
    return items


def read_ewok(folder: Path) -> list[Item]:
    """EWoK: Context1 followed by " " + Target1 (correct) or " " + Target2; only the target is scored."""
    items = []
    for path in _jsonl_files(folder):
        for number, row in enumerate(read_jsonl(path), start=1):
            _need(row, ("Context1", "Target1", "Target2", "Domain"), path, number)
            context = str(row["Context1"])
            targets = (str(row["Target1"]), str(row["Target2"]))
            items.append(
                Item(
                    uid=str(row["Domain"]),
                    sentences=tuple(f"{context} {t}" for t in targets),
                    completions=tuple(f" {t}" for t in targets),
                    field=str(row["Domain"]),
                    pair_id=str(row.get("ItemId", number - 1)),
                )
            )
    return items


def read_entity_tracking(folder: Path) -> list[Item]:
    """Entity tracking: input_prefix + each option (correct first); UID <file>_<numops>_ops."""
    items = []
    for path in _jsonl_files(folder):
        for number, row in enumerate(read_jsonl(path), start=1):
            _need(row, ("input_prefix", "options", "numops"), path, number)
            options = row["options"]
            if not isinstance(options, list) or len(options) < 2:
                raise LmpError(f"{path}: row {number}: options must be a list of at least two strings")
            prefix = str(row["input_prefix"])
            items.append(
                Item(
                    uid=f"{path.stem}_{row['numops']}_ops",
                    sentences=tuple(prefix + str(o) for o in options),
                    completions=tuple(str(o) for o in options),
                    field=path.stem,
                    pair_id=str(number - 1),
                )
            )
    return items


@dataclass(frozen=True)
class DataTask:
    """A zero-shot task read from the BabyLM evaluation data: its reader and its folders under
    full_eval/ and fast_eval/."""

    read: Callable[[Path], list[Item]]
    full_folder: str
    fast_folder: str


# the data tasks (eval --tasks, a recipe's eval.tasks): a new one is a reader above and a line here
DATA_TASKS: dict[str, DataTask] = {
    "blimp": DataTask(read_blimp, "blimp_filtered", "blimp_fast"),
    "blimp_supplement": DataTask(read_supplement, "supplement_filtered", "supplement_fast"),
    "ewok": DataTask(read_ewok, "ewok_filtered", "ewok_fast"),
    "entity_tracking": DataTask(read_entity_tracking, "entity_tracking", "entity_tracking_fast"),
}
# what lmp eval --tasks takes: the data tasks, lmp's grammar probe and perplexity
ALL_TASKS = (*DATA_TASKS, "probe", "perplexity")


def locate(task: str, data_dir: Path, fast: bool = False) -> Path:
    """The folder of `task` under `data_dir`: the evaluation_data root, its full_eval/ or fast_eval/,
    the task folder itself, or (for blimp) any folder of BLiMP-layout *.jsonl files."""
    spec = DATA_TASKS[task]
    name = spec.fast_folder if fast else spec.full_folder
    split = "fast_eval" if fast else "full_eval"
    tried = [
        data_dir / name,
        data_dir / split / name,
        data_dir / "evaluation_data" / split / name,
    ]
    for folder in tried:
        if folder.is_dir():
            return folder
    if data_dir.is_dir() and data_dir.name == name:
        return data_dir
    # a plain folder of BLiMP files (e.g. the original release) is accepted for blimp
    if task == "blimp" and any(data_dir.glob("*.jsonl")):
        return data_dir
    if not data_dir.exists():
        raise LmpError(
            f"no data for task {task}: {data_dir} does not exist; point --data-dir (eval.data_dir in a "
            "recipe) at the BabyLM evaluation_data folder"
        )
    raise LmpError(
        f"no data for task {task} under {data_dir} (looked for {', '.join(str(t) for t in tried)}); "
        f"point --data-dir (eval.data_dir in a recipe) at the BabyLM evaluation_data folder, or leave "
        f"{task} out of the tasks"
    )


def load_task(task: str, data_dir: Path, fast: bool = False) -> tuple[Path, list[Item]]:
    folder = locate(task, data_dir, fast)
    return folder, DATA_TASKS[task].read(folder)
