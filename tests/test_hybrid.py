"""The hybrid causal + masked next-token objective (GPT-BERT): masking, attention, loss, export, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import tiny_run_args
from lm_pretrain.cli import app
from lm_pretrain.data.loader import IGNORE_INDEX, document_masks, split_inputs_targets
from lm_pretrain.data.masking import MntpMasker, objective_weights
from lm_pretrain.model.decoder import Decoder, chunked_lm_loss
from lm_pretrain.model.export import MODELING_FILE, load_model, save_model
from lm_pretrain.recipe import HybridConfig
from test_model import VOCAB, sample_ids, tiny_config

PAD, BOS, EOS, MASK = 0, 1, 2, 3
SPECIAL = (PAD, BOS, EOS, MASK)


def masker(objective: str = "hybrid", **cfg: object) -> MntpMasker:
    return MntpMasker(HybridConfig(**cfg), objective, seed=7, special_ids=SPECIAL, mask_token_id=MASK,
                      vocab_size=VOCAB)  # fmt: skip


def windows(rows: int = 8, length: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed windows of ordinary tokens with a document boundary (EOS, BOS) in each row."""
    rng = np.random.default_rng(seed)
    data = rng.integers(4, VOCAB, size=(rows, length + 1))
    data[:, 40], data[:, 41] = EOS, BOS
    return split_inputs_targets(torch.from_numpy(data), BOS)


# ---------------------------------------------------------------- which rows, which tokens


def test_masked_rows_are_spread_evenly_at_the_recipe_fraction():
    m = masker(masked_fraction=15 / 16)
    flags = [m.is_masked(g) for g in range(1600)]
    assert sum(flags) == 1500
    # every run of 16 samples (any batch of 16) has 15 masked rows and one causal row
    assert all(sum(flags[i : i + 16]) == 15 for i in range(0, 1584))
    assert all(masker("masked_next_token", masked_fraction=0.0).is_masked(g) for g in range(50))
    assert not any(masker(masked_fraction=0.0).is_masked(g) for g in range(50))


def test_mask_rate_falls_linearly_from_start_to_end():
    m = masker(mask_rate_start=0.3, mask_rate_end=0.15)
    assert [m.rate(p) for p in (0.0, 0.5, 1.0, 2.0)] == pytest.approx([0.3, 0.225, 0.15, 0.15])


def test_masked_row_predicts_the_chosen_tokens_one_position_early():
    inputs, targets = windows()
    rows = torch.ones(len(inputs), dtype=torch.bool)
    rows[5] = False  # a causal row stays as it was
    x, y = masker().mask_rows(inputs, targets, rows, range(100, 108), rate=0.3)
    assert torch.equal(x[5], inputs[5]) and torch.equal(y[5], targets[5])
    for b in range(len(inputs)):
        if b == 5:
            continue
        chosen = (y[b] != IGNORE_INDEX).nonzero().squeeze(1) + 1  # input positions chosen
        # the output at k - 1 must give the original token at k
        assert torch.equal(y[b, chosen - 1], inputs[b, chosen])
        # specials (the boundary EOS and BOS) and position 0 are never chosen
        assert not torch.isin(inputs[b, chosen], torch.tensor(SPECIAL)).any() and (chosen > 0).all()
        # the count is the rate of the candidates, rounded at random: 0.3 x 125 = 37.5 -> 37 or 38
        assert len(chosen) in (37, 38)
        # tokens that were not chosen are untouched
        untouched = torch.ones(len(inputs[b]), dtype=torch.bool)
        untouched[chosen] = False
        assert torch.equal(x[b, untouched], inputs[b, untouched])


def test_replacement_split_and_spans():
    inputs, targets = windows(rows=64, length=256)
    rows = torch.ones(64, dtype=torch.bool)
    x, y = masker(random_fraction=0.1, keep_fraction=0.1).mask_rows(inputs, targets, rows, range(64), 0.3)
    chosen = torch.zeros_like(y, dtype=torch.bool)
    chosen[:, 1:] = y[:, :-1] != IGNORE_INDEX
    new = x[chosen]
    old = inputs[chosen]
    masked = (new == MASK).float().mean().item()
    kept = (new == old).float().mean().item()
    assert 0.74 < masked < 0.86 and 0.05 < kept < 0.16, (masked, kept)
    assert not torch.isin(new[new != MASK], torch.tensor(SPECIAL)).any()  # random tokens are ordinary

    def mean_run(c: torch.Tensor) -> float:
        c = c.int()
        starts = (c[:, 1:] > c[:, :-1]).sum() + c[:, 0].sum()
        return c.sum().item() / starts.item()

    single = masker(max_span=1).mask_rows(inputs, targets, rows, range(64), 0.3)[1]
    c1 = torch.zeros_like(chosen)
    c1[:, 1:] = single[:, :-1] != IGNORE_INDEX
    assert mean_run(chosen) > mean_run(c1) + 0.4  # spans of up to 3 tokens are chosen together


def test_masking_is_a_pure_function_of_seed_and_sample():
    inputs, targets = windows()
    a = masker().batch(inputs, targets, first_sample=32, progress=0.5)
    b = masker().batch(inputs, targets, first_sample=32, progress=0.5)
    c = masker().batch(inputs, targets, first_sample=48, progress=0.5)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_metadata_prefix_tokens_are_never_masked_targets():
    inputs, targets = windows(rows=4)
    targets[:, 10:20] = IGNORE_INDEX  # as a MeCo prefix would be
    _, y = masker().mask_rows(inputs, targets, torch.ones(4, dtype=torch.bool), range(4), 0.9)
    chosen = (y != IGNORE_INDEX).nonzero()[:, 1] + 1
    assert not ((chosen >= 11) & (chosen <= 20)).any()


# ---------------------------------------------------------------- attention and loss


def test_masked_rows_attend_both_ways_within_their_document():
    inputs, _ = windows(rows=2, length=64)
    rows = torch.tensor([True, False])
    _, mask = document_masks(inputs, BOS, rows)
    _, causal = document_masks(inputs, BOS)
    doc = torch.cumsum((inputs == BOS).long(), dim=1)
    same_doc = doc[:, :, None] == doc[:, None, :]
    assert torch.equal(mask[0, 0], same_doc[0])  # all of its own document, before and after
    assert torch.equal(mask[1], causal[1])


def test_bidirectional_rows_see_later_tokens():
    torch.manual_seed(0)
    model = Decoder(tiny_config()).eval()
    ids = sample_ids(batch=1)
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % VOCAB
    full = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    with torch.no_grad():
        causal_change = (model(ids).logits[0, 0] - model(later).logits[0, 0]).abs().max()
        bidir_change = model(ids, attn_mask=full).logits[0, 0] - model(later, attn_mask=full).logits[0, 0]
    assert causal_change == 0 and bidir_change.abs().max() > 1e-4


def test_objective_weights_give_each_objective_its_share_of_rows():
    inputs, targets = windows(rows=16)
    rows = torch.tensor([True] * 15 + [False])
    x, y = masker().mask_rows(inputs, targets, rows, range(16), 0.15)
    w = objective_weights(y, rows)
    assert w[rows].sum().item() == pytest.approx(15 / 16) and w[~rows].sum().item() == pytest.approx(1 / 16)
    assert (w[y == IGNORE_INDEX] == 0).all()
    assert objective_weights(y, torch.ones(16, dtype=torch.bool)) is None  # one kind: a plain mean


def test_weighted_chunked_loss_and_gradients_equal_the_plain_weighted_sum():
    torch.manual_seed(0)
    hidden = torch.randn(2, 16, 32, requires_grad=True)
    weight = (0.1 * torch.randn(VOCAB, 32)).requires_grad_()
    targets = torch.randint(0, VOCAB, (2, 16))
    targets[0, :5] = IGNORE_INDEX
    w = torch.rand(2, 16) * (targets != IGNORE_INDEX)
    per_token = F.cross_entropy((hidden @ weight.T).view(-1, VOCAB), targets.view(-1), reduction="none",
                                ignore_index=IGNORE_INDEX)  # fmt: skip
    plain = (per_token * w.view(-1)).sum()
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    chunked = chunked_lm_loss(hidden, weight, targets, w, chunk_rows=7)
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_as_masked_lm_and_causal_lm_in_transformers(tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(0)
    model = Decoder(tiny_config(objective="hybrid", tie_embeddings=tie)).eval()
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_lmp.LmpForMaskedNextToken"
    assert (tmp_path / MODELING_FILE).is_file()
    assert load_model(tmp_path).config.objective == "hybrid"  # lmp reads it back

    masked = AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True, local_files_only=True)
    causal = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, local_files_only=True)
    assert type(masked).__name__ == "LmpForMaskedNextToken" and type(causal).__name__ == "LlamaForCausalLM"
    ids = sample_ids()
    full = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(input_ids=ids).logits, model(ids, attn_mask=full).logits,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        torch.testing.assert_close(
            causal.eval()(input_ids=ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5
        )
        # right padding is not attended: a padded row scores its tokens as the unpadded sequence
        padding = torch.ones_like(ids)
        padding[:, 16:] = 0
        padded = masked(input_ids=ids, attention_mask=padding).logits[:, :16]
        torch.testing.assert_close(padded, masked(input_ids=ids[:, :16]).logits, rtol=1e-5, atol=1e-5)


def test_causal_export_has_no_masked_lm_class(tmp_path):
    save_model(Decoder(tiny_config()), tmp_path)
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    assert not (tmp_path / MODELING_FILE).exists()


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_hybrid_run_trains_both_objectives_and_scores_with_both_backends(bible_corpus, tmp_path):
    run = tmp_path / "run"
    # eval_tokens 4000: 62 validation windows, so the last validation batch is a short one
    extra = {"eval": "{tasks: [probe], probe_items: 5}", "train.eval_tokens": 4000}
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 40, objective="hybrid", **extra)
    result = CliRunner().invoke(app, ["train", *args, "--out", str(run)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "masked next-token" in result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = records[0]["val_loss"]  # before training: about ln(vocabulary)
    mntp = [r["val_mntp_loss"] for r in records if "val_mntp_loss" in r]
    causal = [r["val_loss"] for r in records if "val_mntp_loss" in r]
    assert len(mntp) == 2 and mntp[-1] < first - 1.0 and causal[-1] < first - 1.0, (first, mntp, causal)
    probes = [r for r in records if "eval/probe_mntp" in r]  # the probe runs with both backends
    assert len(probes) == 2 and all(0 <= r["eval/probe_mntp"] <= 100 and "eval/probe" in r for r in probes)
    assert (run / "final" / MODELING_FILE).is_file()
    assert (run / "checkpoints" / "step-40" / MODELING_FILE).is_file()  # checkpoints load the same way

    # batched mntp scoring (only the read position's logits, via logits_to_keep) equals the plain way
    from lm_pretrain.eval.scoring import load_scoring_model, score_candidates, score_one_at_a_time

    sm = load_scoring_model(run / "final", "mntp", device="cpu")
    sentences = ["And God said, Let there be light.", "And God said, Let there are light.", "He went up."]
    completions = [sentences[0], sentences[1], " up."]
    np.testing.assert_allclose(
        score_candidates(sm, sentences, completions),
        score_one_at_a_time(sm, sentences, completions),
        atol=1e-4,
    )

    scores = {}
    for backend in ("causal", "mntp"):
        out = tmp_path / f"{backend}.json"
        result = CliRunner().invoke(
            app, ["eval", str(run / "final"), "--tasks", "probe", "--backend", backend, "--json", str(out)]
        )
        assert result.exit_code == 0, result.output + repr(result.exception)
        scores[backend] = json.loads(out.read_text())["averages"]["probe"]
    assert all(0 <= s <= 100 for s in scores.values()) and scores["causal"] != scores["mntp"]


@pytest.mark.slow
def test_hybrid_run_resumes_exactly(bible_corpus, tmp_path):
    """Masking depends only on (seed, sample, step): a resumed run masks as the uninterrupted one did."""
    import shutil

    run = tmp_path / "run"
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 12, objective="hybrid", **{"train.log_every": 1,
                         "checkpoint.every": 6})  # fmt: skip

    def losses() -> dict[int, float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    result = CliRunner().invoke(app, ["train", *args, "--out", str(run)])
    assert result.exit_code == 0, result.output
    whole = losses()
    # as if the run had died after its step-6 checkpoint
    shutil.rmtree(run / "checkpoints" / "step-12")
    shutil.rmtree(run / "final")
    result = CliRunner().invoke(app, ["train", *args, "--out", str(run)])
    assert result.exit_code == 0 and "resuming from" in result.output, result.output
    assert losses() == whole and len(whole) == 12
