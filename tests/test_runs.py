"""`lmp runs` and `lmp plot` on synthetic run folders: table content and the plotted data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from lm_pretrain.cli import app
from lm_pretrain.model.decoder import Decoder, DecoderConfig
from lm_pretrain.plot import curves, plot_runs, write_run_plot
from lm_pretrain.recipe import ModelConfig
from lm_pretrain.runs import find_runs, load_run, read_metrics, run_row, runs_table

MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 16, "tie_embeddings": True}
VOCAB = 300


def loss_at(step: int, seed: float = 0.0) -> float:
    return 3.0 + 5.0 / math.sqrt(1 + step) + seed + 0.05 * (-1) ** (step // 10)


def make_run(
    root: Path,
    name: str,
    steps: range,
    state: str | None = "finished",
    pid: int | None = None,
    seed: float = 0.0,
    words: bool = False,
    evals: dict[str, float] | None = None,
    branch: dict | None = None,
    extra_lines: str = "",
) -> Path:
    """A run folder as the trainer writes it, with losses that follow loss_at()."""
    run = root / name
    run.mkdir(parents=True)
    recipe = {"name": f"recipe-{name}", "model": MODEL, "tokenizer": {"vocab_size": VOCAB}}
    recipe["train"] = {"max_steps": 200, "batch_size": 4}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    lines = []
    if steps.start == 0:
        lines.append({"step": 0, "tokens": 0, "val_loss": 9.0})
    for step in steps:
        if step == 0:
            continue
        record = {"step": step, "tokens": step * 64, "loss": loss_at(step, seed), "lr": 1e-3 * step / 200}
        if words:
            record["words"] = step * 50
        if step % 50 == 0:
            record["val_loss"] = loss_at(step, seed) + 0.2
        lines.append(record)
    if evals:
        lines.append({"step": lines[-1]["step"], **{f"eval/{k}": v for k, v in evals.items()}})
    text = "".join(json.dumps(r) + "\n" for r in lines) + extra_lines
    (run / "metrics.jsonl").write_text(text)
    if state is not None:
        (run / "status.json").write_text(json.dumps({"state": state, "pid": pid or 1, "updated": 0}))
    if branch is not None:
        (run / "branch.json").write_text(json.dumps(branch))
    return run


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    make_run(root, "main", range(0, 201, 10), words=True, evals={"blimp": 61.04, "ewok": 52.0})
    make_run(
        root,
        "crashed",
        range(0, 121, 10),
        state="running",
        pid=dead_pid(),
        seed=0.3,
        extra_lines='{"step": 13',
    )
    make_run(root, "live", range(0, 61, 10), state="running", pid=os.getpid(), seed=0.5)
    make_run(root, "stopped", range(0, 81, 10), state="stopped", seed=0.4)
    make_run(
        root,
        "main-decay-100",
        range(110, 151, 10),
        seed=-0.2,
        branch={"parent_run": str(root / "main"), "parent_step": 100, "checkpoint": "x", "decay_steps": 50},
    )
    return root


def render(table) -> str:
    console = Console(width=250, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text()


def row_of(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.split("│")[0].strip() == name)


def test_read_metrics_skips_truncated_last_line_and_resumed_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": float(s)} for s in (10, 20, 30)]
    records += [{"step": s, "loss": s + 0.5} for s in (20, 30, 40)]  # resumed from step 10
    records += [{"step": 40, "eval/blimp": 0.5}]  # scores logged after the step's line
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 50, "lo')
    got, warnings = read_metrics(path)
    assert [r["step"] for r in got] == [10, 20, 30, 40]
    assert [r["loss"] for r in got] == [10.0, 20.5, 30.5, 40.5]
    assert got[-1]["eval/blimp"] == 0.5
    assert len(warnings) == 1 and "last line" in warnings[0]


def test_table_content(runs_dir):
    found = find_runs([runs_dir])
    assert sorted(p.name for p in found) == ["crashed", "live", "main", "main-decay-100", "stopped"]
    text = render(runs_table([load_run(p) for p in found], root=runs_dir))

    main = row_of(text, "main")
    expected_params = Decoder(
        DecoderConfig.from_recipe(ModelConfig(**MODEL), VOCAB, None, None, None)
    ).num_parameters()
    assert f"{expected_params / 1e3:.2f}k" in main
    best = min(loss_at(s) + 0.2 for s in range(50, 201, 50))
    assert f"{best:.4f} @{min(range(50, 201, 50), key=loss_at)}" in main
    assert f"{loss_at(200):.4f}" in main
    assert "blimp 61.0%" in main and "ewok 52.0%" in main
    assert "12.80k" in main and "10.00k" in main  # tokens 200*64, words 200*50
    assert "recipe-main" in main and "finished" in main and "200" in main

    crashed = row_of(text, "crashed")
    assert "died" in crashed and "120/200" in crashed and f"{loss_at(120, 0.3):.4f}" in crashed
    assert "running" in row_of(text, "live")
    assert "stopped" in row_of(text, "stopped")
    branch = row_of(text, "main-decay-100")
    assert "main @100" in branch and "150/150" not in branch and "150" in branch


def test_runs_cli_json_and_warning(runs_dir):
    result = CliRunner().invoke(app, ["runs", str(runs_dir), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows["crashed"]["state"] == "died" and rows["crashed"]["steps"] == 120
    assert rows["main-decay-100"]["parent_step"] == 100
    assert "skipped last line" in result.stderr


def test_plot_series_and_branch_start(runs_dir, tmp_path):
    out = tmp_path / "cmp.png"
    fig = plot_runs([runs_dir / "main", runs_dir / "main-decay-100", runs_dir / "crashed"], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = {(c.metric, c.run.split(" ")[0]): c for c in curves(fig)}
    assert {m for m, _ in drawn} == {"loss", "val_loss", "lr", "eval/blimp", "eval/ewok"}

    main_loss = drawn["loss", "main"]
    assert main_loss.x == list(range(10, 201, 10))
    assert main_loss.y == pytest.approx([loss_at(s) for s in range(10, 201, 10)])
    # the branch starts at its parent's step, from the parent's value there
    branch = drawn["loss", "main-decay-100"]
    assert branch.x == [100, 110, 120, 130, 140, 150]
    assert branch.y[0] == pytest.approx(loss_at(100))
    assert branch.y[1:] == pytest.approx([loss_at(s, -0.2) for s in range(110, 151, 10)])
    assert "from main @100" in branch.run
    assert drawn["val_loss", "crashed"].x == [0, 50, 100]
    assert "[died]" in drawn["val_loss", "crashed"].run


def test_plot_x_axis_smoothing_and_restarted_branch(runs_dir, tmp_path):
    fig = plot_runs([runs_dir / "main"], None, x="words", metrics=["loss"], smooth=0.8)
    (loss,) = [c for c in curves(fig) if c.metric == "loss"]
    assert loss.x == [s * 50 for s in range(10, 201, 10)]
    raw = [loss_at(s) for s in range(10, 201, 10)]
    zigzag = sum(abs(a - b) for a, b in zip(raw, raw[1:], strict=False))
    assert sum(abs(a - b) for a, b in zip(loss.y, loss.y[1:], strict=False)) < zigzag / 2
    assert loss.y[0] == pytest.approx(raw[0])  # bias-corrected: no pull towards 0

    # a branch whose own step count restarted at 0 is shifted to the branch point
    make_run(
        runs_dir,
        "restarted",
        range(10, 31, 10),
        branch={"parent_run": str(runs_dir / "main"), "parent_step": 100, "checkpoint": "x"},
    )
    fig = plot_runs([runs_dir / "restarted"], None, x="tokens", metrics=["loss"])
    (loss,) = curves(fig)
    assert loss.x == [100 * 64 + s * 64 for s in (0, 10, 20, 30)]


def test_plot_errors_name_the_fix(runs_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["plot", str(runs_dir / "live"), "--out", str(tmp_path / "a.png"), "--x", "words"]
    )
    assert result.exit_code == 2 and "--x steps" in result.stderr
    result = runner.invoke(
        app, ["plot", str(runs_dir / "live"), "--metrics", "nope", "--out", str(tmp_path / "a.png")]
    )
    assert result.exit_code == 2 and "logged metrics" in result.stderr and "val_loss" in result.stderr
    result = runner.invoke(app, ["plot", str(runs_dir / "live"), "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 0 and (tmp_path / "a.png").stat().st_size > 1000
    result = runner.invoke(app, ["plot", str(runs_dir), "--out", str(tmp_path / "b.png")])
    assert result.exit_code == 2 and "is a folder of runs; pass run folders" in result.stderr


def test_write_run_plot_never_raises(runs_dir, tmp_path):
    png = write_run_plot(runs_dir / "main-decay-100")
    assert png == runs_dir / "main-decay-100" / "progress.png" and png.is_file()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "metrics.jsonl").write_text('{"step": 0, "val_loss": NaN}\n[1, 2]\n{"ste')
    (odd / "status.json").write_text("{not json")
    assert not write_run_plot(odd).exists()
    assert not write_run_plot(tmp_path / "missing").exists()
    assert run_row(load_run(odd))["state"] == "unknown"


def test_planned_steps_follow_the_trainer_also_for_a_words_seen_bound(tmp_path):
    import yaml

    from conftest import ROOT
    from lm_pretrain.recipe import load_recipe
    from lm_pretrain.runs import Run, planned_steps
    from lm_pretrain.train.schedule import total_steps

    recipe = load_recipe(ROOT / "recipes/demo.yaml", ["train.max_steps=null", "train.max_words_seen=1000000"])
    raw = yaml.safe_load(recipe.to_yaml())
    # 16 x 256 tokens a step at 0.8 words per token: the trainer's ceil(1e6 / 3276.8) = 306 steps
    run = Run(path=tmp_path, recipe=raw, records=[{"step": 10, "tokens": 40960, "words": 32768}])
    assert planned_steps(run) == total_steps(recipe, 0.8) == 306
    assert planned_steps(Run(path=tmp_path, recipe=raw)) is None  # no words counted yet
