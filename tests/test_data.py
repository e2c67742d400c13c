"""Corpus readers, the demo corpus, the split, tokenizers, token shards and the prepare cache."""

from __future__ import annotations

import gzip
import io
import json
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from tokenizers import Tokenizer

from lm_pretrain.data.builtin import demo_documents
from lm_pretrain.data.corpus import (
    Document,
    corpus_fingerprint,
    read_corpus,
    split_documents,
    word_counts,
)
from lm_pretrain.data.prepare import prepare_data
from lm_pretrain.data.shards import open_shard
from lm_pretrain.data.tokenizer import (
    load_tokenizer,
    save_hf_tokenizer,
    special_token_ids,
    train_tokenizer,
)
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import DataConfig, TokenizerConfig, validate_recipe

SAMPLES = [
    "And God said, Let there be light: and there was light.",
    "Naïve café owners in Zürich say “hello” — 你好, мир! 👋🏽\n\ttabs  and  double  spaces ",
    "",
    " leading space and trailing newline\n",
]


@pytest.fixture(scope="module")
def demo() -> list[Document]:
    return demo_documents()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, demo) -> Path:
    """A few hundred KB of real English from all three demo sources, as jsonl."""
    by_source: dict[str, list[Document]] = {}
    for doc in demo:
        by_source.setdefault(doc.source, []).append(doc)
    picked = by_source["bible_bbe"][:50] + by_source["dialogue"][:300] + by_source["python_docs"][:8]
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with open(path, "w") as f:
        for i, doc in enumerate(picked):
            f.write(json.dumps({"text": doc.text, "origin": doc.source, "id": i}) + "\n")
    assert 150_000 < path.stat().st_size < 600_000
    return path


@pytest.fixture(scope="module")
def small_tokenizer(small_corpus) -> Tokenizer:
    docs = read_corpus(DataConfig(path=str(small_corpus)))
    return train_tokenizer((d.text for d in docs), TokenizerConfig(vocab_size=512))


def _recipe(corpus: Path, cache: Path | None, vocab_size: int = 512, **data):
    data = {"path": str(corpus), "source_field": "origin", **data}
    if cache is not None:
        data["cache_dir"] = str(cache)
    return validate_recipe({"name": "t", "data": data, "tokenizer": {"vocab_size": vocab_size}})


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


# ---------------------------------------------------------------- corpus readers


def test_text_folder_reader(tmp_path):
    root = tmp_path / "texts"
    (root / "train").mkdir(parents=True)
    (root / "dev").mkdir()
    chunk = DataConfig().lines_per_document
    lines = [f"utterance number {i}" for i in range(chunk * 2 + 50)]
    (root / "train" / "childes.train").write_text("\n".join(lines) + "\n")
    (root / "dev" / "childes.dev").write_text("one line only\n")
    (root / "train" / "stories.txt").write_text(
        "First story.\n\nIts second paragraph.\n\n\nSecond story.\r\n\n\n\n\nThird story.\n"
    )
    (root / "train" / ".hidden.txt").write_text("never read")
    (root / "empty.txt").write_text("\n\n")

    docs = read_corpus(DataConfig(path=str(root), format="text"))
    # sorted paths: dev/childes.dev, empty.txt, train/childes.train, train/stories.txt
    assert [d.source for d in docs] == ["childes"] * 4 + ["stories"] * 3
    assert docs[0].text == "one line only"
    chunks = [d.text.split("\n") for d in docs[1:4]]
    assert [len(c) for c in chunks] == [chunk, chunk, 50]
    assert sum(chunks, []) == lines
    assert [d.text for d in docs[4:]] == [
        "First story.\n\nIts second paragraph.",
        "Second story.",
        "Third story.",
    ]
    assert word_counts(docs) == {"childes": 3 * len(lines) + 3, "stories": 9}


def test_single_text_file_is_one_source(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Call me Ishmael.\nSome years ago.\n")
    docs = read_corpus(DataConfig(path=str(path)))
    assert docs == [Document("Call me Ishmael.\nSome years ago.", "book")]


def test_jsonl_reader(tmp_path):
    path = tmp_path / "mix.jsonl"
    rows = [
        {"text": "Hello there.", "src": "chat", "id": 7, "lang": "en", "tags": ["x"]},
        {"text": "  ", "src": "chat"},
        {"text": "A story.", "src": "books", "score": 0.5},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = read_corpus(DataConfig(path=str(path), source_field="src"))
    assert [(d.text, d.source) for d in docs] == [("Hello there.", "chat"), ("A story.", "books")]
    assert docs[0].meta == {"id": "7", "lang": "en"}  # lists are not kept
    assert docs[1].meta == {"score": "0.5"}
    # without source_field the file name is the source, and "src" is kept as meta
    docs = read_corpus(DataConfig(path=str(path)))
    assert {d.source for d in docs} == {"mix"}
    assert docs[1].meta["src"] == "books"
    # a folder holding only jsonl files is read as jsonl
    assert len(read_corpus(DataConfig(path=str(tmp_path)))) == 2
    # a byte-order mark (Windows editors) is not part of the first line
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_corpus(DataConfig(path=str(path), source_field="src"))[0].text == "Hello there."
    # a null source is named, not read as a source called "None"
    path.write_text(json.dumps({"text": "x", "src": None}) + "\n")
    with pytest.raises(LmpError, match=r"mix.jsonl:1: the source field 'src' is null"):
        read_corpus(DataConfig(path=str(path), source_field="src"))


def test_jsonl_missing_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "oops", "id": 2}\n')
    with pytest.raises(LmpError) as err:
        read_corpus(DataConfig(path=str(path)))
    msg = str(err.value)
    assert f"{path}:2" in msg and "'text'" in msg and "body, id" in msg and "data.text_field" in msg
    # naming the right field fixes it
    with pytest.raises(LmpError, match=":1: no text field 'body'"):
        read_corpus(DataConfig(path=str(path), text_field="body"))


def test_jsonl_bad_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n')
    with pytest.raises(LmpError, match=rf"{re.escape(str(path))}:3: not valid JSON"):
        read_corpus(DataConfig(path=str(path)))


def test_damaged_gzip_is_named(tmp_path):
    whole = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    with pytest.raises(LmpError, match=r"cut\.jsonl\.gz is a damaged gzip file"):
        read_corpus(DataConfig(path=str(tmp_path / "cut.jsonl.gz")))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notgz.txt.gz").write_bytes(b"plain text, not gzip\n")
    with pytest.raises(LmpError, match=r"notgz\.txt\.gz is a damaged gzip file"):
        read_corpus(DataConfig(path=str(tmp_path / "texts")))


def test_corpus_path_errors(tmp_path):
    with pytest.raises(LmpError, match="does not exist.*builtin:demo"):
        read_corpus(DataConfig(path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmpError, match="empty folder"):
        read_corpus(DataConfig(path=str(tmp_path / "empty")))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n")
    with pytest.raises(LmpError, match="no documents"):
        read_corpus(DataConfig(path=str(tmp_path / "blank")))
    with pytest.raises(LmpError, match="builtin:demo"):
        read_corpus(DataConfig(path="builtin:wikipedia"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LmpError, match="not UTF-8"):
        read_corpus(DataConfig(path=str(tmp_path / "bin")))


def test_builtin_demo(demo):
    counts = word_counts(demo)
    assert list(counts) == ["bible_bbe", "dialogue", "python_docs"]
    assert sum(counts.values()) > 500_000
    assert counts["bible_bbe"] > 700_000 and counts["dialogue"] > 20_000 and counts["python_docs"] > 30_000
    bible = [d for d in demo if d.source == "bible_bbe"]
    assert 1100 < len(bible) < 1300  # one document per chapter (the Bible has 1189)
    assert bible[0].text.startswith("At the first God made the heaven and the earth. And the earth")
    assert not any(re.search(r"\d", d.text) for d in bible)  # verse numbers and tags removed
    assert all(d.text.strip() == d.text and d.text for d in demo)
    assert corpus_fingerprint(demo_documents()) == corpus_fingerprint(demo)  # deterministic


# ---------------------------------------------------------------- split, counts, fingerprint


def test_split_deterministic_disjoint_order_free(demo):
    docs = demo[::3]
    train, val = split_documents(docs, 0.05)
    assert len(val) == math.ceil(0.05 * len(docs)) and len(train) + len(val) == len(docs)
    assert not set(train) & set(val)
    assert train == [d for d in docs if d in set(train)]  # original order kept
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = split_documents(shuffled, 0.05)
    assert set(val2) == set(val) and set(train2) == set(train)
    assert split_documents(docs, 0.05) == (train, val)
    # every source is represented in a big enough validation split
    assert {d.source for d in split_documents(demo, 0.05)[1]} == {"bible_bbe", "dialogue", "python_docs"}


def test_split_edge_cases():
    a, b, c = Document("a", "s"), Document("b", "s"), Document("c", "s")
    assert split_documents([a], 0.2) == ([a], [])
    train, val = split_documents([a, b], 0.01)
    assert len(val) == 1 and len(train) == 1
    assert split_documents([a, b, c], 0.0) == ([a, b, c], [])
    # exact duplicates never straddle the split
    docs = [a, b, c, Document("a", "s"), Document("b", "s"), Document("c", "s")]
    train, val = split_documents(docs, 0.1)
    assert not set(train) & set(val)


def test_word_counts_and_fingerprint():
    docs = [Document("one two  three\nfour", "x"), Document("five", "y"), Document("six", "x")]
    assert word_counts(docs) == {"x": 5, "y": 1}
    fp = corpus_fingerprint(docs)
    assert fp == corpus_fingerprint(list(docs))
    assert fp != corpus_fingerprint(docs[::-1])
    assert corpus_fingerprint([Document("ab", "s"), Document("c", "s")]) != corpus_fingerprint(
        [Document("a", "s"), Document("bc", "s")]
    )
    assert corpus_fingerprint([Document("t", "ab")]) != corpus_fingerprint([Document("bt", "a")])


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(small_tokenizer):
    tok = small_tokenizer
    cfg = TokenizerConfig(vocab_size=512)
    assert tok.get_vocab_size() == 512
    assert special_token_ids(tok, cfg) == {"pad": 0, "bos": 1, "eos": 2, "mask": 3}
    for text in SAMPLES:
        ids = tok.encode(text).ids
        assert ids[0] == 1 and 1 not in ids[1:] and 2 not in ids
        assert tok.decode(ids) == text
    # merges were learned: common English compresses well below one token per byte
    english = SAMPLES[0]
    assert len(tok.encode(english).ids) < len(english.encode()) / 2


def test_long_runs_without_spaces_are_cut_before_bpe(small_tokenizer):
    # one 250-character "word" (base64, minified code) must not become one BPE piece: training
    # time grows with the square of a piece's length
    pieces = small_tokenizer.pre_tokenizer.pre_tokenize_str("x" * 250 + " and more")
    assert [len(p) for p, _ in pieces] == [100, 100, 50, 4, 5]
    text = "A9z+" * 300
    assert small_tokenizer.decode(small_tokenizer.encode(text).ids) == text  # still round-trips


def test_hf_tokenizer_folder_loads_in_transformers(small_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    cfg = TokenizerConfig(vocab_size=512)
    save_hf_tokenizer(small_tokenizer, tmp_path / "hf", cfg, model_max_length=128)
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.mask_token) == ("<s>", "</s>", "<pad>", "<mask>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (1, 2, 0, 3)
    assert hf.model_max_length == 128
    for text in SAMPLES:
        ids = hf(text)["input_ids"]
        assert ids == small_tokenizer.encode(text).ids
        assert hf.decode(ids, skip_special_tokens=True) == text
    batch = hf(SAMPLES[:2], padding=True)["input_ids"]
    assert batch[0][-1] == 0  # pads with <pad>


def test_load_tokenizer(small_tokenizer, tmp_path):
    cfg = TokenizerConfig(vocab_size=512)
    with pytest.raises(LmpError, match="does not exist"):
        load_tokenizer(tmp_path / "missing", cfg)
    small_tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path, cfg)  # a folder holding tokenizer.json
    assert loaded.encode(SAMPLES[1]).ids == small_tokenizer.encode(SAMPLES[1]).ids
    with pytest.raises(LmpError, match="tokenizer.bos_token"):
        load_tokenizer(tmp_path, TokenizerConfig(bos_token="<|begin|>"))
    # pad and mask tokens a reused tokenizer lacks are appended; its own ids stay as they were
    size = small_tokenizer.get_vocab_size()
    other = load_tokenizer(tmp_path, TokenizerConfig(pad_token="<|pad|>", mask_token="<|mask|>"))
    assert (other.token_to_id("<|pad|>"), other.token_to_id("<|mask|>")) == (size, size + 1)
    assert other.encode(SAMPLES[1]).ids == small_tokenizer.encode(SAMPLES[1]).ids
    # a tokenizer without the BOS post-processor gets it, so shards always start with BOS
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    raw["post_processor"] = None
    (tmp_path / "plain.json").write_text(json.dumps(raw))
    assert Tokenizer.from_file(str(tmp_path / "plain.json")).encode("hi").ids[0] != 1
    assert load_tokenizer(tmp_path / "plain.json", cfg).encode("hi").ids[0] == 1
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(LmpError, match="could not be read"):
        load_tokenizer(tmp_path / "junk.json")


# ---------------------------------------------------------------- shards and the prepare cache


def test_a_vocabulary_the_corpus_cannot_fill_is_reported(small_corpus, tmp_path):
    out = _quiet()
    data = prepare_data(_recipe(small_corpus, tmp_path / "cache", vocab_size=60_000), console=out)
    n = data.tokenizer.get_vocab_size()
    assert n < 60_000
    assert f"only {n:,} of tokenizer.vocab_size 60,000" in out.file.getvalue().replace("\n", " ")


def test_prepare_builds_then_reuses(small_corpus, tmp_path):
    recipe = _recipe(small_corpus, tmp_path / "cache")
    out = _quiet()
    first = prepare_data(recipe, console=out, show_progress=False)
    assert not first.reused
    assert first.cache_dir.parent == tmp_path / "cache" / "shards"
    assert first.tokenizer_path.is_file() and first.tokenizer.get_vocab_size() == 512

    docs = read_corpus(recipe.data)
    train_docs, val_docs = split_documents(docs, recipe.data.validation_fraction)
    assert first.train.n_docs == len(train_docs) and first.val.n_docs == len(val_docs) >= 1
    assert first.word_counts["train"] == word_counts(train_docs)
    assert first.train.sources == ["bible_bbe", "dialogue", "python_docs"]
    assert first.train.tokens.dtype == np.uint16
    # every document is BOS + encoding + EOS, and decodes back to its text
    offsets, tokens = first.train.doc_offsets, first.train.tokens
    assert offsets[0] == 0 and offsets[-1] == first.train.n_tokens
    assert (tokens[offsets[:-1]] == 1).all() and (tokens[offsets[1:] - 1] == 2).all()
    for i in (0, len(train_docs) // 2, len(train_docs) - 1):
        ids = tokens[offsets[i] : offsets[i + 1]].tolist()
        assert first.tokenizer.decode(ids) == train_docs[i].text
        assert first.train.sources[first.train.doc_sources[i]] == train_docs[i].source
    counts = np.bincount(np.asarray(tokens), minlength=512)
    p = counts[counts > 0] / counts.sum()
    assert first.unigram_entropy == pytest.approx(float(-(p * np.log(p)).sum()))
    assert 0 < first.unigram_entropy < math.log(512)

    out = _quiet()
    second = prepare_data(recipe, console=out, show_progress=False)
    assert second.reused and second.cache_dir == first.cache_dir
    assert "reused" in out.file.getvalue()
    assert np.array_equal(second.train.tokens, first.train.tokens)
    assert np.array_equal(second.val.tokens, first.val.tokens)
    assert second.unigram_entropy == first.unigram_entropy
    assert not list((tmp_path / "cache" / "shards").glob(".tmp-*"))  # temp build folders removed

    other = prepare_data(_recipe(small_corpus, tmp_path / "cache", vocab_size=600), _quiet(), False)
    assert not other.reused
    assert other.cache_dir != first.cache_dir and other.tokenizer_path != first.tokenizer_path
    assert other.tokenizer.get_vocab_size() == 600

    moved = prepare_data(_recipe(small_corpus, tmp_path / "cache", validation_fraction=0.2), _quiet(), False)
    assert moved.cache_dir != first.cache_dir and moved.val.n_docs > first.val.n_docs


def test_prepare_uses_lmp_cache_env(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LMP_CACHE", str(tmp_path / "envcache"))
    prepared = prepare_data(_recipe(small_corpus, None), _quiet(), False)
    assert prepared.cache_dir.parent == tmp_path / "envcache" / "shards"
    assert prepared.tokenizer_path.parent.parent == tmp_path / "envcache" / "tokenizers"


def test_prepare_with_given_tokenizer(small_corpus, small_tokenizer, tmp_path):
    small_tokenizer.save(str(tmp_path / "given.json"))
    raw = validate_recipe(
        {
            "name": "t",
            "data": {"path": str(small_corpus), "cache_dir": str(tmp_path / "cache")},
            "tokenizer": {"path": str(tmp_path / "given.json"), "vocab_size": 9999},
        }
    )
    prepared = prepare_data(raw, _quiet(), False)
    assert prepared.tokenizer.get_vocab_size() == 512
    assert prepared.tokenizer.encode(SAMPLES[1]).ids == small_tokenizer.encode(SAMPLES[1]).ids


def test_corrupt_shards_are_reported(small_corpus, tmp_path):
    recipe = _recipe(small_corpus, tmp_path / "cache")
    folder = prepare_data(recipe, _quiet(), False).cache_dir
    tokens = folder / "train.tokens.bin"
    original = tokens.read_bytes()

    tokens.write_bytes(original[:-10])
    with pytest.raises(LmpError) as err:
        prepare_data(recipe, _quiet(), False)
    msg = str(err.value)
    assert "truncated" in msg and str(tokens) in msg and f"expected {len(original)} bytes" in msg
    assert f"delete the cache folder {folder} and run the same command again" in msg
    # following the advice works
    shutil.rmtree(folder)
    assert prepare_data(recipe, _quiet(), False).train.n_tokens == len(original) // 2

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    tokens.write_bytes(bytes(flipped))
    with pytest.raises(LmpError, match=r"train\.tokens\.bin is corrupt: blake2b checksum mismatch"):
        open_shard(folder, "train")
    open_shard(folder, "train", verify=False)  # sizes still match: only the checksum catches it

    tokens.write_bytes(original)
    assert open_shard(folder, "train").n_tokens == len(original) // 2

    tok_file = prepare_data(recipe, _quiet(), False).tokenizer_path
    tok_file.write_text("{damaged")
    with pytest.raises(
        LmpError, match=f"cached tokenizer is damaged.*delete the cache folder {tok_file.parent}"
    ):
        prepare_data(recipe, _quiet(), False)

    meta = json.loads((folder / "meta.json").read_text())
    meta["complete"] = False
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LmpError, match="incomplete"):
        open_shard(folder, "train")
    (folder / "meta.json").unlink()
    with pytest.raises(LmpError, match="never finished"):
        open_shard(folder, "val")


def test_prepare_without_validation_split(small_corpus, tmp_path):
    prepared = prepare_data(
        _recipe(small_corpus, tmp_path / "cache", validation_fraction=0.0), _quiet(), False
    )
    assert prepared.val.n_docs == 0 and prepared.val.n_tokens == 0
    assert prepared.word_counts["val"] == {}
    assert prepared.train.n_docs == len(read_corpus(DataConfig(path=str(small_corpus))))
    again = prepare_data(_recipe(small_corpus, tmp_path / "cache", validation_fraction=0.0), _quiet(), False)
    assert again.reused and again.val.n_tokens == 0


def test_a_cache_meta_of_the_wrong_json_shape_is_named(tmp_path):
    from lm_pretrain.data.shards import META

    (tmp_path / META).write_text("[1]")
    with pytest.raises(LmpError, match="damaged \\(not a JSON object\\); delete the cache folder"):
        open_shard(tmp_path, "train")
