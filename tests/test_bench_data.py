"""scripts/bench_data.py keeps working: teachers, distilled students, an upsampled run, the table."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_run_args


@pytest.mark.slow
def test_bench_data_tiny(tmp_path):
    # two sources (bible, dialogue) so there is one to upsample and per-source losses to show
    from lm_pretrain.data.builtin import demo_documents

    docs = [d for d in demo_documents() if d.source == "bible_bbe"][:120]
    docs += [d for d in demo_documents() if d.source == "dialogue"][:600]
    corpus = tmp_path / "two.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.text, "source": d.source}) + "\n" for d in docs))
    args = tiny_run_args(corpus, tmp_path / "cache", 4)[1:]
    cmd = [sys.executable, str(ROOT / "scripts/bench_data.py"), "--steps", "4", "--teachers", "2",
           "--upsample", "dialogue", "--out", str(tmp_path / "o"), *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "o" / "data_levers.json").read_text())
    assert len(rows) == 7 and all(r["val_loss"] > 0 for r in rows.values())
    assert set(rows["student, no distillation"]) - {"val_loss", "seconds"}  # per-source losses
    # distillation changed the student; the ensemble is scored
    assert rows["student <- 2 teachers"]["val_loss"] != rows["student, no distillation"]["val_loss"]
