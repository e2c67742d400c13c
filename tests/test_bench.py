"""The chunked loss equals the plain one; `lmp bench` runs end to end on a tiny shape (CI)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lm_pretrain.bench import HF, HF_COMPILED, LMP, LMP_COMPILED, Shape, flops_per_token, run_bench
from lm_pretrain.bench_report import write_json
from lm_pretrain.cli import app
from lm_pretrain.model.decoder import Decoder, DecoderConfig, chunked_lm_loss

VOCAB = 300


def tiny_model() -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_seq_len=32
    )
    return Decoder(cfg)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 32), generator=generator)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :7] = -100  # ignored positions inside a chunk as well
    return ids, targets


@pytest.mark.parametrize("chunk_rows", [5, 32, 1000])  # many chunks, even chunks, one chunk
def test_chunked_loss_and_gradients_equal_plain_fp32(chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(3, 32, 64, requires_grad=True)
    weight = (0.1 * torch.randn(VOCAB, 64)).requires_grad_()
    _, targets = batch()
    plain = F.cross_entropy((hidden @ weight.T).view(-1, VOCAB), targets.view(-1), ignore_index=-100)
    plain_grads = torch.autograd.grad(plain * 0.5, (hidden, weight))
    chunked = chunked_lm_loss(hidden, weight, targets, chunk_rows=chunk_rows)
    chunked_grads = torch.autograd.grad(chunked * 0.5, (hidden, weight))  # backward scales by 0.5
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5)
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the evaluation path computes no gradients
        torch.testing.assert_close(
            chunked_lm_loss(hidden, weight, targets, chunk_rows=chunk_rows), plain, rtol=0, atol=1e-5
        )


def test_model_without_logits_gives_the_same_loss_and_gradients():
    ids, targets = batch()
    model = tiny_model()
    plain = model(ids, targets)
    plain.loss.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = model(ids, targets, return_logits=False)
    assert fused.logits is None
    fused.loss.backward()
    torch.testing.assert_close(fused.loss, plain.loss, rtol=0, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    ids, targets = batch()
    model = tiny_model()
    reference = model(ids, targets, return_logits=False).loss
    reference.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    recomputed = model(ids, targets, return_logits=False).loss
    recomputed.backward()
    assert torch.equal(recomputed, reference)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=0, atol=0, msg=name)


def test_model_without_logits_under_bf16_autocast():
    ids, targets = batch()
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids, targets).loss
        fused = model(ids, targets, return_logits=False).loss
    assert fused.dtype == torch.float32
    # both take bf16 logits to fp32 the same way
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-4)
    fused.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = DecoderConfig(
        vocab_size=100, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=16
    )
    per_layer = 4 * 8 * 8 + 3 * 8 * 16
    assert flops_per_token(cfg, seq=10) == 6 * (2 * per_layer + 100 * 8) + 12 * 2 * 8 * 10


TINY = Shape(hidden=32, layers=1, heads=2, vocab=300, seq=16, batch=2)


def test_bench_tiny_run(tmp_path):
    result = run_bench(TINY, steps=2, warmup=1, compile=False, prep=True, prep_documents=20, eval_pairs=1)
    names = [m.name for m in result.models]
    assert names == [HF, LMP]
    for m in result.models:
        assert m.tokens_per_s > 0
        assert 0 < m.mfu < 1.5 and m.mfu_model_shapes > 0
        assert m.step_s >= m.forward_s and m.data_share < 1
        assert m.peak_memory_mb is not None
    assert result.ratios[f"{LMP} / {HF}"] > 0
    assert result.prep["encode_tokens_per_s"] > 0
    assert result.eval["fp32_pairs_per_s"] > 0 and result.eval["bf16_pairs_per_s"] > 0
    assert 0 < result.eval["fp32_limit_fraction"] < 2
    out = tmp_path / "bench.json"
    write_json(result, out)
    saved = json.loads(out.read_text())
    assert [m["name"] for m in saved["models"]] == [HF, LMP]
    assert saved["peak_gflops"]["bf16"] > 0
    assert "saving" in saved["loss_memory_mb"]
    assert saved["loss_memory_mb"]["activation_checkpointing"] > 0


def test_bench_cli(tmp_path):
    out = tmp_path / "b.json"
    args = ["bench", "--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "300", "--seq", "16"]
    args += ["--batch", "2", "--steps", "1", "--no-compile", "--no-prep", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "transformers" in result.output and "ratio lmp / transformers" in result.output
    assert json.loads(out.read_text())["shape"]["hidden"] == 32
    bad = CliRunner().invoke(app, ["bench", "--hidden", "30", "--heads", "4"])
    assert bad.exit_code == 2


@pytest.mark.slow
def test_bench_compiled_rows_include_transformers_compiled_as_the_hf_trainer_runs_it():
    result = run_bench(TINY, steps=10, warmup=1, compile=True, memory=False, prep=False)
    assert [m.name for m in result.models] == [HF, LMP, LMP_COMPILED, HF_COMPILED]
    losses = {m.name: m.final_loss for m in result.models}
    # the same weights and batches: every row trains the same model (transformers' loss leaves out
    # each row's last target, so its value differs a little)
    assert losses[LMP] == pytest.approx(losses[LMP_COMPILED], rel=0.02)
    assert losses[HF_COMPILED] == pytest.approx(losses[LMP], rel=0.05)
    assert result.ratios[f"{LMP_COMPILED} / {HF_COMPILED}"] > 0


def test_set_without_a_recipe_and_a_foreign_json_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--set", "model.num_heads=3", "--steps", "1", "--no-prep"])
    assert result.exit_code == 2 and "give the RECIPE" in result.output, result.output
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama"}')
    result = CliRunner().invoke(app, ["bench", "--steps", "1", "--no-prep", "--json", str(config)])
    assert result.exit_code == 2 and "will not write over it" in result.output, result.output
    assert config.read_text() == '{"model_type": "llama"}'
