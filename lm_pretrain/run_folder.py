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

import errno
import fcntl
import json
import os
import re
import socket
import time
from contextlib import ExitStack
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
PROGRESS_FILE = "progress.png"
STATE_FILE = "trainer_state.json"  # in each checkpoint, written last: it marks the checkpoint complete
# what training writes in a run folder: commands that write folders keep out of these
_RUN_OWNED = (CHECKPOINTS_DIR, FINAL_DIR, FINAL_AVERAGE_DIR, TOKENIZER_DIR)


def is_run_folder(path: Path) -> bool:
    """Whether lmp created `path` as a run (it writes status.json before anything else)."""
    return (path / STATUS_FILE).is_file()


def check_outside_run(path: Path, option: str) -> None:
    """Refuse an output folder that is a run, or lies in what training writes in one (its final
    models, checkpoints, tokenizer), so that no command replaces or adds to them."""
    resolved = path.resolve()
    run = next((p for p in (resolved, *resolved.parents) if is_run_folder(p)), None)
    if run is not None and (resolved == run or resolved.relative_to(run).parts[0] in _RUN_OWNED):
        raise LmpError(
            f"{option} {path} is part of the training run {run}; pick a folder outside its "
            f"{', '.join(sorted(_RUN_OWNED))}"
        )


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


_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (step-<N> and milestone chck_<N>M folders), oldest first.
    Temporary folders and folders without trainer_state.json are ignored."""
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.name.startswith(".") or not (path / STATE_FILE).is_file():
            continue
        try:
            step = json.loads((path / STATE_FILE).read_text())["step"]
        except (ValueError, KeyError, TypeError):
            raise LmpError(
                f"checkpoint {path} has an unreadable {STATE_FILE}; move the folder aside to resume "
                "from the previous checkpoint"
            ) from None
        # at equal steps a step-N folder sorts last: it is the one resume reads
        found.append((step, bool(_STEP_DIR.match(path.name)), path.name, path))
    return [p for *_, p in sorted(found)]


def is_step_checkpoint(path: Path) -> bool:
    """A step-<N> folder (pruned to checkpoint.keep_last), not a milestone (always kept)."""
    return _STEP_DIR.match(path.name) is not None


def model_folder(path: Path) -> Path:
    """The model folder `path` stands for: itself, or for a run its final/ export, else its
    newest checkpoint. LmpError when it is none of these."""
    if not path.exists():
        raise LmpError(f"{path} does not exist; pass runs/<name>, runs/<name>/final or a model folder")
    if (path / "config.json").is_file():
        return path
    if (path / FINAL_DIR / "config.json").is_file():
        return path / FINAL_DIR
    checkpoints = step_checkpoints(path)
    if not checkpoints:
        raise LmpError(
            f"{path} is not a model folder (no config.json), nor a run folder with final/ or "
            "checkpoints/; pass runs/<name>/final, runs/<name>/checkpoints/step-<N>, or a "
            "transformers model folder"
        )
    return checkpoints[-1]


def run_of_checkpoint(folder: Path) -> Path | None:
    """The run folder a checkpoint folder belongs to (runs/<name>/checkpoints/<ckpt>), else None."""
    folder = folder.resolve()
    return folder.parent.parent if folder.parent.name == CHECKPOINTS_DIR else None


def root_run(run_dir: Path) -> Path:
    """The run a branch descends from, followed through branch.json to the run that set its
    initial weights (itself for a main run)."""
    seen = {run_dir}
    while "parent_run" in (branch := read_json(run_dir / BRANCH_FILE) or {}):
        run_dir = Path(branch["parent_run"])
        if run_dir in seen:
            break
        seen.add(run_dir)
    return run_dir


def lock_run_folder(run_dir: Path, cleanup: ExitStack) -> None:
    """Hold run_dir/.lock while training: a second `lmp train` into the same folder would
    resume from checkpoints the first is still writing and interleave both logs. A POSIX lock:
    the kernel drops it when this process ends, however it ends, and forked children (the data
    worker, which may outlive a killed trainer by seconds) do not hold it."""
    handle = cleanup.enter_context((run_dir / LOCK_FILE).open("a+"))
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            return  # a filesystem without locks (some network mounts): train unguarded
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise LmpError(
            f"{run_dir} is in use by another lmp train ({holder}); wait for it to end or stop it "
            "(it saves a checkpoint on SIGTERM), or train into another folder with --out"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
