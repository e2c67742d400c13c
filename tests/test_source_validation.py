"""Per-source validation: the validation windows scored per source as well as in total."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_run_args, write_babylm_folder
from lm_pretrain.cli import app
from lm_pretrain.data.loader import validation_batches, validation_sources, validation_window_starts


def test_each_target_gets_the_source_of_its_document():

    offsets = np.array([0, 5, 12, 20])  # three documents
    sources = np.array([2, 0, 1])
    starts = np.array([0, 4, 8])  # windows of 4: targets 1-4, 5-8, 9-12
    got = validation_sources(offsets, sources, starts, 4, 2)
    assert got[0].tolist() == [[2, 2, 2, 2], [0, 0, 0, 0]] and got[1].tolist() == [[0, 0, 0, 1]]


def test_a_small_budget_draws_windows_from_the_whole_split():
    # 10 windows' worth of tokens, a budget of 3: windows from the start, middle and end
    starts = validation_window_starts(41, 4, 12)
    assert starts.tolist() == [0, 12, 24]
    assert validation_window_starts(41, 4, 1000).tolist() == [4 * i for i in range(10)]  # all of it
    # each window of validation_batches is the split at its start
    tokens = np.arange(41)
    inputs, targets = validation_batches(tokens, 4, 12, 8, bos_token_id=10_000)[0]
    assert inputs[:, 0].tolist() == [0, 12, 24] and targets[:, -1].tolist() == [4, 16, 28]


@pytest.mark.slow
def test_a_multi_source_run_logs_each_sources_validation_loss(tmp_path):
    corpus = tmp_path / "babylm"
    write_babylm_folder(corpus, 60_000)
    sets = {"data.source_field": None, "data.lines_per_document": 20, "train.eval_every": 4}
    args = tiny_run_args(corpus, tmp_path / "cache", 4, **sets)
    result = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = [r for r in records if "val_loss" in r and r["step"] == 4][0]
    per_source = {k.removeprefix("val_loss/"): v for k, v in validated.items() if k.startswith("val_loss/")}
    assert len(per_source) >= 3 and set(per_source) <= {
        "childes",
        "gutenberg",
        "open_subtitles",
        "simple_wiki",
        "bnc_spoken",
        "switchboard",
    }
    # the total lies within the sources' range (it is their token-weighted mean)
    assert min(per_source.values()) - 1e-3 <= validated["val_loss"] <= max(per_source.values()) + 1e-3
    # lmp runs shows them too (--json keeps the numbers; the table one column of them)
    shown = CliRunner().invoke(app, ["runs", str(tmp_path / "run"), "--json"])
    row = json.loads(shown.output.splitlines()[0])
    assert row["val_loss_by_source"] == per_source
    wide = CliRunner().invoke(app, ["runs", str(tmp_path / "run")], terminal_width=300)
    name = sorted(per_source)[0]
    assert "val by source" in wide.output and f"{name} {per_source[name]:.3f}" in wide.output


def test_the_per_source_losses_come_from_the_same_passes_as_the_total():
    import torch
    import torch.nn.functional as F

    from lm_pretrain.model.decoder import Decoder, DecoderConfig
    from lm_pretrain.train.forward import make_accelerator, validation_loss, validation_losses

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2))
    batches = [(torch.randint(0, 64, (3, 8)), torch.randint(0, 64, (3, 8))) for _ in range(2)]
    batches[1][1][0, :3] = -100  # ignored targets count for no source
    sources = [torch.randint(0, 2, (3, 8)) for _ in range(2)]
    accelerator = make_accelerator("fp32")
    total, by_source = validation_losses(model, batches, accelerator, None, sources, ["a", "b", "never"])
    assert total == validation_loss(model, batches, accelerator)
    with torch.no_grad():
        losses = torch.cat(
            [
                F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="none")
                for x, y in batches
            ]
        )
    ids, scored = (
        torch.cat([s.flatten() for s in sources]),
        torch.cat([y.flatten() for _, y in batches]) != -100,
    )
    assert set(by_source) == {"a", "b"}  # a source with no scored target is left out
    for k, name in enumerate(["a", "b"]):
        assert by_source[name] == pytest.approx(losses[scored & (ids == k)].mean().item(), rel=1e-5)
    assert total == pytest.approx(losses[scored].mean().item(), rel=1e-5)
