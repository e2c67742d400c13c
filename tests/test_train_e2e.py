"""End to end: a tiny model trained on real English, exported, loaded by transformers, resumed."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lm_pretrain.cli import app
from lm_pretrain.data.builtin import demo_documents

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 150k words of the built-in corpus's Bible text as a jsonl file."""
    docs = [d for d in demo_documents() if d.source == "bible_bbe"][:200]
    path = tmp_path_factory.mktemp("corpus") / "bible.jsonl"
    path.write_text("".join(json.dumps({"text": d.text, "source": d.source}) + "\n" for d in docs))
    return path


def tiny_overrides(corpus: Path, cache: Path, steps: int) -> list[str]:
    sets = {
        "data.path": str(corpus),
        "data.source_field": "source",
        "data.validation_fraction": 0.05,
        "data.cache_dir": str(cache),
        "tokenizer.vocab_size": 1024,
        "model.hidden_size": 64,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.max_seq_len": 64,
        "train.batch_size": 16,
        "train.micro_batch_size": 8,
        "train.max_steps": steps,
        "train.log_every": 5,
        "train.eval_every": 20,
        "train.eval_tokens": 4096,
        "checkpoint.every": 20,
        "checkpoint.keep_last": 2,
        "optim.lr": 3e-3,
    }
    out = []
    for key, value in sets.items():
        out += ["--set", f"{key}={value}"]
    return out


def run_cli(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.mark.slow
def test_train_export_generate_resume(corpus, tmp_path):
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    run_cli(["train", str(ROOT / "recipes/demo.yaml"), "--out", str(run), *tiny_overrides(corpus, cache, 60)])

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 4  # before training, then at steps 20, 40, 60
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

    # running again with a longer budget resumes from step 60 instead of starting over
    out = run_cli(
        ["train", str(ROOT / "recipes/demo.yaml"), "--out", str(run), *tiny_overrides(corpus, cache, 80)]
    )
    assert "resuming from" in out and "step 60" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(60) >= 1 and max(steps) == 80
    assert json.loads((run / "final" / "lmp.json").read_text())["step"] == 80
