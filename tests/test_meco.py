"""Metadata conditioning then cooldown (MeCo): prefixes, no loss on them, the cooldown switch."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_run_args
from lm_pretrain.cli import app
from lm_pretrain.data.corpus import Document
from lm_pretrain.data.loader import IGNORE_INDEX, PackedWindows
from lm_pretrain.data.metadata import domain, with_metadata
from lm_pretrain.data.shards import build_shards, open_shard
from lm_pretrain.data.tokenizer import special_token_ids, train_tokenizer
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import MetadataConfig, TokenizerConfig


def test_prefixes_from_source_and_url_fields():
    docs = [Document("Hello there.", "childes", {"url": "https://www.example.org/a/b?c=1"})]
    assert with_metadata(docs, MetadataConfig())[0].prefix == "childes\n\n"
    url = with_metadata(docs, MetadataConfig(field="url", kind="url"))[0]
    assert url.prefix == "URL: www.example.org\n\n"
    assert url.text == "Hello there." and url.source == "childes"
    assert domain("en.wikipedia.org/wiki/Cat") == "en.wikipedia.org"
    with pytest.raises(LmpError, match="fields found: source, url"):
        with_metadata(docs, MetadataConfig(field="topic"))


def test_prefix_tokens_are_inputs_but_never_targets(tmp_path):
    texts = ["the cat sat on the mat", "a dog ran in the park", "we like to read books"] * 30
    docs = [Document(t, "childes" if i % 2 else "gutenberg") for i, t in enumerate(texts)]
    tcfg = TokenizerConfig(vocab_size=300, min_frequency=1)
    tok = train_tokenizer(texts, tcfg)
    ids = special_token_ids(tok, tcfg)
    prefixed = with_metadata(docs, MetadataConfig())
    build_shards(
        {"train_meta": prefixed}, tok, tmp_path, bos_id=ids["bos"], eos_id=ids["eos"], show_progress=False
    )
    shard = open_shard(tmp_path, "train_meta")
    first_prefix = tok.encode(prefixed[0].prefix, add_special_tokens=False).ids
    first_text = tok.encode(texts[0], add_special_tokens=False).ids
    start, end = shard.doc_offsets[0], shard.doc_offsets[1]
    assert shard.tokens[start:end].tolist() == [ids["bos"], *first_prefix, *first_text, ids["eos"]]
    assert shard.prefix_lengths[0] == len(first_prefix)

    windows = PackedWindows(shard.tokens, 16, 0, ids["bos"], shard.doc_offsets, shard.prefix_lengths)
    plain = PackedWindows(shard.tokens, 16, 0, ids["bos"])
    for sample in range(windows.windows_per_epoch):
        inputs, targets = windows.batch(sample, 1)
        _, plain_targets = plain.batch(sample, 1)
        start = windows.start(sample)
        for t in range(16):
            pos = start + 1 + t  # the stream position of target t
            doc = np.searchsorted(shard.doc_offsets, pos, side="right") - 1
            into = pos - shard.doc_offsets[doc]
            in_prefix = 1 <= into <= shard.prefix_lengths[doc]
            expected = IGNORE_INDEX if in_prefix else plain_targets[0, t].item()
            assert targets[0, t].item() == expected


@pytest.mark.slow
def test_meco_run_switches_to_plain_documents_for_the_cooldown(bible_corpus, tmp_path):
    run = tmp_path / "run"
    extra = {"data.metadata": "{field: source, cooldown_fraction: 0.25}", "train.eval_every": 10}
    result = CliRunner().invoke(
        app, ["train", *tiny_run_args(bible_corpus, tmp_path / "cache", 20, **extra), "--out", str(run)]
    )
    assert result.exit_code == 0, result.output
    assert "step 15: metadata cooldown begins" in result.output
    assert "--prefix '<value>\\n\\n'" in result.output  # the done message shows how to steer it
    vals = [
        r["val_loss"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "val_loss" in r
    ]
    assert vals[-1] < vals[0] - 0.5
    out = CliRunner().invoke(
        app,
        [
            "generate",
            str(run / "final"),
            "--prefix",
            "bible_bbe\\n\\n",
            "--prompt",
            "And",
            "--max-new-tokens",
            "5",
        ],
    )
    assert out.exit_code == 0 and out.output.startswith("And") and "bible_bbe" not in out.output
