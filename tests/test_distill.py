"""distill: the chunked distillation loss against a plain computation, teachers' checks, training."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import tiny_run_args
from lm_pretrain.cli import app
from lm_pretrain.data.builtin import demo_documents
from lm_pretrain.data.loader import IGNORE_INDEX
from lm_pretrain.model.decoder import DistillTargets, chunked_distill_loss


def plain_distill_loss(hidden, weight, targets, teachers, heads, share, T):
    """The same loss from full logits, written the obvious way."""
    logits = (hidden @ weight.T).float().reshape(-1, weight.shape[0])
    t = targets.reshape(-1)
    hard = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="none")
    p = sum(
        torch.softmax((x @ w.T).float().reshape(-1, w.shape[0]) / T, -1)
        for x, w in zip(teachers, heads, strict=True)
    ) / len(heads)
    soft = -(p * torch.log_softmax(logits / T, -1)).sum(-1) * T * T
    valid = (t != IGNORE_INDEX).float()
    return (((1 - share) * hard + share * soft) * valid).sum() / valid.sum()


@pytest.mark.parametrize("share, T", [(0.5, 2.0), (1.0, 1.0), (0.0, 3.0)])
def test_chunked_distill_loss_and_gradients_equal_the_plain_computation(share, T):
    torch.manual_seed(0)
    V, H = 50, 16
    hidden = torch.randn(3, 11, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (3, 11))
    targets[0, :4] = IGNORE_INDEX
    teachers = [torch.randn(3, 11, 8), torch.randn(3, 11, 24)]  # teachers of other widths
    heads = [torch.randn(V, 8), torch.randn(V, 24)]
    plain = plain_distill_loss(hidden, weight, targets, teachers, heads, share, T)
    plain.backward()
    expected = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    chunked = chunked_distill_loss(hidden, weight, targets, DistillTargets(tuple(teachers), tuple(heads), share, T),
                                   chunk_rows=7)  # fmt: skip
    chunked.backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-4, atol=1e-5)


def train_cli(args: list[str], out) -> object:
    return CliRunner().invoke(app, ["train", *args, "--out", str(out)])


@pytest.fixture(scope="module")
def teacher(bible_corpus, tmp_path_factory):
    """A teacher trained by lmp on the test corpus."""
    root = tmp_path_factory.mktemp("teacher")
    args = tiny_run_args(bible_corpus, root / "cache", 30, **{"model.hidden_size": 96, "model.num_heads": 3})
    result = train_cli(args, root / "run")
    assert result.exit_code == 0, result.output
    return root / "run", root / "cache"


def losses(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_a_student_distils_from_a_teacher_and_resumes_exactly(bible_corpus, teacher, tmp_path):
    run_dir, cache = teacher
    distill = f"{{teachers: [{run_dir}, {run_dir}/checkpoints/step-20], weight: 0.5, temperature: 2.0}}"
    args = tiny_run_args(
        bible_corpus, cache, 12, distill=distill, **{"train.log_every": 1, "checkpoint.every": 6}
    )
    result = train_cli(args, tmp_path / "student")
    assert result.exit_code == 0, result.output
    assert "distillation: 2 teacher(s)" in result.output
    whole = losses(tmp_path / "student")
    plain = train_cli(tiny_run_args(bible_corpus, cache, 12, **{"train.log_every": 1}), tmp_path / "plain")
    assert plain.exit_code == 0
    assert losses(tmp_path / "plain")[1] != whole[1]  # the loss is the mix, from the first step
    # no teacher weights in the student's checkpoints or export: the same files, the same sizes
    ours, theirs = tmp_path / "student/checkpoints/step-12", tmp_path / "plain/checkpoints/step-12"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    size = (tmp_path / "student/final/model.safetensors").stat().st_size
    assert size == (tmp_path / "plain/final/model.safetensors").stat().st_size
    shutil.rmtree(tmp_path / "student/checkpoints/step-12")
    shutil.rmtree(tmp_path / "student/final")
    result = train_cli(args, tmp_path / "student")
    assert result.exit_code == 0 and "resuming from" in result.output, result.output
    assert losses(tmp_path / "student") == whole


@pytest.mark.slow
def test_teachers_with_another_tokenizer_or_outside_the_budget_are_refused(bible_corpus, teacher, tmp_path):
    run_dir, cache = teacher
    other = tiny_run_args(bible_corpus, tmp_path / "cache", 2, **{"tokenizer.vocab_size": 600,
                          "distill": f"{{teachers: [{run_dir}]}}"})  # fmt: skip
    result = train_cli(other, tmp_path / "other")
    assert result.exit_code != 0
    assert "has another tokenizer than the student (id 600 is no token for the student and '" in result.output
    # a tokenizer trained on other text differs early
    dialogue = tmp_path / "dialogue.jsonl"
    docs = [d for d in demo_documents() if d.source == "dialogue"][:800]
    dialogue.write_text("".join(json.dumps({"text": d.text, "source": d.source}) + "\n" for d in docs))
    result = train_cli(tiny_run_args(dialogue, tmp_path / "cache", 2, distill=f"{{teachers: [{run_dir}]}}"),
                       tmp_path / "other")  # fmt: skip
    assert result.exit_code != 0 and re.search(
        r"another tokenizer than the student \(id \d+ is '", result.output
    )
    assert not (tmp_path / "other").exists()  # refused before the run folder was made
    # a teacher trained by lmp on another corpus needs its words declared under a word budget
    foreign = tmp_path / "foreign"
    shutil.copytree(run_dir / "final", foreign)
    record = json.loads((foreign / "lmp.json").read_text())
    (foreign / "lmp.json").write_text(json.dumps({**record, "corpus": "another corpus"}))
    budget = {"data.word_budget": 10_000_000, "distill": f"{{teachers: [{foreign}]}}"}
    result = train_cli(tiny_run_args(bible_corpus, cache, 2, **budget), tmp_path / "b1")
    assert result.exit_code != 0 and "declare them in distill.teacher_words" in result.output, result.output
    declared = {**budget, "distill": f"{{teachers: [{foreign}], teacher_words: 9990000}}"}
    result = train_cli(tiny_run_args(bible_corpus, cache, 2, **declared), tmp_path / "b2")
    assert result.exit_code != 0 and "must fit the budget" in result.output, result.output
    fits = {**budget, "distill": f"{{teachers: [{foreign}], teacher_words: 1000000}}"}
    result = train_cli(tiny_run_args(bible_corpus, cache, 2, **fits), tmp_path / "b3")
    assert result.exit_code == 0 and "teachers' declared 1,000,000" in result.output, result.output


@pytest.mark.slow
def test_an_ensemble_of_sweep_members_scores_its_averaged_probabilities(bible_corpus, teacher, tmp_path):
    _, cache = teacher
    args = tiny_run_args(bible_corpus, cache, 10)
    sweep = CliRunner().invoke(
        app, ["sweep", args[0], *args[1:], "--grid", "seed=0,1", "--out", str(tmp_path / "s")]
    )
    assert sweep.exit_code == 0, sweep.output
    members = sorted(str(p) for p in (tmp_path / "s").iterdir() if (p / "final").is_dir())
    assert len(members) == 2

    def scores(*models: str) -> dict:
        out = tmp_path / "scores.json"
        result = CliRunner().invoke(app, ["eval", *models, "--tasks", "probe,perplexity", "--json", str(out)])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())

    one, two = scores(members[0]), scores(members[1])
    both = scores("--ensemble", *members)
    nats = [s["perplexity"]["nats_per_token"] for s in (one, two)]
    # log of the averaged probability >= the average log probability (Jensen), strictly for two models
    assert both["perplexity"]["nats_per_token"] < sum(nats) / 2
    assert both["perplexity"]["tokens"] == one["perplexity"]["tokens"]
    twice = scores("--ensemble", members[0], members[0])  # one model twice is that model
    assert twice["perplexity"]["nats_per_token"] == pytest.approx(nats[0], abs=1e-6)
    assert twice["averages"] == one["averages"]
    refused = CliRunner().invoke(app, ["eval", *members, "--tasks", "probe"])
    assert refused.exit_code == 2 and "pass --ensemble" in refused.output
