"""Two processes on CPU (gloo) train the same model as one, and resume across process counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_args

SETS = {"train.precision": "fp32", "train.log_every": 1, "schedule.kind": "constant", "checkpoint.every": 4}


def train(corpus: Path, cache: Path, out: Path, steps: int, nproc: int, **extra: object) -> str:
    args = tiny_run_args(corpus, cache, steps, **SETS, **extra)
    cmd = [sys.executable, "-m", "lm_pretrain.cli", "train", *args]
    cmd += ["--out", str(out), "--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across_counts(bible_corpus, tmp_path):
    cache = tmp_path / "cache"
    train(bible_corpus, cache, tmp_path / "one", 12, nproc=1)
    output = train(bible_corpus, cache, tmp_path / "two", 12, nproc=2)
    assert output.count("tokens: train") == 1  # the data report once, not once per process
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


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes_across_modes_and_counts(bible_corpus, tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    fsdp = {"train.distributed": "fsdp"}
    probe = {"eval": "{tasks: [probe], probe_items: 2, every: 4}"}  # scored on gathered weights
    train(bible_corpus, cache, tmp_path / "ddp", 12, nproc=1)
    train(bible_corpus, cache, tmp_path / "fsdp", 12, nproc=2, **fsdp, **probe)
    ddp, sharded = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert sorted(sharded) == list(range(1, 13))
    assert max(abs(ddp[s] - sharded[s]) / ddp[s] for s in ddp) < 1e-3
    records = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/probe" in r] == [4, 8, 12]
    # the export holds the whole model, as a DDP run's does
    a = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)

    # an FSDP checkpoint resumes as DDP with one process, and a DDP one as FSDP with two
    train(bible_corpus, cache, tmp_path / "f2d", 8, nproc=2, **fsdp)
    train(bible_corpus, cache, tmp_path / "f2d", 12, nproc=1)
    train(bible_corpus, cache, tmp_path / "d2f", 8, nproc=1)
    train(bible_corpus, cache, tmp_path / "d2f", 12, nproc=2, **fsdp)
    for name in ("f2d", "d2f"):
        got = losses(tmp_path / name)
        assert sorted(got) == list(range(1, 13))
        assert max(abs(ddp[s] - got[s]) / ddp[s] for s in ddp) < 1e-3, name


def worker_pid(tag: str, rank: int) -> int | None:
    """The training process of `rank` among those started with LMP_TEST_TAG=tag: the oldest one,
    since its data worker, started later, inherits the same environment."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"LMP_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            found.append(int(proc.name))
    return min(found, default=None)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_ranks_at_one_step(bible_corpus, tmp_path):
    if not Path("/proc/self/environ").is_file():
        pytest.skip("needs /proc to find the worker processes")
    import signal
    import time

    cache, run = tmp_path / "cache", tmp_path / "run"
    train(bible_corpus, cache, tmp_path / "reference", 12, nproc=2)
    cmd = [sys.executable, "-m", "lm_pretrain.cli", "train", *tiny_run_args(bible_corpus, cache, 12, **SETS)]
    cmd += ["--out", str(run), "--nproc", "2"]
    tag = str(os.getpid())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMP_TEST_TAG": tag}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and max(losses(run), default=0) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    os.kill(worker_pid(tag, 1), signal.SIGUSR1)  # only rank 1 gets it, as a node's workers might
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, output
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] < 12
    assert (run / "checkpoints" / f"step-{status['step']}" / "rng-1.pt").is_file()  # every rank's RNG

    train(bible_corpus, cache, run, 12, nproc=2)
    reference = losses(tmp_path / "reference")
    assert losses(run) == reference  # the same processes and data: bit for bit


@pytest.mark.slow
def test_compiled_model_trains_and_saves_with_two_processes(bible_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lm_pretrain.cli", "train"]
    cmd += tiny_run_args(
        bible_corpus, tmp_path / "cache", 6, **{"train.compile": True, "checkpoint.every": 3}
    )
    cmd += ["--out", str(run), "--nproc", "2"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-6"]
    # saved under transformers' names (not the compiled wrapper's), so it loads as is
    AutoModelForCausalLM.from_pretrained(run / "final", local_files_only=True)


def test_user_errors_under_nproc_are_one_line_not_tracebacks(bible_corpus, tmp_path):
    cases = [
        ({"data.path": tmp_path / "missing.jsonl"}, "missing.jsonl does not exist"),  # before launching
        ({"train.batch_size": 15, "train.micro_batch_size": None}, "must be divisible by --nproc 2"),
        ({"eval.tasks": "[blimp]", "eval.data_dir": tmp_path}, "no data for task blimp"),  # in each process
    ]
    for sets, named in cases:
        args = tiny_run_args(bible_corpus, tmp_path / "cache", 4, **SETS, **sets)
        cmd = [
            sys.executable,
            "-m",
            "lm_pretrain.cli",
            "train",
            *args,
            "--out",
            str(tmp_path / "run"),
            "--nproc",
            "2",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode == 2 and named in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
