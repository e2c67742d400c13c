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
    cmd += ["--out", str(tmp_path / "levers"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for arm in ("adamw", "muon", "adamw+seq_len_schedule"):
        assert (tmp_path / "levers" / f"{arm}-x1" / "lr-2e-3" / "summary.json").is_file(), arm
    arms = [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("x1 ")]
    assert arms == ["x1 adamw", "x1 muon", "x1 adamw+seq_len_schedule"], done.stdout
    assert "each arm at its best LR" in done.stdout


@pytest.mark.slow
def test_bench_levers_hybrid_arms_compare_random_and_hard_masking(bible_corpus, tmp_path):
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 4)[1:]
    cmd = [sys.executable, str(ROOT / "scripts/bench_levers.py"), "--steps", "3", "--lrs", "2e-3",
           "--budgets", "1", "--arms", "muon+hybrid,muon+hybrid+hard", "--out", str(tmp_path / "levers"), *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    arms = [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("x1 ")]
    assert arms == ["x1 muon+hybrid", "x1 muon+hybrid+hard"], done.stdout
    recipes = {arm: (tmp_path / "levers" / f"{arm}-x1" / "lr-2e-3" / "recipe.yaml").read_text() for arm in ("muon+hybrid", "muon+hybrid+hard")}  # fmt: skip
    assert "masking: hard" in recipes["muon+hybrid+hard"] and "masking: random" in recipes["muon+hybrid"]
    metrics = (tmp_path / "levers" / "muon+hybrid+hard-x1" / "lr-2e-3" / "metrics.jsonl").read_text()
    assert "val_mntp_loss" in metrics and "hard_mask_top10" in metrics
