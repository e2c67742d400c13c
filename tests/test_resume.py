"""Runs that survive: SIGKILL at any point, or SIGTERM, then resume -> the same run, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_run_args

STEPS = 40
EXIT_STOPPED = 75


def train_cmd(corpus: Path, cache: Path, out: Path) -> list[str]:
    extra = {"train.log_every": 1, "checkpoint.every": 5, "checkpoint.keep_last": 3, "train.eval_every": 10}
    args = tiny_run_args(corpus, cache, STEPS, **extra)
    return [sys.executable, "-m", "lm_pretrain.cli", "train", *args, "--out", str(out)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = record["loss"]
    return out


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return -1
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=-1)


def start(cmd: list[str]) -> subprocess.Popen:
    # its own process group: a signal can go to the trainer and its data worker at once, as SLURM's do
    return subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def wait_until(proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()}"
        assert time.time() < deadline, "timed out waiting for training to progress"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(bible_corpus, tmp_path_factory) -> tuple[Path, Path, dict[int, float]]:
    root = tmp_path_factory.mktemp("resume")
    cache = root / "cache"
    run = root / "reference"
    subprocess.run(train_cmd(bible_corpus, cache, run), env=env(), check=True, capture_output=True)
    ref = losses(run)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return root, cache, ref


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise_identical(bible_corpus, reference):
    root, cache, ref = reference
    run = root / "killed"
    cmd = train_cmd(bible_corpus, cache, run)
    rng = random.Random()
    kills = []
    # 1) mid-way between checkpoints, at a random step
    target = rng.randint(6, 18)
    proc = start(cmd)
    wait_until(proc, lambda: last_step(run) >= target)
    proc.kill()
    proc.wait()
    kills.append(f"after step {last_step(run)}")
    # 2) during a checkpoint save: the moment its temporary folder appears
    proc = start(cmd)
    ckpts = run / "checkpoints"
    wait_until(proc, lambda: ckpts.is_dir() and any(p.name.startswith(".tmp-step-") for p in ckpts.iterdir()))
    proc.kill()
    proc.wait()
    kills.append("during a save")
    # 3) at a random moment
    proc = start(cmd)
    time.sleep(rng.uniform(0.5, 6.0))
    proc.kill()
    proc.wait()
    kills.append("at a random time")
    # then let it finish
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    got = losses(run)
    assert got == ref, f"kills: {kills}; first difference at step " + str(
        min(s for s in ref if got.get(s) != ref[s])
    )
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_stop_signal_saves_and_exits_75_then_resumes(bible_corpus, reference, signum):
    root, cache, ref = reference
    run = root / f"signal-{signum}"
    cmd = train_cmd(bible_corpus, cache, run)
    proc = start(cmd)
    wait_until(proc, lambda: last_step(run) >= 12)
    os.killpg(proc.pid, signum)  # the whole job, data worker included
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_STOPPED, output
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped"
    stopped_at = status["step"]
    assert stopped_at < STEPS
    # the step it stopped at was checkpointed, whatever checkpoint.every says
    assert (run / "checkpoints" / f"step-{stopped_at}" / "trainer_state.json").is_file()
    assert not (run / "final").exists()
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming from {run / 'checkpoints' / f'step-{stopped_at}'}" in done.stdout.replace("\n", "")
    assert losses(run) == ref


# a write that fails as on a full disk; the rest of training is real
FAILING_WRITE = """
import sys, torch
real_save, calls = torch.save, []
def save(obj, path, *args, **kwargs):
    calls.append(path)
    if len(calls) > {ok_writes}:
        raise {error}
    return real_save(obj, path, *args, **kwargs)
torch.save = save
from lm_pretrain.cli import app
app(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("error", "expect"),
    [
        # disk full while saving step 10 (step 5's files written): named, with what survives
        ('OSError(28, "No space left on device")', "could not write checkpoint"),
        # any unexpected error: the traceback, then exit; the data worker must not keep us alive
        ('ValueError("unexpected")', "ValueError: unexpected"),
    ],
)
def test_failures_while_training_exit_promptly_and_keep_checkpoints(bible_corpus, reference, error, expect):
    root, cache, _ = reference
    run = root / f"failing-{expect.split()[0]}"
    cmd = train_cmd(bible_corpus, cache, run)
    ok_writes = 2  # optimizer.pt and rng-0.pt of step 5 (the model goes through safetensors)
    cmd[1:3] = ["-c", FAILING_WRITE.format(ok_writes=ok_writes, error=error)]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert expect in result.stdout + result.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    complete = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert complete == ["step-5"]


@pytest.mark.slow
def test_a_second_trainer_into_a_running_folder_is_refused(bible_corpus, reference):
    root, cache, _ = reference
    run = root / "busy"
    cmd = train_cmd(bible_corpus, cache, run)
    cmd[cmd.index("train.max_steps=40")] = "train.max_steps=100000"  # still running when we look
    first = start(cmd)
    wait_until(first, lambda: (run / "checkpoints" / "step-5" / "trainer_state.json").is_file())
    second = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    assert second.returncode == 2 and "is in use by another lmp train (pid" in second.stderr
    assert first.poll() is None
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(timeout=120) == EXIT_STOPPED
    steps = sorted(losses(run))  # no step logged twice
    assert steps == list(range(1, steps[-1] + 1))  # the first run's log is whole
