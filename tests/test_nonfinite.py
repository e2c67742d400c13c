"""A non-finite loss skips the update (up to train.skip_nonfinite times) or stops with a message."""

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_run_args
from lm_pretrain.cli import app
from lm_pretrain.model.decoder import Decoder


def poison_step(monkeypatch, bad_calls: set[int]) -> None:
    """Make the training loss NaN on the given forward calls (counting training calls only)."""
    original = Decoder.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(Decoder, "forward", forward)


def run(args: list[str]):
    return CliRunner().invoke(app, ["train", *args])


def all_finite(folder) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


def test_skip_then_finish(monkeypatch, bible_corpus, tmp_path):
    poison_step(monkeypatch, {7})  # micro-batch 7 = the 4th step's first half (2 micro-batches a step)
    out = tmp_path / "run"
    extra = {"train.skip_nonfinite": 1, "train.log_every": 1, "checkpoint.every": 5}
    result = run([*tiny_run_args(bible_corpus, tmp_path / "cache", 10, **extra), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "step 4: non-finite loss or gradients, update skipped" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    assert all(all_finite(p) for p in (out / "checkpoints").iterdir())
    assert all_finite(out / "final")


def test_stop_with_message_and_finite_checkpoints(monkeypatch, bible_corpus, tmp_path):
    poison_step(monkeypatch, {15})  # step 8
    out = tmp_path / "run"
    extra = {"checkpoint.every": 5, "checkpoint.keep_last": 5}
    result = run([*tiny_run_args(bible_corpus, tmp_path / "cache", 10, **extra), "--out", str(out)])
    assert result.exit_code == 2
    assert "non-finite loss or gradients at step 8" in result.output
    assert "train.skip_nonfinite" in result.output
    saved = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in saved] == ["step-5"]
    assert all_finite(saved[0])
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
