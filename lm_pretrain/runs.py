"""Reading run folders for `lmp runs` and `lmp plot`: metrics, state, size, branch parent.

Everything here reads files only (no torch, no model loading), tolerates partial, running and
crashed runs, and turns odd data into warnings rather than errors: a truncated last line of
metrics.jsonl is what a kill mid-write leaves behind, and must not hide the rest of the run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import validate_recipe
from lm_pretrain.run_folder import (
    BRANCH_FILE,
    CHECKPOINTS_DIR,
    FINAL_AVERAGE_DIR,
    FINAL_DIR,
    METRICS_FILE,
    RECIPE_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    TOKENIZER_DIR,
    read_json,
)
from lm_pretrain.train.schedule import total_steps

# folders inside a run that never hold runs themselves; skipped when searching for runs
_NOT_RUNS = {
    CHECKPOINTS_DIR,
    FINAL_DIR,
    FINAL_AVERAGE_DIR,
    TOKENIZER_DIR,
    "wandb",
    "tensorboard",
    ".tmp-final",
}
_RUN_MARKERS = (METRICS_FILE, RECIPE_FILE, STATUS_FILE)
EVAL_PREFIX = "eval/"


@dataclass
class Run:
    """What one run folder says about itself; every part may be missing."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    branch: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def parent(self) -> Path | None:
        if self.branch and self.branch.get("parent_run"):
            return Path(self.branch["parent_run"])
        return None

    @property
    def parent_step(self) -> int | None:
        value = (self.branch or {}).get("parent_step")
        return int(value) if isinstance(value, (int, float)) else None

    def last(self, key: str) -> Any:
        """The newest logged value of `key`, or None."""
        for record in reversed(self.records):
            if _is_number(record.get(key)):
                return record[key]
        return None

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x values, values) of every record that has both, in logged order."""
        xs, ys = [], []
        for record in self.records:
            if _is_number(record.get(key)) and _is_number(record.get(x)):
                xs.append(record[x])
                ys.append(record[key])
        return xs, ys

    def metric_keys(self) -> list[str]:
        keys: dict[str, None] = {}
        for record in self.records:
            for key, value in record.items():
                if _is_number(value):
                    keys[key] = None
        return list(keys)


def _is_number(value: Any) -> bool:
    # bool is an int in Python, and NaN/inf would wreck axis limits and "best" values
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a metrics.jsonl, and warnings for the lines that had to be skipped.

    Lines that are not JSON objects (a truncated last line after a kill, a corrupt line) are
    skipped with a warning. After a resume, the steps logged past the checkpoint before the
    crash are logged again: the later records replace the earlier ones from that step on, so
    curves never fold back. Two records of the same step (e.g. evaluation scores logged after
    the training line) are merged into one.
    """
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return [], [f"{path}: cannot read ({exc.strerror or exc})"]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            where = "last line" if number == len(lines) else f"line {number}"
            warnings.append(f"{path}: skipped {where} (not complete JSON; truncated by a crash?)")
            continue
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            warnings.append(f"{path}: skipped line {number} (no step)")
            continue
        step = record["step"]
        if records and step == records[-1]["step"]:
            records[-1] = {**records[-1], **record}
            continue
        if records and step < records[-1]["step"]:
            records = [r for r in records if r["step"] < step]  # resumed from an earlier checkpoint
        records.append(record)
    return records, warnings


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except LmpError as exc:  # a damaged file leaves its fields empty, and is noted
        warnings.append(str(exc))
        return None


def load_run(run_dir: Path) -> Run:
    """Read a run folder; what is missing or unreadable is left empty and noted in .warnings."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmpError(f"{run_dir} is not a folder; give a run folder such as runs/demo")
    run = Run(path=run_dir)
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        run.records, run.warnings = read_metrics(metrics)
    recipe_file = run_dir / RECIPE_FILE
    if recipe_file.is_file():
        try:
            recipe = yaml.safe_load(recipe_file.read_text())
            run.recipe = recipe if isinstance(recipe, dict) else {}
        except (OSError, yaml.YAMLError) as exc:
            run.warnings.append(f"{recipe_file}: unreadable ({exc})")
    run.status = _read_json(run_dir / STATUS_FILE, run.warnings)
    run.summary = _read_json(run_dir / SUMMARY_FILE, run.warnings)
    run.branch = _read_json(run_dir / BRANCH_FILE, run.warnings)
    return run


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _RUN_MARKERS)


def find_runs(dirs: list[Path], max_depth: int = 4) -> list[Path]:
    """Run folders at or under each of `dirs` (a run may hold branch runs in a subfolder)."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if is_run_dir(folder):
            found.append(folder)
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if child.name not in _NOT_RUNS:
                walk(child, depth + 1)

    for folder in dirs:
        if not folder.is_dir():
            raise LmpError(f"{folder} is not a folder (give folders that hold run folders, e.g. runs/)")
        walk(folder, 0)
    unique = dict.fromkeys(p.resolve() for p in found)
    return [Path(p) for p in unique]


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return False
    return True


def run_state(run: Run) -> str:
    """running | finished | stopped | failed | died (running, but its process is gone) | unknown."""
    state = (run.status or {}).get("state")
    if state == "running":
        return "running" if _pid_alive(run.status.get("pid")) else "died"
    if state in ("finished", "stopped", "failed"):
        return state
    if run.summary is not None:
        return "finished"  # runs from before status.json
    return "unknown"


def _config_json(run_dir: Path) -> dict[str, Any] | None:
    """config.json of final/ or else the newest checkpoint (for the real vocabulary size)."""
    candidates = [run_dir / FINAL_DIR / "config.json"]
    checkpoints = run_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir():
        steps = []
        for child in checkpoints.iterdir():
            number = child.name.removeprefix("step-")
            if child.name.startswith("step-") and number.isdigit():
                steps.append((int(number), child))
        candidates += [child / "config.json" for _, child in sorted(steps, reverse=True)]
    for path in candidates:
        if path.is_file():
            try:
                value = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(value, dict):
                return value
    return None


def count_parameters(
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    tie_embeddings: bool,
) -> int:
    """Parameters of lmp's Llama-style decoder, counted from its shapes (tied weights once)."""
    head_dim = hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    mlp = 3 * hidden * intermediate  # SwiGLU: gate, up, down
    per_layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    embeddings = vocab * hidden * (1 if tie_embeddings else 2)
    return embeddings + layers * per_layer + hidden  # final norm


def run_parameters(run: Run) -> int | None:
    """From summary.json when it says, else the saved config.json, else the recipe's model section."""
    summary = run.summary or {}
    if isinstance(summary.get("num_parameters"), int):
        return summary["num_parameters"]
    try:
        config = _config_json(run.path)
        if config is not None:
            return count_parameters(
                vocab=int(config["vocab_size"]),
                hidden=int(config["hidden_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=int(config["num_attention_heads"]),
                kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                intermediate=int(config["intermediate_size"]),
                tie_embeddings=bool(config.get("tie_word_embeddings", True)),
            )
        model = run.recipe.get("model") or {}
        vocab = (run.recipe.get("tokenizer") or {}).get("vocab_size")
        if not model or not vocab:
            return None
        hidden = int(model["hidden_size"])
        # the decoder's default SwiGLU width: 8/3 hidden rounded up to a multiple of 64
        intermediate = model.get("intermediate_size") or math.ceil(8 * hidden / 3 / 64) * 64
        return count_parameters(
            vocab=int(vocab),  # the tokenizer may learn fewer; exact once a checkpoint exists
            hidden=hidden,
            layers=int(model["num_layers"]),
            heads=int(model["num_heads"]),
            kv_heads=int(model.get("num_kv_heads") or model["num_heads"]),
            intermediate=int(intermediate),
            tie_embeddings=bool(model.get("tie_embeddings", True)),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def planned_steps(run: Run) -> int | None:
    """The step the run is meant to end at: a branch's decay end, else the recipe's length as the
    trainer computes it (a words-seen bound at the words per token logged so far)."""
    branch = run.branch or {}
    if branch.get("decay_steps") and branch.get("parent_step") is not None:
        return int(branch["parent_step"]) + int(branch["decay_steps"])
    try:
        recipe = validate_recipe(run.recipe, str(run.path / RECIPE_FILE))
    except LmpError:  # an older or damaged recipe: no length to show
        return None
    words, tokens = run.last("words"), run.last("tokens")
    try:
        return total_steps(recipe, words / tokens if words and tokens else None)
    except ValueError:  # a words-seen bound before any words were counted
        return None


def best_val_loss(run: Run) -> tuple[float, int] | None:
    """(lowest validation loss, its step)."""
    xs, ys = run.series("val_loss")
    if not ys:
        return None
    value, step = min(zip(ys, xs, strict=True))
    return value, int(step)


def latest_evals(run: Run) -> dict[str, float]:
    """The newest score of each eval/<name> metric, keyed by <name>."""
    scores: dict[str, float] = {}
    for record in run.records:
        for key, value in record.items():
            if key.startswith(EVAL_PREFIX) and _is_number(value):
                scores[key.removeprefix(EVAL_PREFIX)] = value
    return scores


def run_row(run: Run) -> dict[str, Any]:
    """One run's line of the `lmp runs` table as plain values (None where unknown)."""
    steps = run.last("step")
    for extra in ((run.status or {}).get("step"), (run.summary or {}).get("step")):
        if _is_number(extra) and (steps is None or extra > steps):
            steps = extra
    best = best_val_loss(run)
    return {
        "run": str(run.path),
        "name": run.name,
        "recipe": run.recipe.get("name"),
        "parameters": run_parameters(run),
        "tokens": run.last("tokens"),
        "words": run.last("words"),
        "steps": int(steps) if steps is not None else None,
        "planned_steps": planned_steps(run),
        "loss": run.last("loss"),
        "best_val_loss": best[0] if best else None,
        "best_val_step": best[1] if best else None,
        "evals": latest_evals(run),
        "val_loss_by_source": {
            key.removeprefix("val_loss/"): run.last(key)
            for key in sorted({k for r in run.records for k in r if k.startswith("val_loss/")})
        },
        "state": run_state(run),
        "error": (run.status or {}).get("error"),
        "parent": str(run.parent) if run.parent else None,
        "parent_step": run.parent_step,
    }


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}"
    return f"{n:g}"


_STATE_STYLE = {"running": "cyan", "finished": "green", "stopped": "yellow", "failed": "red", "died": "red"}


def runs_table(runs: list[Run], root: Path | None = None) -> Table:
    """The `lmp runs` table. Names are paths relative to `root` when the run lies under it.
    Columns no run has a value for (words, evals, per-source validation, parent) are left out to
    save width."""
    rows = []
    for run in runs:
        row = run_row(run)
        name = run.name
        if root is not None:
            try:
                relative = run.path.resolve().relative_to(root.resolve())
                name = str(relative) if relative.parts else run.name
            except ValueError:
                pass
        steps = "-" if row["steps"] is None else str(row["steps"])
        if row["planned_steps"] and row["state"] != "finished":
            steps += f"/{row['planned_steps']}"
        best = "-"
        if row["best_val_loss"] is not None:
            best = f"{row['best_val_loss']:.4f} @{row['best_val_step']}"
        parent = "-"
        if row["parent"]:
            parent = Path(row["parent"]).name + (f" @{row['parent_step']}" if row["parent_step"] else "")
        state = row["state"]
        rows.append(
            {
                "run": name,
                "recipe": row["recipe"] or "-",
                "params": _count(row["parameters"]),
                "tokens": _count(row["tokens"]),
                "words": _count(row["words"]),
                "steps": steps,
                "loss": "-" if row["loss"] is None else f"{row['loss']:.4f}",
                "best val": best,
                "evals": ", ".join(f"{k} {v:.1f}%" for k, v in sorted(row["evals"].items())) or "-",
                "val by source": ", ".join(
                    f"{k} {v:.3f}" for k, v in row["val_loss_by_source"].items() if v is not None
                )
                or "-",
                "state": f"[{_STATE_STYLE.get(state, 'dim')}]{state}[/]",
                "parent": parent,
            }
        )
    optional = {"words", "evals", "val by source", "parent"}
    columns = [c for c in (rows[0] if rows else {}) if c not in optional or any(r[c] != "-" for r in rows)]
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in columns:
        wraps = column in ("run", "evals", "val by source")
        left = wraps or column in ("recipe", "state", "parent")
        # names and eval lists may wrap; numbers must stay whole
        table.add_column(column, justify="left" if left else "right", no_wrap=not wraps)
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    return table
