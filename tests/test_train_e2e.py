"""End to end: a tiny model trained on real English, exported, loaded by transformers, resumed."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, tiny_run_args
from lm_pretrain.cli import app


def run_cli(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.mark.slow
def test_train_export_generate_resume(bible_corpus, tmp_path):
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    run_cli(["train", *tiny_run_args(bible_corpus, cache, 60), "--out", str(run)])

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 4  # before training, then at steps 20, 40, 60
    assert records[0]["words"] == 0 and "val_loss" in records[0]  # plotted against words too
    assert vals[-1] < vals[0] - 1.0, vals  # learned well beyond chance
    assert all({"step", "tokens", "loss", "lr"} <= r.keys() for r in records if "loss" in r)
    summary = json.loads((run / "summary.json").read_text())
    assert vals[-1] < summary["unigram_entropy"]  # better than unigram statistics

    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-40", "step-60"]  # keep_last 2
    assert (run / "recipe.yaml").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run / "final"
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(final, local_files_only=True)
    enc = tokenizer("And God said, Let there be light", return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        loss = model(**enc, labels=enc.input_ids).loss.item()
    assert loss < vals[0]  # the exported weights are the trained ones

    text = run_cli(["generate", str(final), "--prompt", "And the", "--max-new-tokens", "10"])
    assert text.strip().startswith("And the")

    # running the finished run again trains and writes nothing
    before = {p: p.stat().st_mtime_ns for p in (run / "final").iterdir()}
    out = run_cli(["train", *tiny_run_args(bible_corpus, cache, 60), "--out", str(run)])
    assert "already finished its 60 steps" in out and "done in" not in out
    assert "LR has decayed to the end" in out  # more steps would re-warm it: the hint says so
    assert {p: p.stat().st_mtime_ns for p in (run / "final").iterdir()} == before

    # a summary cut short by a kill: the final export is redone and the summary rewritten
    (run / "summary.json").write_text('{"step": 6')
    run_cli(["train", *tiny_run_args(bible_corpus, cache, 60), "--out", str(run)])
    assert json.loads((run / "summary.json").read_text())["step"] == 60

    # running again with a longer budget resumes from step 60 instead of starting over
    out = run_cli(["train", *tiny_run_args(bible_corpus, cache, 80), "--out", str(run)])
    assert "resuming from" in out and "step 60" in out
    assert "min of training in all)" in out  # this command's time, and the run's in all
    assert "the LR at step 60 goes from 0% to 100% of the peak" in out  # the moved decay is pointed out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(60) >= 1 and max(steps) == 80
    assert json.loads((run / "final" / "lmp.json").read_text())["step"] == 80


@pytest.mark.slow
def test_document_packing_trains(bible_corpus, tmp_path):
    run = tmp_path / "run"
    # with activation checkpointing and batches made in the loop: both must train the same way
    sets = {
        "data.packing": "document",
        "train.eval_every": 10,
        "train.activation_checkpointing": True,
        "train.data_worker": False,
    }
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 20, **sets)
    run_cli(["train", *args, "--out", str(run)])
    vals = [
        r["val_loss"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "val_loss" in r
    ]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.5


@pytest.mark.slow
def test_weight_average_during_training(bible_corpus, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    extra = {
        "train.average": "{kind: last_k, k: 2, every: 5}",
        "checkpoint.every": 5,
        "checkpoint.keep_last": 5,
        "train.eval_every": 10,
    }
    out = run_cli(["train", *tiny_run_args(bible_corpus, tmp_path / "cache", 20, **extra), "--out", str(run)])
    assert "averaged weights (last_k)" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss_avg" in r] == [10, 20]
    # final-avg is exactly the mean of the last two snapshots, which the step-15/20 checkpoints hold
    avg = load_file(run / "final-avg" / "model.safetensors")
    a = load_file(run / "checkpoints" / "step-15" / "model.safetensors")
    b = load_file(run / "checkpoints" / "step-20" / "model.safetensors")
    for name, tensor in avg.items():
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=0, atol=1e-7)
    assert (run / "checkpoints" / "step-20" / "average.pt").is_file()


@pytest.mark.slow
def test_zero_shot_scores_logged_during_training(bible_corpus, tmp_path):
    from lm_pretrain.eval.runner import evaluate

    run = tmp_path / "run"
    blimp = ROOT.parent / "shared" / "data" / "blimp"
    tasks = "[probe, blimp]" if blimp.is_dir() else "[probe]"  # BLiMP where ../shared is present
    extra = {"eval": f"{{tasks: {tasks}, probe_items: 10, every: 10, items_per_uid: 3, data_dir: {blimp}}}"}
    out = run_cli(["train", *tiny_run_args(bible_corpus, tmp_path / "cache", 20, **extra), "--out", str(run)])
    assert "zero-shot probe" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = {r["step"]: r["eval/probe"] for r in records if "eval/probe" in r}
    assert sorted(probes) == [10, 20]
    # the same score `lmp eval` gives the exported model (one flipped pair at most: float noise)
    exported = evaluate(run / "final", ["probe"], probe_size=10).tasks[0].mean
    assert abs(probes[20] - exported) <= 1.0
    if blimp.is_dir():  # 3 pairs of each of the 67 UIDs, mean of UID accuracies: a multiple of 1/3
        scores = [r["eval/blimp"] for r in records if "eval/blimp" in r]
        assert len(scores) == 2 and all(
            abs(s * 67 * 3 / 100 - round(s * 67 * 3 / 100)) < 1e-6 for s in scores
        )


def test_eval_section_needs_data_for_data_tasks(bible_corpus, tmp_path):
    extra = {"eval": "{tasks: [blimp]}"}
    result = CliRunner().invoke(app, ["train", *tiny_run_args(bible_corpus, tmp_path / "cache", 5, **extra)])
    assert result.exit_code == 2 and "eval.data_dir" in result.output
    extra = {"eval": f"{{tasks: [ewok], data_dir: {tmp_path}}}"}
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", *tiny_run_args(bible_corpus, tmp_path / "cache", 5, **extra), "--out", str(run)]
    )
    assert result.exit_code == 2 and "no data for task ewok" in result.output
    assert not (run / "checkpoints").exists()  # stopped before training


@pytest.mark.slow
def test_damaged_checkpoint_is_refused_by_name(bible_corpus, tmp_path):
    run = tmp_path / "run"
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 10, **{"checkpoint.every": 5})
    run_cli(["train", *args, "--out", str(run)])
    weights = run / "checkpoints" / "step-10" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # damaged after it was written
    status = (run / "status.json").read_text()
    longer = tiny_run_args(bible_corpus, tmp_path / "cache", 12, **{"checkpoint.every": 5})
    result = CliRunner().invoke(app, ["train", *longer, "--out", str(run)])
    assert result.exit_code == 2
    assert "step-10 cannot be read" in result.output and "Move it aside" in result.output
    assert (run / "checkpoints" / "step-5" / "model.safetensors").is_file()  # nothing else touched
    assert len(weights.read_bytes()) == 100 and (run / "status.json").read_text() == status
    (run / "checkpoints" / "step-10" / "trainer_state.json").write_text('{"step": 1')
    result = CliRunner().invoke(app, ["train", *longer, "--out", str(run)])
    assert result.exit_code == 2 and "step-10 has an unreadable trainer_state.json" in result.output
