import math
from pathlib import Path

import pytest

from lm_pretrain.recipe import ScheduleConfig
from lm_pretrain.train.schedule import Decay, make_schedule


def curve(total: int, tokens_per_step: int = 1, **kwargs) -> list[float]:
    schedule = make_schedule(ScheduleConfig(**kwargs), total, tokens_per_step)
    return [schedule(s) for s in range(total)]


def test_wsd_stages():
    lrs = curve(100, kind="wsd", warmup=10, decay=0.2, decay_shape="linear", min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(0.1)  # (0+1)/10
    assert lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])  # the stable stage
    assert lrs[99] == pytest.approx(0.1)  # decays to the floor on the last step
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_shapes_midpoint(shape):
    lrs = curve(200, kind="wsd", warmup=0, decay=100, decay_shape=shape)
    mid = lrs[100 + 49]  # progress 0.5 into the decay
    expected = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[shape]
    assert mid == pytest.approx(expected, abs=1e-9)


def test_cosine_and_constant():
    lrs = curve(110, kind="cosine", warmup=10, min_lr_ratio=0.0)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[59] == pytest.approx(0.5, abs=1e-9)  # halfway through the decay
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert set(curve(50, kind="constant", warmup=0)) == {1.0}


def test_infinite_stages():
    lrs = curve(
        200,
        kind="infinite",
        warmup=10,
        cooldown=40,
        constant_lr_ratio=0.3,
        decay=20,
        decay_shape="linear",
        min_lr_ratio=0.0,
    )
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[29] == pytest.approx(0.65)  # halfway down the cosine cooldown
    assert all(v == pytest.approx(0.3) for v in lrs[50:180])  # the constant stage
    assert lrs[189] == pytest.approx(0.15)  # halfway through the anneal
    assert lrs[199] == pytest.approx(0.0)


def test_lengths_in_tokens():
    by_tokens = curve(100, tokens_per_step=1000, kind="wsd", unit="tokens", warmup=5000, decay=20000)
    by_steps = curve(100, kind="wsd", warmup=5, decay=20)
    assert by_tokens == by_steps


def test_no_decay_means_stable_to_the_end_and_beyond():
    for kind in ("wsd", "infinite"):
        schedule = make_schedule(ScheduleConfig(kind=kind, warmup=0, cooldown=0, decay=0), 100, 1)
        level = schedule(50)
        assert schedule(99) == schedule(100) == schedule(150) == level > 0


def test_branch_decay_overrides_from_its_start():
    cfg = ScheduleConfig(kind="constant", warmup=0)
    branch = Decay(start=60, steps=40, start_ratio=1.0, end_ratio=0.0, shape="linear")
    schedule = make_schedule(cfg, 100, 1, branch)
    assert schedule(59) == 1.0
    assert schedule(79) == pytest.approx(0.5)
    assert schedule(99) == pytest.approx(0.0)


def test_stages_longer_than_training_are_refused():
    from pydantic import ValidationError

    from lm_pretrain.errors import LmpError

    with pytest.raises(ValidationError, match="warmup 0.6 \\+ decay 0.5 add up to more than all"):
        ScheduleConfig(kind="wsd", warmup=0.6, decay=0.5)
    ScheduleConfig(kind="constant", warmup=0.6, decay=0.5)  # no decay stage: nothing to clash
    with pytest.raises(LmpError, match="schedule.warmup 50 \\+ schedule.cooldown 40 \\+ schedule.decay 20"):
        make_schedule(ScheduleConfig(kind="infinite", warmup=50, cooldown=40, decay=20), 100, 1)
    make_schedule(ScheduleConfig(kind="infinite", warmup=50, cooldown=30, decay=20), 100, 1)
    with pytest.raises(LmpError, match="exceed the 10 training steps"):
        make_schedule(ScheduleConfig(kind="cosine", warmup=20), 10, 1)


def test_output_paths_are_checked_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from lm_pretrain.cli import app

    recipe = str(Path(__file__).resolve().parents[1] / "recipes/demo.yaml")
    victim = tmp_path / "victim.yaml"
    victim.write_text("keep: me\n")
    cases = [
        (["schedule", recipe, "--png", str(victim)], "ending in .png"),
        (["schedule", recipe, "--png", str(tmp_path)], "is a folder"),
        (["plot", str(tmp_path), "--out", str(tmp_path)], "is a folder"),
        (["plot", str(tmp_path), "--out", str(victim / "x.png")], "a folder in that path is a file"),
        (["bench", "--json", str(tmp_path), "--steps", "1"], "is a folder"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert victim.read_text() == "keep: me\n"
    # a missing folder is made
    result = CliRunner().invoke(app, ["schedule", recipe, "--png", str(tmp_path / "new" / "lr.png")])
    assert result.exit_code == 0 and (tmp_path / "new" / "lr.png").stat().st_size > 1000


def test_a_schedule_in_words_without_its_corpus_says_why_it_is_needed(tmp_path):
    from typer.testing import CliRunner

    from lm_pretrain.cli import app

    recipe = str(Path(__file__).resolve().parents[1] / "recipes/babylm-strict-small.yaml")
    missing = ["--set", f"data.path={tmp_path / 'nowhere'}"]
    result = CliRunner().invoke(app, ["schedule", recipe, *missing])
    assert result.exit_code == 2 and "need the corpus's words per token" in result.output, result.output
    assert "nowhere does not exist" in result.output
    result = CliRunner().invoke(app, ["schedule", recipe, *missing, "--set", "train.max_steps=1000"])
    assert result.exit_code == 0 and "1000 steps" in result.output, result.output
