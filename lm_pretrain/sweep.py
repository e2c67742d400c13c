"""`lmp sweep`: one run per point of a grid of recipe fields, trained one after another (or as a
SLURM array job), then compared by validation loss.

Each point is the recipe with `--set` overrides, trained into <out>/<point name> (e.g.
runs/demo-sweep/lr-0.002_kind-muon), so a stopped sweep resumes where it was: finished runs are
skipped, a stopped one resumes from its checkpoint. Every point is validated before anything trains.
"""

from __future__ import annotations

import itertools
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lm_pretrain.errors import LmpError, check_writable
from lm_pretrain.recipe import Recipe, load_recipe
from lm_pretrain.run_folder import METRICS_FILE, is_run_folder
from lm_pretrain.runs import Run

SWEEP_PLOT, SWEEP_SCRIPT = "sweep.png", "sweep.sbatch"


@dataclass(frozen=True)
class Point:
    name: str  # the run folder's name: the grid's field names (last part) and values
    overrides: tuple[str, ...]  # key=value, as --set takes them


def parse_grid(grids: list[str]) -> list[tuple[str, list[str]]]:
    """`key=v1,v2,...` options as (key, values); LmpError for a malformed or repeated one."""
    parsed: dict[str, list[str]] = {}
    for text in grids:
        key, sep, values = text.partition("=")
        key = key.strip()
        chosen = [v.strip() for v in _top_level_items(values) if v.strip()]
        if not sep or not key or not chosen:
            raise LmpError(
                f"--grid {text!r}: expected key.path=value1,value2,..., e.g. --grid optim.lr=1e-3,2e-3"
            )
        if key in parsed:
            raise LmpError(f"--grid {key} is given twice; list all its values in one --grid")
        if len(set(chosen)) != len(chosen):
            raise LmpError(f"--grid {key}: a value is listed twice ({', '.join(chosen)})")
        parsed[key] = chosen
    if not parsed:
        raise LmpError("lmp sweep needs at least one --grid key.path=value1,value2")
    return list(parsed.items())


def _top_level_items(values: str) -> list[str]:
    """`a,[b,c],{d: e}` -> ["a", "[b,c]", "{d: e}"]: commas inside brackets belong to a value,
    so list-valued fields (optim.betas=[0.9,0.95],[0.9,0.99]) can be swept."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(values):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            items.append(values[start:i])
            start = i + 1
    return [*items, values[start:]]


def _label(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "x"


def grid_points(grid: list[tuple[str, list[str]]]) -> list[Point]:
    """Every combination of the grid's values, in the order given (the last key varies fastest)."""
    keys = [key for key, _ in grid]
    short = [key.rsplit(".", 1)[-1] for key in keys]
    if len(set(short)) != len(short):
        short = [key.replace(".", "-") for key in keys]  # e.g. optim.lr and optim.muon.lr
    points = []
    for values in itertools.product(*(values for _, values in grid)):
        name = "_".join(f"{s}-{_label(v)}" for s, v in zip(short, values, strict=True))
        points.append(Point(name, tuple(f"{k}={v}" for k, v in zip(keys, values, strict=True))))
    return points


def plan_sweep(
    recipe_path: Path, sets: list[str], grid: list[tuple[str, list[str]]], out: Path | None
) -> tuple[Path, list[tuple[Point, Recipe, Path]]]:
    """The sweep folder and, per point, its validated recipe and run folder. Any point the
    schema refuses stops the sweep here, before anything trains."""
    base = load_recipe(recipe_path, sets)
    folder = out or Path("runs") / f"{base.name}-sweep"
    plan = []
    for point in grid_points(grid):
        try:
            recipe = load_recipe(recipe_path, [*sets, *point.overrides, f"name={base.name}-{point.name}"])
        except LmpError as exc:
            raise LmpError(f"sweep point {point.name}: {exc}") from None
        plan.append((point, recipe, folder / point.name))
    _check_sweep_folder(folder)
    return folder, plan


def _check_sweep_folder(folder: Path) -> None:
    """A sweep writes only into a new folder or an earlier sweep's (which it continues)."""
    if is_run_folder(folder):
        raise LmpError(f"--out {folder} is a training run; give the sweep a folder of its own")
    entries = list(folder.iterdir()) if folder.is_dir() else []
    earlier = any(p.name in (SWEEP_PLOT, SWEEP_SCRIPT) or (p.is_dir() and is_run_folder(p)) for p in entries)
    if entries and not earlier:
        raise LmpError(
            f"--out {folder} is not empty and holds no lmp sweep; give a new folder so nothing in it "
            "is overwritten"
        )


def sort_by_validation(runs: list[Run]) -> list[Run]:
    """Best first: by the lowest validation loss each run reached; runs without one last."""
    from lm_pretrain.runs import best_val_loss

    def key(run: Run) -> tuple[bool, float]:
        best = best_val_loss(run)
        return (best is None, best[0] if best else 0.0)

    return sorted(runs, key=key)


def slurm_script(recipe_path: Path, sets: list[str], plan: list[tuple[Point, Recipe, Path]]) -> str:
    """An sbatch array job, one task per point, each through scripts/slurm/launch.sh (so each
    point saves and requeues on its time limit like any lmp SLURM run)."""
    header = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train.sbatch"
    sbatch = [line for line in header.read_text().splitlines() if line.startswith("#SBATCH")]
    sbatch = [line.replace("--job-name=lmp-train", "--job-name=lmp-sweep") for line in sbatch]
    sbatch.append(f"#SBATCH --array=0-{len(plan) - 1}")
    cases = []
    for i, (point, _, run_dir) in enumerate(plan):
        args = [arg for item in (*sets, *point.overrides) for arg in ("--set", item)]
        args += ["--out", str(run_dir)]
        cases.append(f"  {i}) args=({shlex.join(args)}) ;;")
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# lmp sweep: {len(plan)} runs of {recipe_path}, one array task each. Submit from the repository root:",
            "#   sbatch <this file>",
            *sbatch,
            "set -euo pipefail",
            'case "${SLURM_ARRAY_TASK_ID:?not a SLURM array task}" in',
            *cases,
            '  *) echo "no sweep point ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;',
            "esac",
            f'exec "${{SLURM_SUBMIT_DIR:-.}}/scripts/slurm/launch.sh" {shlex.quote(str(recipe_path))} "${{args[@]}}"',
            "",
        ]
    )


def run_sweep(
    recipe: Path, grid: list[str], sets: list[str], out: Path | None, slurm: bool, console: Console
) -> None:
    """lmp sweep: validate every point, then write the SLURM array job or train the points here
    (exit 75 when a signal stopped one: the same command resumes), then the table and plot."""
    from lm_pretrain.plot import plot_runs
    from lm_pretrain.runs import load_run, runs_table
    from lm_pretrain.train.signals import EXIT_STOPPED
    from lm_pretrain.train.trainer import train

    folder, plan = plan_sweep(recipe, sets, parse_grid(grid), out)
    check_writable(folder, "--out")
    if slurm:
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / SWEEP_SCRIPT
        script.write_text(slurm_script(recipe, sets, plan))
        console.print(
            f"wrote {script} ({len(plan)} array tasks); submit it with: sbatch {script}", highlight=False
        )
        return
    began = time.perf_counter()
    failed = []
    for i, (point, loaded, run_dir) in enumerate(plan, start=1):
        console.rule(f"sweep {i}/{len(plan)}: {point.name}")
        try:
            result = train(loaded, run_dir, console=console)
        except LmpError as exc:
            if not (run_dir / METRICS_FILE).is_file():
                raise  # it failed before training (data, paths): every point would
            # it failed while training (e.g. diverged at a high lr): the other points still run
            console.print(f"[red]{point.name} failed:[/] {escape(str(exc))}", highlight=False)
            failed.append(point.name)
            continue
        if result.stopped_by_signal:
            console.print(
                f"sweep stopped in {point.name}; run the same command to resume it", highlight=False
            )
            sys.exit(EXIT_STOPPED)
        if result.already_finished:
            console.print(f"{point.name} already trained; skipped", highlight=False)
    found = sort_by_validation([load_run(run_dir) for _, _, run_dir in plan])
    console.print(runs_table(found, root=folder))
    plot_runs([run.path for run in found], folder / SWEEP_PLOT, warn=lambda m: None)
    minutes = (time.perf_counter() - began) / 60
    console.print(
        f"best: {found[0].name} | plot: {folder / 'sweep.png'} | {minutes:.1f} min", highlight=False
    )
    if failed:
        raise LmpError(
            f"{len(failed)} of {len(plan)} sweep points failed ({', '.join(failed)}); their messages are above"
        )
