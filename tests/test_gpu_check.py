"""scripts/gpu_check.py stays runnable: its steps at toy sizes on CPU (the GPU run is the same code)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_and_writes_its_report(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["steps"]) == ["cuda tests", "bench (toy)", "train (toy)", "resume from the middle"]
    assert all(step["ok"] for step in report["steps"].values())
    assert report["steps"]["resume from the middle"]["compared_steps"] == 4
    assert "| resume from the middle | yes |" in (tmp_path / "gpu_check.md").read_text()
