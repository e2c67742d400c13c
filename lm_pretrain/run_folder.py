"""The run folder, in one place: the names lmp writes into runs/<name>/ and how they are read.

status.json     running | finished | stopped | failed; lmp's own marker: a folder without
                it is not a run, and lmp never trains into it
recipe.yaml     the resolved recipe of the newest attempt
branch.json     a branch's parent checkpoint, parent step and decay
metrics.jsonl   one record per logged or validated step
summary.json    written last, once final/ is complete
checkpoints/    step-<N>/ and BabyLM milestone chck_<N>M/ folders (train/checkpoint.py)
final/          the trained model as a transformers folder; final-avg/ its weight average
tokenizer/      the tokenizer files copied into every model folder
progress.png    the run's curves, redrawn at each validation
.lock           held while a trainer runs
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lm_pretrain.errors import LmpError

STATUS_FILE = "status.json"
RECIPE_FILE = "recipe.yaml"
BRANCH_FILE = "branch.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
FINAL_AVERAGE_DIR = "final-avg"
TOKENIZER_DIR = "tokenizer"
LOCK_FILE = ".lock"


def is_run_folder(path: Path) -> bool:
    """Whether lmp created `path` as a run (it writes status.json before anything else)."""
    return (path / STATUS_FILE).is_file()


def read_json(path: Path, fix: str = "") -> dict[str, Any] | None:
    """A JSON object file of the run folder: None when absent; LmpError when damaged, ending with
    `fix` (what to do about it)."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LmpError(f"{path} is damaged ({exc})" + (f"; {fix}" if fix else "")) from None
    if not isinstance(value, dict):
        raise LmpError(f"{path} is damaged (not a JSON object)" + (f"; {fix}" if fix else ""))
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary sibling and a rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    """status.json: running | finished | stopped | failed, for `lmp runs` and resume."""
    record = {"state": state, "pid": os.getpid(), "updated": round(time.time(), 3), **extra}
    write_atomic(run_dir / STATUS_FILE, json.dumps(record) + "\n")
