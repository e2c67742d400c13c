"""torch.compile'd training (inductor, bf16) against eager at the tests' tiny shape, and the
first-batch check that keeps a miscompiled model from training."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_run_args
from lm_pretrain.cli import app
from lm_pretrain.model.decoder import Decoder, DecoderConfig
from lm_pretrain.train.compile_check import compiled_disagreement

CHECK_WARNING = "torch.compile miscomputes this model"


def step_losses(corpus, tmp_path, name: str, **extra: object) -> tuple[dict[int, float], str]:
    sets = {"train.precision": "bf16", "train.log_every": 1, "schedule.kind": "constant", **extra}
    args = tiny_run_args(corpus, tmp_path / "cache", 2, **sets)
    result = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / name)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, result.output


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{}, {"objective": "hybrid", "data.packing": "document"}],
    ids=["causal", "hybrid-document-packing"],
)
def test_compiled_bf16_training_matches_eager_at_step_one(bible_corpus, tmp_path, extra):
    eager, _ = step_losses(bible_corpus, tmp_path, "eager", **extra)
    compiled, output = step_losses(bible_corpus, tmp_path, "compiled", **{"train.compile": True}, **extra)
    assert sorted(compiled) == [1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for v in compiled.values()), compiled
    # what trained is what the eager model computes, compiled or (after the check) not
    assert abs(compiled[1] - eager[1]) < 0.01 * eager[1], (compiled, eager, output)


def tiny_decoder() -> Decoder:
    torch.manual_seed(0)
    return Decoder(
        DecoderConfig(
            vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, max_seq_len=64
        )
    )


def loss_of(ids: torch.Tensor):
    return lambda m: m(ids[:, :-1], ids[:, 1:], return_logits=False).loss


def bf16():
    return torch.autocast("cpu", torch.bfloat16)


@pytest.mark.slow
def test_the_check_passes_inductor_and_gives_back_zeroed_gradients():
    model = tiny_decoder()
    ids = torch.randint(0, 256, (4, 65))
    assert compiled_disagreement(torch.compile(model), model, loss_of(ids), bf16) is None
    assert all(p.grad is None for p in model.parameters())


def wrong_backend(scale: float):
    """A torch.compile backend that runs the graph and scales its outputs, as a miscompiling
    backend would get them wrong."""

    def backend(graph, example_inputs):
        def run(*args):
            return [
                o * scale if isinstance(o, torch.Tensor) and o.is_floating_point() else o
                for o in graph(*args)
            ]

        return run

    return backend


def test_the_check_names_a_wrong_loss_and_non_finite_outputs():
    model = tiny_decoder()
    ids = torch.randint(0, 256, (4, 65))
    wrong = compiled_disagreement(torch.compile(model, backend=wrong_backend(2.0)), model, loss_of(ids), bf16)
    assert wrong is not None and wrong.startswith("loss") and "compiled" in wrong
    torch._dynamo.reset()
    nan = compiled_disagreement(
        torch.compile(model, backend=wrong_backend(float("nan"))), model, loss_of(ids), bf16
    )
    assert nan is not None and "nan" in nan
    torch._dynamo.reset()
    # forward only (FSDP): the loss alone is compared
    assert compiled_disagreement(model, model, loss_of(ids), bf16, backward=False) is None


@pytest.mark.slow
def test_a_miscompiled_model_trains_eagerly_with_a_warning(bible_corpus, tmp_path, monkeypatch):
    eager, _ = step_losses(bible_corpus, tmp_path, "eager")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend=wrong_backend(3.0)))
    losses, output = step_losses(bible_corpus, tmp_path, "miscompiled", **{"train.compile": True})
    torch._dynamo.reset()
    assert CHECK_WARNING in output and "train.compile=false" in output, output
    assert losses == eager  # trained eagerly: bit for bit the eager run
