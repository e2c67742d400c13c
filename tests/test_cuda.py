"""What only a CUDA GPU can check: flash attention under bf16, compile on CUDA, and training runs
there (skipped without a GPU; scripts/gpu_check.sh runs them with `pytest -m cuda`)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_run_args
from lm_pretrain.cli import app

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_sdpa_flash_agrees_with_the_math_kernel_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        math = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(flash.float(), math.float(), atol=2e-2, rtol=0)


def test_compiled_bf16_step_matches_eager_on_cuda():
    from lm_pretrain.model.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=2)).cuda()
    inputs = torch.randint(0, 512, (4, 128), device="cuda")
    targets = torch.roll(inputs, -1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(inputs, targets, return_logits=False).loss
        compiled = torch.compile(model)(inputs, targets, return_logits=False).loss
    assert torch.isfinite(compiled) and abs(compiled.item() - eager.item()) < 1e-2 * eager.item()


@pytest.mark.parametrize("extra", [{}, {"data.packing": "document", "train.compile": "true"},
                                   {"objective": "hybrid", "hybrid.masking": "hard"}])  # fmt: skip
def test_tiny_runs_train_and_resume_on_cuda(bible_corpus, tmp_path, extra):
    args = tiny_run_args(
        bible_corpus, tmp_path / "cache", 8, **{"train.log_every": 1, "checkpoint.every": 4}, **extra
    )
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", *args, "--out", str(run)])
    assert result.exit_code == 0 and "| cuda" in result.output, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
