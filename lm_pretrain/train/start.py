"""Where a run starts, decided before any work: from scratch, a resume, a decay branch or a fork;
which recipe changes a resume or branch may make; the run-folder lock; the checks that a
checkpoint continues on the same data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from lm_pretrain.data.prepare import PreparedData, check_outside_corpus
from lm_pretrain.errors import LmpError, check_writable
from lm_pretrain.recipe import Recipe, load_recipe, recipe_changes
from lm_pretrain.run_folder import (
    BRANCH_FILE,
    CHECKPOINTS_DIR,
    FINAL_DIR,
    RECIPE_FILE,
    STATE_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    is_run_folder,
    read_json,
    step_checkpoints,
)
from lm_pretrain.train.schedule import Decay, Schedule, make_schedule, total_steps

# recipe fields a resumed run may change: how long it trains, what it reports, how it runs here.
# Everything else (data, tokenizer, model, objective, optimizer, schedule, batch) must match.
_RESUME_MAY_CHANGE = (
    "name",
    "data.cache_dir",
    "train.max_steps",
    "train.max_tokens",
    "train.max_words_seen",
    "train.micro_batch_size",
    "train.precision",
    "train.compile",
    "train.distributed",
    "train.activation_checkpointing",
    "train.log_every",
    "train.eval_every",
    "train.eval_tokens",
    "train.num_threads",
    "train.data_worker",
    "train.skip_nonfinite",
    "eval",
    "checkpoint",
    "tracking",
)


# a branch may also change the schedule: a decay starts from the parent's LR, a fork follows its own
_BRANCH_MAY_CHANGE = (*_RESUME_MAY_CHANGE, "schedule")


@dataclass(frozen=True)
class Branch:
    """Start a new run from another run's checkpoint; with a decay length, decay from there."""

    checkpoint: Path
    decay_steps: int | None = None
    decay_fraction: float | None = None

    def run_name(self, recipe_name: str) -> str:
        """The default folder name: <recipe>-<checkpoint>[-decay<N>], a sibling of the main run."""
        label = f"{recipe_name}-{self.checkpoint.name}"
        if self.decay_steps is not None:
            return f"{label}-decay{self.decay_steps}"
        if self.decay_fraction is not None:
            return f"{label}-decay{self.decay_fraction:g}"
        return label

    def resolve_decay(self, start_step: int) -> int | None:
        """The decay length in steps; a fraction F makes the decay F of the branch's total steps."""
        if self.decay_steps is not None:
            return self.decay_steps
        if self.decay_fraction is not None:
            return max(1, round(self.decay_fraction * start_step / (1 - self.decay_fraction)))
        return None


def _changes_allowed(
    recipe: Recipe, saved: Recipe, may_change: tuple[str, ...], refusal: str
) -> list[tuple[str, Any, Any]]:
    """The changes from the `saved` recipe; LmpError(refusal + the fields) when any field outside
    `may_change` differs."""
    changes = recipe_changes(saved, recipe)
    blocked = [
        (key, old, new)
        for key, old, new in changes
        if not any(key == p or key.startswith(p + ".") for p in may_change)
    ]
    if blocked:
        listed = "\n".join(f"  {key}: {old!r} there, {new!r} now" for key, old, new in blocked)
        raise LmpError(f"{refusal}\n{listed}")
    return changes


def _start_state(run_dir: Path, branch: Branch | None, resume: bool) -> tuple[Path | None, dict | None]:
    """Which checkpoint to load, and the branch record of a branch run (new or resumed)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LmpError(f"--out {run_dir} is a file; give a folder for the run, e.g. runs/<name>")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_folder(run_dir):
        fix = "train into a new folder so nothing in it is overwritten"
        if (run_dir / CHECKPOINTS_DIR).is_dir():
            fix = (
                "if it is a run whose status.json was lost, write one to resume it: "
                f'echo \'{{"state": "stopped"}}\' > {run_dir}/{STATUS_FILE}'
            )
        raise LmpError(f"--out {run_dir} is not empty and holds no lmp run (no status.json); {fix}")
    existing = step_checkpoints(run_dir)
    record = read_json(run_dir / BRANCH_FILE, "train into a new folder with --out")
    if existing:
        if branch is not None and record is None:
            raise LmpError(f"{run_dir} already holds a run; give the branch its own folder with --out")
        if branch is not None and (
            branch.checkpoint.resolve() != Path(record["checkpoint"])
            or branch.resolve_decay(record["parent_step"]) != record["decay_steps"]
        ):
            raise LmpError(
                f"{run_dir} holds a branch from {record['checkpoint']} with decay_steps "
                f"{record['decay_steps']}; resume it with those, or give this branch its own folder with --out"
            )
        return existing[-1], record
    if resume:
        raise LmpError(f"--resume: {run_dir} holds no checkpoint to resume from")
    if (run_dir / FINAL_DIR).exists() or (run_dir / SUMMARY_FILE).exists():
        raise LmpError(
            f"{run_dir} holds a trained run (final/, summary.json) but no checkpoint to continue from; "
            f"training again would overwrite its model and metrics. Train into a new folder with --out, "
            f"or delete {run_dir} first to start it over"
        )
    if branch is None:
        return None, None
    if not branch.checkpoint.exists():
        raise LmpError(
            f"--branch-from {branch.checkpoint} does not exist; pass a runs/<name>/checkpoints/step-<N> folder"
        )
    if not (branch.checkpoint / STATE_FILE).is_file():
        raise LmpError(
            f"--branch-from {branch.checkpoint} is not an lmp checkpoint (no trainer_state.json); "
            "pass a runs/<name>/checkpoints/step-<N> folder"
        )
    start_step = read_json(branch.checkpoint / STATE_FILE, "branch from another checkpoint")["step"]
    record = {
        "parent_run": str(branch.checkpoint.resolve().parent.parent),
        "parent_step": start_step,
        "checkpoint": str(branch.checkpoint.resolve()),
        "decay_steps": branch.resolve_decay(start_step),
    }
    return branch.checkpoint, record


def check_same_data(checkpoint: Path, state: dict, data: PreparedData, recipe: Recipe) -> None:
    """Refuse to continue a checkpoint on another corpus or under another tokenizer: its weights
    would read other token ids, and its data position would point into other text."""
    saved = checkpoint / "tokenizer.json"
    if saved.is_file():
        try:
            before = Tokenizer.from_file(str(saved)).get_vocab()
        except Exception as exc:  # the tokenizers library raises bare Exceptions
            raise LmpError(
                f"{saved} is damaged ({exc}); restore it from the run's tokenizer/ folder, or move "
                f"{checkpoint.name} out of {checkpoint.parent}"
            ) from None
        moved = sum(before.get(token) != i for token, i in data.tokenizer.get_vocab().items())
        if moved:
            raise LmpError(
                f"the tokenizer for this corpus differs from the one {checkpoint} was trained with "
                f"({moved:,} token ids map differently): the corpus (data.path {recipe.data.path}) or "
                "tokenizer.path changed since the run started. Restore them, or train into a new folder with --out"
            )
    if state.get("corpus", data.corpus_fingerprint) != data.corpus_fingerprint:
        raise LmpError(
            f"the corpus at data.path {recipe.data.path} is not the one {checkpoint} was trained on (its "
            "documents changed since the run started), so the run cannot continue where it stopped. "
            "Restore the corpus, or train on the new one into a new folder with --out"
        )


def lr_jump_warning(before: Recipe, schedule: Schedule, step: int, words_per_token: float) -> str | None:
    """A new length moves a final decay: a warning when the LR at the resume step changes."""
    tokens_per_step = before.train.batch_size * before.seq_len
    old = make_schedule(before.schedule, total_steps(before, words_per_token), tokens_per_step)(step)
    new = schedule(step)
    if abs(new - old) <= 0.05 * max(old, new):
        return None
    return (
        f"  warning: the new length moves the schedule's decay: the LR at step {step} goes from "
        f"{old:.0%} to {new:.0%} of the peak"
    )


@dataclass
class StartPlan:
    """Where a run starts: the checkpoint to load (None: from scratch), the branch record, the
    recipe fields changed since the run's last attempt (and that attempt's recipe), and the
    parent's recipe of a branch."""

    checkpoint: Path | None
    branch_record: dict | None
    changes: list[tuple[str, Any, Any]]
    previous_recipe: Recipe | None  # the run's own recipe before this attempt, when resuming
    parent_recipe: Recipe | None


def plan_start(recipe: Recipe, run_dir: Path, branch: Branch | None, resume: bool) -> StartPlan:
    """Decide where training starts, refusing (LmpError) a recipe that does not fit the run folder
    or the branch's parent. Writes nothing."""
    if recipe.data.validation_fraction == 0:
        raise LmpError(
            "training reports validation loss on held-out documents: set data.validation_fraction "
            "above 0 (0.01 is usual)"
        )
    check_writable(run_dir, "run folder")
    check_outside_corpus(recipe, run_dir, "run folder")
    checkpoint, branch_record = _start_state(run_dir, branch, resume)
    changes = []
    previous = None
    saved = run_dir / RECIPE_FILE
    if checkpoint is not None and checkpoint.parent.parent == run_dir and saved.is_file():
        previous = load_recipe(saved)
        changes = _changes_allowed(
            recipe,
            previous,
            _RESUME_MAY_CHANGE,
            f"{run_dir} holds a run whose recipe differs from this one; resume it with its own "
            f"recipe (lmp train {saved} --out {run_dir}; lengths, evaluation, checkpointing and "
            f"tracking may change with --set), or train this recipe into a new folder with --out:",
        )
    parent_recipe = None
    if branch_record is not None:
        parent_saved = Path(branch_record["parent_run"]) / RECIPE_FILE
        parent_recipe = load_recipe(parent_saved) if parent_saved.is_file() else recipe
        _changes_allowed(
            recipe,
            parent_recipe,
            _BRANCH_MAY_CHANGE,
            f"a branch continues its parent's data, model and optimizer, but this recipe differs "
            f"from the parent's ({parent_saved}); branch with that recipe:",
        )

    return StartPlan(checkpoint, branch_record, changes, previous, parent_recipe)


def run_length(recipe: Recipe, plan: StartPlan, words_per_token: float) -> tuple[int, int, Schedule]:
    """(the step this run ends at, the main run's length, the LR schedule). A decay branch ends
    its decay steps after the branch point and decays from the LR its parent had there (recorded
    in the branch record when the branch starts); a fork follows the recipe's own schedule."""
    branch_record, tokens_per_step = plan.branch_record, recipe.train.batch_size * recipe.seq_len
    main_steps = total_steps(recipe, words_per_token)
    steps = main_steps
    decay = None
    if branch_record is not None and branch_record["decay_steps"] is not None:
        start = branch_record["parent_step"]
        steps = start + branch_record["decay_steps"]
        if "start_lr_ratio" not in branch_record:
            # the LR the parent's own schedule has at the branch point, fixed when the branch starts
            parent = make_schedule(
                plan.parent_recipe.schedule, total_steps(plan.parent_recipe, words_per_token), tokens_per_step
            )
            branch_record["start_lr_ratio"] = parent(start)
            decay_start = parent.total - parent.decay
            if parent.decay and start > decay_start:
                ratio = branch_record["start_lr_ratio"]
                where = (
                    f"at the end of its run's decay (LR {ratio:.3g} of the peak)"
                    if ratio <= plan.parent_recipe.schedule.min_lr_ratio + 1e-6
                    else f"inside its run's decay, which began at step {decay_start} (LR {ratio:.3g} of the peak)"
                )
                raise LmpError(
                    f"--branch-from {branch_record['checkpoint']} is {where}: a decay branch would decay "
                    f"from there. Branch from a checkpoint before step {decay_start}, or from a main run "
                    "trained without a final decay (--set schedule.decay=0 --out runs/<main>)"
                )
        decay = Decay(
            start,
            branch_record["decay_steps"],
            branch_record["start_lr_ratio"],
            recipe.schedule.min_lr_ratio,
            recipe.schedule.decay_shape,
        )
    if branch_record is not None and decay is None and steps <= branch_record["parent_step"]:
        raise LmpError(
            f"this fork continues the schedule from step {branch_record['parent_step']}, but the recipe "
            f"trains {steps} steps in all, so it would train nothing; raise train.max_steps (or "
            "max_tokens / max_words_seen) above that with --set, or give --decay-steps / "
            "--decay-fraction for a decay branch"
        )
    schedule = make_schedule(recipe.schedule, main_steps, tokens_per_step, decay)
    return steps, main_steps, schedule
