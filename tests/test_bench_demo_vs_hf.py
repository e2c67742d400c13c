"""scripts/bench_demo_vs_hf.py keeps working: lmp and the HF Trainer train the same tiny model."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_run_args


@pytest.mark.slow
def test_demo_vs_hf_tiny(bible_corpus, tmp_path):
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 6, **{"train.eval_every": 3})[1:]
    cmd = [
        sys.executable,
        str(ROOT / "scripts/bench_demo_vs_hf.py"),
        "--arms",
        "lmp,hf",
        "--out",
        str(tmp_path / "o"),
    ]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "o" / "demo_vs_hf.json").read_text())
    assert list(rows) == ["lmp (eager)", "HF Trainer (eager)"]
    # the same model, data and schedule: after 6 steps the held-out losses are close, and both learned
    first = json.loads((tmp_path / "o" / "lmp" / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    losses = [r["val_loss"] for r in rows.values()]
    assert all(loss < first for loss in losses) and abs(losses[0] - losses[1]) < 0.1, (first, losses)
