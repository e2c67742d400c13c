"""BabyLM milestone checkpoints, named by words seen, and their export for submission.

The 2025 rules ask for checkpoints at 1M..9M words seen (every 1M), 10M..100M (every 10M) and
100M..1000M (every 100M), named chck_<N>M. The official pipeline reads them as revisions
(branches) of one Hugging Face model repository; `export_milestones` writes that layout as a
local git repository to push to the Hub. transformers ignores `revision=` for a local folder, so
local evaluation reads the per-milestone folders instead.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from lm_pretrain.errors import LmpError
from lm_pretrain.run_folder import (
    BRANCH_FILE,
    CHECKPOINTS_DIR,
    FINAL_DIR,
    STATE_FILE,
    check_outside_run,
    read_json,
)


def _is_training_state(name: str) -> bool:
    """Files of a checkpoint that only resume needs (the rest makes up the model folder)."""
    return name.endswith(".pt") or name == STATE_FILE


def milestone_words() -> list[int]:
    """Words seen at each milestone, ascending, without repeats."""
    million = 1_000_000
    marks = [n * million for n in range(1, 10)]
    marks += [n * 10 * million for n in range(1, 11)]
    marks += [n * 100 * million for n in range(1, 11)]
    return sorted(set(marks))


def milestone_name(words: int) -> str:
    return f"chck_{words // 1_000_000}M"


def _milestones_of(
    run_dir: Path, warn: Callable[[str], None], up_to_step: int | None = None, seen: frozenset = frozenset()
) -> dict[str, tuple[int, Path]]:
    """name -> (words, folder) of a run's milestones, followed through its parents for a branch:
    a parent's milestones count up to the step the branch started from (they are the branch's
    history), the branch's own from there on."""
    if run_dir.resolve() in seen:
        raise LmpError(f"{run_dir / BRANCH_FILE} names a parent that leads back to {run_dir}; restore it")
    seen = seen | {run_dir.resolve()}
    found: dict[str, tuple[int, Path]] = {}
    branch = read_json(run_dir / BRANCH_FILE, "restore it from a copy of the run")
    if branch is not None:
        try:
            parent, parent_step = Path(branch["parent_run"]), int(branch["parent_step"])
        except (KeyError, TypeError, ValueError):
            raise LmpError(f"{run_dir / BRANCH_FILE} is damaged (no parent_run and parent_step)") from None
        parent_step = parent_step if up_to_step is None else min(parent_step, up_to_step)
        if parent.is_dir():
            found.update(_milestones_of(parent, warn, parent_step, seen))
        else:
            warn(
                f"{run_dir} branched from {parent}, which is gone; its milestones up to step "
                f"{parent_step} (this branch's history) are not exported, only the branch's own"
            )
    folder = run_dir / CHECKPOINTS_DIR
    for ckpt in folder.glob("chck_*M") if folder.is_dir() else []:
        state = read_json(ckpt / STATE_FILE, "delete that milestone or restore it from a copy")
        if state is None:
            continue  # not complete: its trainer_state.json is written last
        if not isinstance(state.get("step"), int) or not isinstance(state.get("words"), int):
            raise LmpError(f"{ckpt / STATE_FILE} is damaged (no step and words); restore it from a copy")
        if up_to_step is None or state["step"] <= up_to_step:
            found[ckpt.name] = (state["words"], ckpt)
    return found


def export_milestones(
    run_dir: Path, out: Path, git: bool = False, warn: Callable[[str], None] = lambda _: None
) -> list[Path]:
    """One transformers-loadable folder per milestone of `run_dir` under `out` (a branch's include
    its parent's up to the branch point); with `git`, also a repository out/repo with one branch
    per milestone (and main holding the final model)."""
    # a missing run would otherwise be reported as one without milestones
    if not run_dir.exists():
        raise LmpError(f"run folder {run_dir} does not exist; pass a run folder, e.g. runs/<name>")
    if not run_dir.is_dir():
        raise LmpError(f"{run_dir} is a file, not a run folder; pass a run folder, e.g. runs/<name>")
    found = sorted(_milestones_of(run_dir, warn).values())
    if not found and not (run_dir / CHECKPOINTS_DIR).is_dir():
        raise LmpError(
            f"{run_dir} is not a training run (no {CHECKPOINTS_DIR}/); pass the run folder, e.g. runs/<name>"
        )
    if not found:
        raise LmpError(
            f"{run_dir} has no milestone checkpoints (checkpoints/chck_<N>M); they are written "
            "when training passes 1M, 2M, ... words seen"
        )
    check_outside_run(out, "--milestones")
    if out.exists() and not out.is_dir():
        raise LmpError(f"--milestones {out} is a file; pick a folder name")
    if out.exists() and any(out.iterdir()):
        raise LmpError(f"{out} exists and is not empty; choose a new folder for the export")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise LmpError(f"--milestones {out}: a folder in that path is a file") from None
    written = []
    for _, ckpt in found:
        target = out / ckpt.name
        shutil.copytree(ckpt, target, ignore=lambda _d, names: [n for n in names if _is_training_state(n)])
        for item in target.iterdir():
            item.chmod(0o644)  # readable by the team, whatever mode the run's files have
        written.append(target)
    if git:
        _git_repository(run_dir, out / "repo", [p for _, p in found])
    return written


def git_lfs_available() -> bool:
    return shutil.which("git-lfs") is not None


def _git_repository(run_dir: Path, repo: Path, checkpoints: list[Path]) -> None:
    def run(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    if shutil.which("git") is None:
        raise LmpError("--git needs the git command on PATH")
    repo.mkdir(parents=True)
    run("init", "-q", "-b", "main")
    run("config", "user.name", "lmp")
    run("config", "user.email", "lmp@localhost")
    if git_lfs_available():  # the Hub takes large files only through LFS
        run("lfs", "install", "--local")
    branches = [(ckpt.name, ckpt) for ckpt in checkpoints]
    if (run_dir / FINAL_DIR / "config.json").is_file():
        branches.append(("main", run_dir / FINAL_DIR))
    for branch, source in branches:
        run("checkout", "-q", "--orphan", branch)
        for item in repo.iterdir():
            if item.name != ".git":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        for item in source.iterdir():
            if item.is_file() and not _is_training_state(item.name):
                shutil.copyfile(item, repo / item.name)
        (repo / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        run("add", "-A")
        run("commit", "-q", "-m", f"{source.name} of {run_dir.name}")
