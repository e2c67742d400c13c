"""Two processes on CPU (gloo) train the same model as one, and resume across process counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_run_args

SETS = {"train.precision": "fp32", "train.log_every": 1, "schedule.kind": "constant", "checkpoint.every": 4}


def train(corpus: Path, cache: Path, out: Path, steps: int, nproc: int) -> None:
    cmd = [sys.executable, "-m", "lm_pretrain.cli", "train", *tiny_run_args(corpus, cache, steps, **SETS)]
    cmd += ["--out", str(out), "--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across_counts(bible_corpus, tmp_path):
    cache = tmp_path / "cache"
    train(bible_corpus, cache, tmp_path / "one", 12, nproc=1)
    train(bible_corpus, cache, tmp_path / "two", 12, nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 13))
    worst = max(abs(one[s] - two[s]) / one[s] for s in one)
    assert worst < 1e-3, worst
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-12" / "trainer_state.json").read_text())
    assert state["samples"] == 12 * 16

    # saved by 2 processes at step 8, resumed by 1 (and the reverse): the global data order holds
    train(bible_corpus, cache, tmp_path / "2to1", 8, nproc=2)
    train(bible_corpus, cache, tmp_path / "2to1", 12, nproc=1)
    train(bible_corpus, cache, tmp_path / "1to2", 8, nproc=1)
    train(bible_corpus, cache, tmp_path / "1to2", 12, nproc=2)
    for name in ("2to1", "1to2"):
        got = losses(tmp_path / name)
        assert sorted(got) == list(range(1, 13))
        assert max(abs(one[s] - got[s]) / one[s] for s in one) < 1e-3
