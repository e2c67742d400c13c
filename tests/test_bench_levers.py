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
    ]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "levers"), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for arm in ("adamw", "muon", "adamw+seq_len_schedule"):
        assert (tmp_path / "levers" / f"{arm}-x1" / "lr-2e-3" / "summary.json").is_file(), arm
    rows = [line for line in done.stdout.splitlines() if "x1 (3 steps)" in line]
    assert [row.split("│")[2].strip() for row in rows] == ["adamw", "muon", "adamw+seq_len_schedule"], (
        done.stdout
    )
