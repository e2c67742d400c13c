"""train.seq_len_schedule: shorter sequences first with the tokens of every step kept, batches a
pure function of the step, and resume exact inside a stage and across a stage change."""

import json
import signal

import numpy as np
import pytest
import torch
from rich.console import Console

from conftest import ROOT, tiny_run_args
from lm_pretrain.data.loader import PackedWindows, TrainBatches, length_at, seq_len_stages
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import load_recipe
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.trainer import train


def test_schedules_that_cannot_keep_the_tokens_per_step_are_refused():
    for bad, named in [
        ("[[0.5, 100], [1.0, 256]]", "must divide train.seq_len 256"),
        ("[[0.5, 64], [0.9, 256]]", "rise from above 0 to 1.0"),
        ("[[0.6, 64], [0.5, 128], [1.0, 256]]", "rise from above 0 to 1.0"),
    ]:
        with pytest.raises(LmpError, match=named):
            load_recipe(ROOT / "recipes/demo.yaml", [f"train.seq_len_schedule={bad}"])
    stages = seq_len_stages([(0.6, 128), (0.8, 256), (1.0, 512)], 100)
    assert stages == [(60, 128), (80, 256), (100, 512)]
    assert [length_at(stages, s) for s in (0, 59, 60, 79, 80, 99, 150)] == [128, 128, 256, 256, 512, 512, 512]


def batches(start_step: int, rank: int = 0, world: int = 1) -> list[tuple[int, torch.Tensor]]:
    tokens = np.random.default_rng(0).integers(3, 200, size=20_000).astype(np.uint16)
    stages = seq_len_stages([(0.5, 16), (1.0, 64)], 8)
    windows = {length: (PackedWindows(tokens, length, 0, 1), None) for length in (16, 64)}
    layout = TrainBatches(
        windows[64][0], micro=4 // world, accum=2, batch_size=8, rank=rank, seq_len=64,
        start=(start_step, start_step * 8, start_step * 8 * 64), last_step=8, main_steps=8,
        stages=stages, stage_windows=windows,
    )  # fmt: skip
    return [(start_step + i // 2, inputs) for i, (inputs, _) in enumerate(layout)]


def test_each_step_keeps_its_tokens_and_is_a_function_of_the_step_alone():
    steps = batches(0)
    shapes = [tuple(inputs.shape) for _, inputs in steps]
    assert shapes == [(16, 16)] * 8 + [(4, 64)] * 8  # 2 micro-batches a step, 512 tokens each
    resumed = batches(3)  # from a checkpoint at step 3, and from one across the stage change
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(steps[6:], resumed, strict=True))
    two_ranks = [batches(0, rank, 2) for rank in (0, 1)]  # each process takes its half of a step
    for i in range(0, len(steps), 2):
        step = torch.cat(
            [two_ranks[0][i][1], two_ranks[0][i + 1][1], two_ranks[1][i][1], two_ranks[1][i + 1][1]]
        )
        assert torch.equal(step, torch.cat([steps[i][1], steps[i + 1][1]]))


class StopAt(Callback):
    """Sends the run the stop it gets from SLURM, at one step: it saves and ends there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_update(self, t, loss, finite):
        if t.state.step + 1 == self.step:
            t.stop.signum = signal.SIGTERM


def run(corpus, tmp_path, name: str, callbacks=()):
    sets = {
        "train.seq_len_schedule": "[[0.5, 16], [1.0, 64]]", "train.log_every": 1,
        "schedule.kind": "constant", "checkpoint.every": 100, "objective": "hybrid",
    }  # fmt: skip
    args = tiny_run_args(corpus, tmp_path / "cache", 8, **sets)
    recipe = load_recipe(args[0], [a for a in args[1:] if a != "--set"])
    result = train(recipe, tmp_path / name, Console(quiet=True), callbacks=list(callbacks))
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return result, {r["step"]: (r["loss"], r["seq_len"], r["tokens"]) for r in records if "loss" in r}


@pytest.mark.slow
def test_resume_is_exact_inside_a_stage_and_across_a_stage_change(bible_corpus, tmp_path):
    _, straight = run(bible_corpus, tmp_path, "straight")
    assert [straight[s][1] for s in range(1, 9)] == [16] * 4 + [64] * 4
    assert [straight[s][2] for s in range(1, 9)] == [s * 16 * 64 for s in range(1, 9)]  # tokens per step kept
    for stop in (3, 6):  # before the change at step 4 (the resume crosses it), and inside stage 2
        name = f"stopped-at-{stop}"
        first, _ = run(bible_corpus, tmp_path, name, [StopAt(stop)])
        assert first.stopped_by_signal and first.steps == stop
        _, resumed = run(bible_corpus, tmp_path, name)
        assert resumed == straight, (stop, resumed, straight)


def test_lmp_schedule_shows_where_each_length_starts():
    from lm_pretrain.train.lr_plot import describe_schedule

    recipe = load_recipe(
        ROOT / "recipes/demo.yaml", ["train.seq_len_schedule=[[0.6, 64], [0.8, 128], [1.0, 256]]"]
    )
    console = Console(record=True, width=120)
    console.print(describe_schedule(recipe))
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in console.export_text().splitlines()
        if line.count("│") == 5
    }
    assert rows["sequence length 64"] == "0" and rows["sequence length 128"] == "360"
    assert rows["sequence length 256"] == "480" and rows["last step"] == "599"
