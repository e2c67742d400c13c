"""scripts/bench_levers.py keeps working: a tiny run of every arm prints its table."""

import subprocess
import sys

import pytest

from conftest import ROOT, tiny_run_args


@pytest.mark.slow
def test_bench_levers_tiny(bible_corpus, tmp_path):
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 4)[1:]
    cmd = [
        sys.executable,
        str(ROOT / "scripts/bench_levers.py"),
        "--steps",
        "3",
        "--lrs",
        "2e-3",
        "--budgets",
        "1",
        "--arms",
        "adamw,muon,adamw+seq_len_schedule,muon+hybrid,muon+hybrid+hard",
    ]
    cmd += ["--out", str(tmp_path / "levers"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for arm in ("adamw", "muon", "adamw+seq_len_schedule", "muon+hybrid", "muon+hybrid+hard"):
        assert (tmp_path / "levers" / f"{arm}-x1" / "lr-2e-3" / "summary.json").is_file(), arm
    arms = [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("x1 ")]
    assert arms == [
        "x1 adamw",
        "x1 muon",
        "x1 adamw+seq_len_schedule",
        "x1 muon+hybrid",
        "x1 muon+hybrid+hard",
    ]
    hard = (tmp_path / "levers" / "muon+hybrid+hard-x1" / "lr-2e-3" / "recipe.yaml").read_text()
    assert "masking: hard" in hard
    assert "each arm at its best LR" in done.stdout
