"""The decoder: shapes, loss, causality, GQA; the export: transformers computes the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import ATTENTION_BLOCK_ROWS, CompiledCpuAttention, Decoder, DecoderConfig
from lm_pretrain.model.export import hf_config_dict, load_model, save_model
from lm_pretrain.recipe import ModelConfig

VOCAB = 300
PAD = 2


def tiny_config(**overrides) -> DecoderConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=192,
        max_seq_len=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=PAD,
    )
    fields.update(overrides)
    return DecoderConfig(**fields)


def tiny_model(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(tiny_config(**overrides))


def sample_ids(batch: int = 2, length: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    ids[0, 3] = PAD  # transformers must not treat the pad row of the embedding specially
    return ids


def test_from_recipe_defaults():
    cfg = DecoderConfig.from_recipe(
        ModelConfig(hidden_size=96, num_heads=4),
        vocab_size=500,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    assert cfg.num_kv_heads == 4
    assert cfg.intermediate_size == 256  # 8/3 * 96 = 256, already a multiple of 64
    assert cfg.head_dim == 24
    cfg = DecoderConfig.from_recipe(
        ModelConfig(hidden_size=256, num_heads=4, num_kv_heads=2),
        vocab_size=500,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    assert cfg.intermediate_size == 704  # 682.67 rounded up to a multiple of 64
    assert cfg.num_kv_heads == 2


def test_shapes_loss_and_gradients():
    model = tiny_model()
    ids = sample_ids()
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    out = model(ids, targets)
    assert out.logits.shape == (2, 24, VOCAB)
    assert torch.isfinite(out.loss)
    # an untrained model predicts roughly uniformly
    assert abs(out.loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), targets[:, :-1].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model(ids).loss is None


def test_tied_embeddings_and_parameter_count():
    tied, untied = tiny_model(tie_embeddings=True), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert "lm_head.weight" in tied.state_dict()  # same key set as transformers' LlamaForCausalLM
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * 64
    assert tied.num_parameters(exclude_embeddings=True) == untied.num_parameters(exclude_embeddings=True)
    by_hand = sum(p.numel() for p in untied.parameters())
    assert untied.num_parameters() == by_hand
    assert untied.num_parameters(exclude_embeddings=True) == by_hand - 2 * VOCAB * 64


def test_output_projections_start_smaller():
    model = tiny_model(num_layers=8, hidden_size=128, intermediate_size=512)
    q_std = model.model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.model.layers[0].self_attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.1)
    assert o_std == pytest.approx(0.02 / 4, rel=0.1)  # 1 / sqrt(2 * 8 layers)


def test_causality():
    model = tiny_model().eval()
    ids = sample_ids()
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=0)
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-4


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention(kv_heads):
    model = tiny_model(num_kv_heads=kv_heads)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (kv_heads * 16, 64)
    ids = sample_ids()
    out = model(ids, torch.roll(ids, -1, dims=1))
    assert out.logits.shape == (2, 24, VOCAB) and torch.isfinite(out.loss)
    out.loss.backward()


def test_positions_and_mask_reproduce_separate_documents():
    """Resetting positions and masking across a boundary makes the second half an independent sequence."""
    model = tiny_model().eval()
    ids = sample_ids(batch=1, length=20)
    positions = torch.cat([torch.arange(8), torch.arange(12)])
    mask = torch.ones(20, 20, dtype=torch.bool).tril()
    mask[8:, :8] = False
    with torch.no_grad():
        packed = model(ids, position_ids=positions, attn_mask=mask[None, None]).logits
        alone = model(ids[:, 8:]).logits
        batched_positions = model(ids, position_ids=torch.arange(20).expand(1, 20)).logits
        default = model(ids).logits
    torch.testing.assert_close(packed[:, 8:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched_positions, default, atol=1e-6, rtol=0)


def test_bf16_autocast():
    model = tiny_model()
    ids = sample_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, torch.roll(ids, -1, dims=1))
    assert out.logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_compiles():
    # aot_eager traces forward and backward like inductor would, without its slow code generation
    model = tiny_model(num_kv_heads=2)
    ids = sample_ids()
    targets = torch.roll(ids, -1, dims=1)
    eager = model(ids, targets)
    compiled = torch.compile(model, backend="aot_eager")(ids, targets)
    torch.testing.assert_close(compiled.logits, eager.logits)
    compiled.loss.backward()


def block_causal_mask(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """[B, 1, T, T] causal within random documents: what document packing passes the model."""
    starts = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < 0.15
    doc = torch.cumsum(starts.long(), dim=1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document-mask"])
def test_cpu_attention_backward_matches_sdpa(masked):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 3, 17, 8)
    mask = block_causal_mask(2, 17) if masked else None
    expected_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked)
    expected = torch.autograd.grad(expected_out, (q, k, v), grad_out)
    out = CompiledCpuAttention.apply(q, k, v, mask)
    torch.testing.assert_close(out, expected_out)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad_out), expected, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("length", [64, 150], ids=["one-block", "blocks-and-a-rest"])
def test_blocked_causal_attention_matches_sdpa_across_blocks(length):
    # causal attention runs in blocks of ATTENTION_BLOCK_ROWS rows: 150 makes two whole blocks and
    # a short one, so the skipped blocks above the diagonal and the summed gradient parts all count
    assert length <= ATTENTION_BLOCK_ROWS or length % ATTENTION_BLOCK_ROWS
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 3, length, 16)
    expected_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = torch.autograd.grad(expected_out, (q, k, v), grad_out)
    out = CompiledCpuAttention.apply(q, k, v, None)
    torch.testing.assert_close(out, expected_out)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad_out), expected, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document-mask"])
def test_compiled_gradients_equal_eager(masked):
    # under compile the model takes CompiledCpuAttention's backward (and GQA's repeat)
    eager, compiled = tiny_model(num_kv_heads=2), tiny_model(num_kv_heads=2)
    ids = sample_ids()
    targets = torch.roll(ids, -1, dims=1)
    mask = block_causal_mask(*ids.shape) if masked else None
    eager(ids, targets, attn_mask=mask, return_logits=False).loss.backward()
    compiled_model = torch.compile(compiled, backend="aot_eager")
    compiled_model(ids, targets, attn_mask=mask, return_logits=False).loss.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model()(torch.zeros(1, 65, dtype=torch.long))


# ---------------------------------------------------------------- export


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_embeddings=True),
        dict(tie_embeddings=False),
        dict(tie_embeddings=True, num_kv_heads=2, rope_theta=500.0),
        dict(tie_embeddings=False, num_kv_heads=1, rope_theta=123456.0, norm_eps=1e-6),
    ],
    ids=["tied", "untied", "tied-gqa-theta", "untied-mqa-theta"],
)
def test_transformers_computes_the_same_logits(tmp_path, overrides):
    model = tiny_model(**overrides).eval()
    save_model(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float32).eval()
    ids = sample_ids()
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == overrides["tie_embeddings"]


def test_rope_theta_matters():
    """Guards the test above: were transformers to ignore rope_theta, the logits would differ."""
    model = tiny_model(rope_theta=500.0).eval()
    default_theta = Decoder(tiny_config(rope_theta=10000.0)).eval()
    default_theta.load_state_dict(model.state_dict())
    ids = sample_ids()
    with torch.no_grad():
        assert (model(ids).logits - default_theta(ids).logits).abs().max() > 1e-3


def test_saved_files(tmp_path):
    model = tiny_model(tie_embeddings=True)
    save_model(model, tmp_path, dtype=torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == hf_config_dict(model.config, "bfloat16")
    assert "rope_parameters" not in config and config["rope_theta"] == 10000.0
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in weights  # the tied matrix is stored once
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert set(weights) == set(model.state_dict()) - {"lm_head.weight"}


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip(tmp_path, tie):
    model = tiny_model(tie_embeddings=tie, num_kv_heads=2, rope_theta=777.0).eval()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).eval()
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_load_missing_weights(tmp_path):
    save_model(tiny_model(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LmpError, match="model.safetensors"):
        load_model(tmp_path)


def test_load_missing_config(tmp_path):
    save_model(tiny_model(), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(LmpError, match="config.json"):
        load_model(tmp_path)


def test_load_rejects_other_architectures(tmp_path):
    save_model(tiny_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(LmpError, match="llama"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn"}}))
    with pytest.raises(LmpError, match="rope"):
        load_model(tmp_path)


def test_load_rejects_mismatched_weights(tmp_path):
    save_model(tiny_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(LmpError, match="gate_proj.weight has shape"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(LmpError, match="missing model.layers.2"):
        load_model(tmp_path)
