"""lmp eval: task readers, the official scoring rules, ties, aggregation, probe, perplexity, CLI."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lm_pretrain.cli import app
from lm_pretrain.data.builtin import demo_documents
from lm_pretrain.errors import LmpError
from lm_pretrain.eval.probe import PHENOMENA, probe_items
from lm_pretrain.eval.report import judge, write_predictions
from lm_pretrain.eval.runner import evaluate, score_items
from lm_pretrain.eval.scoring import load_scoring_model, score_candidates, score_one_at_a_time
from lm_pretrain.eval.tasks import Item, load_task, read_blimp, read_entity_tracking, read_ewok

ROOT = Path(__file__).resolve().parents[1]
SHARED_BLIMP = ROOT.parent / "shared" / "data" / "blimp"


def need_blimp() -> Path:
    if not SHARED_BLIMP.is_dir():
        pytest.skip(f"BLiMP data not found at {SHARED_BLIMP} (../shared is absent)")
    return SHARED_BLIMP


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def blimp_subset(dst: Path, names: list[str], rows: int) -> Path:
    """The first `rows` pairs of some original BLiMP files, in a temporary folder."""
    src = need_blimp()
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        lines = (src / f"{name}.jsonl").read_text().splitlines()[:rows]
        (dst / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny model trained for a few seconds on real English (the demo corpus's Bible text)."""
    root = tmp_path_factory.mktemp("evalrun")
    docs = [d for d in demo_documents() if d.source == "bible_bbe"][:120]
    corpus = write_jsonl(root / "bible.jsonl", [{"text": d.text, "source": d.source} for d in docs])
    sets = {
        "data.path": corpus,
        "data.source_field": "source",
        "data.validation_fraction": 0.05,
        "data.cache_dir": root / "cache",
        "tokenizer.vocab_size": 512,
        "model.hidden_size": 64,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.max_seq_len": 64,
        "train.batch_size": 16,
        "train.micro_batch_size": 16,
        "train.max_steps": 40,
        "train.log_every": 10,
        "train.eval_every": 40,
        "train.eval_tokens": 2048,
        "checkpoint.every": 40,
        "optim.lr": 3e-3,
        "train.precision": "fp32",
        "train.compile": "false",
    }
    args = ["train", str(ROOT / "recipes/demo.yaml"), "--out", str(root / "run")]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root / "run"


@pytest.fixture(scope="module")
def causal(tiny_run):
    return load_scoring_model(tiny_run / "final", "causal", device="cpu")


# ---------------------------------------------------------------- readers


def test_reads_original_blimp_release():
    items = read_blimp(need_blimp())
    uids = {i.uid for i in items}
    assert len(uids) == 67 and len(items) == 67_000
    first = items[0]
    assert first.sentences[0] != first.sentences[1] and first.completions == first.sentences
    assert first.pair_id == "0"  # pairID in the original release
    assert {i.field for i in items} == {"morphology", "syntax", "semantics", "syntax/semantics"}


def test_reads_filtered_layout_and_fast_subsets(tmp_path):
    row = {"sentence_good": "Dogs bark.", "sentence_bad": "Dogs barks.", "field": "morphology",
           "linguistics_term": "agreement", "UID": "sva", "pair_id": 7}  # fmt: skip
    write_jsonl(tmp_path / "evaluation_data/full_eval/blimp_filtered/sva.jsonl", [row, row])
    write_jsonl(tmp_path / "evaluation_data/fast_eval/blimp_fast/sva.jsonl", [row])
    folder, items = load_task("blimp", tmp_path)
    assert folder.name == "blimp_filtered" and len(items) == 2 and items[0].pair_id == "7"
    folder, items = load_task("blimp", tmp_path / "evaluation_data", fast=True)
    assert folder.name == "blimp_fast" and len(items) == 1


def test_supplement_ewok_entity_tracking_layouts(tmp_path):
    full = tmp_path / "full_eval"
    write_jsonl(
        full / "supplement_filtered/hypernym.jsonl", [{"sentence_good": "A b.", "sentence_bad": "B a."}]
    )
    ewok = {"Context1": "The cup is on the table.", "Context2": "x", "Target1": "The cup is up.",
            "Target2": "The cup is down.", "Domain": "spatial-relations", "ContextType": "t",
            "ContextDiff": "d", "TargetDiff": "d"}  # fmt: skip
    write_jsonl(full / "ewok_filtered/spatial-relations.jsonl", [ewok])
    entity = {"input_prefix": "Box 1 has a key. Box 1 has", "options": [" a key.", " nothing.", " a map."],
              "numops": 0}  # fmt: skip
    write_jsonl(full / "entity_tracking/regular.jsonl", [entity])

    _, supplement = load_task("blimp_supplement", tmp_path)
    assert supplement[0].uid == "hypernym" and supplement[0].field == "supplement"
    (item,) = read_ewok(full / "ewok_filtered")
    assert item.uid == "spatial-relations"
    assert item.sentences == (
        "The cup is on the table. The cup is up.",
        "The cup is on the table. The cup is down.",
    )
    assert item.completions == (" The cup is up.", " The cup is down.")
    (item,) = read_entity_tracking(full / "entity_tracking")
    assert item.uid == "regular_0_ops" and len(item.sentences) == 3
    assert item.sentences[1] == "Box 1 has a key. Box 1 has nothing."


def test_missing_and_malformed_files_name_the_problem(tmp_path):
    with pytest.raises(LmpError, match="no data for task ewok"):
        load_task("ewok", tmp_path)
    bad = tmp_path / "blimp_filtered" / "x.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"sentence_good": "a"}\n{not json\n')
    with pytest.raises(LmpError, match=r"x\.jsonl:2: not valid JSON"):
        load_task("blimp", tmp_path)
    bad.write_text('{"sentence_good": "a", "UID": "u", "field": "f"}\n')
    with pytest.raises(LmpError, match=r"x\.jsonl: row 1 lacks field\(s\) sentence_bad"):
        load_task("blimp", tmp_path)


# ---------------------------------------------------------------- decisions and aggregation


def test_ties_count_as_correct_by_default_and_wrong_in_strict_mode():
    items = [
        Item("a", ("s", "s"), ("s", "s")),
        Item("a", ("x", "y"), ("x", "y")),
        Item("b", ("p", "q"), ("p", "q")),
    ]
    scores = [np.array([-3.0, -3.0]), np.array([-1.0, -2.0]), np.array([-5.0, -4.0])]
    default = judge("blimp", "", items, scores)
    strict = judge("blimp", "", items, scores, strict_ties=True)
    assert default.ties == strict.ties == 1
    assert default.uids["a"].correct == 2 and strict.uids["a"].correct == 1
    # unweighted mean over UIDs, not over items
    assert default.mean == pytest.approx((100.0 + 0.0) / 2)
    assert strict.mean == pytest.approx((50.0 + 0.0) / 2)
    assert default.predictions["b"] == [{"id": "b_0", "pred": "q"}]


def test_entity_tracking_averages_uids_within_subsets_then_subsets():
    def item(uid, field):
        return Item(uid, ("a", "b"), ("a", "b"), field)

    items = [
        item("regular_0_ops", "regular"),
        item("regular_1_ops", "regular"),
        item("ambiref_0_ops", "ambiref"),
    ]
    scores = [np.array([0.0, -1.0]), np.array([-1.0, 0.0]), np.array([0.0, -1.0])]
    result = judge("entity_tracking", "", items, scores)
    assert result.mean == pytest.approx((50.0 + 100.0) / 2)  # not (100 + 0 + 100) / 3


def test_predictions_use_the_official_layout(tmp_path):
    items = [Item("u", ("good", "bad"), ("good", "bad"))] * 2
    result = judge("blimp", "", items, [np.array([0.0, -1.0]), np.array([-2.0, -1.0])])
    (path,) = write_predictions(tmp_path, [result])
    assert json.loads(path.read_text()) == {
        "u": {"predictions": [{"id": "u_0", "pred": "good"}, {"id": "u_1", "pred": "bad"}]}
    }


# ---------------------------------------------------------------- scoring rules (trained model)


def direct_logprobs(sm, text: str) -> list[float]:
    """log p of every token after the first, straight from the model, one sentence."""
    ids = sm.tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = sm.model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    return [float(logprobs[j - 1, ids[j]]) for j in range(1, len(ids))]


def test_causal_whole_sentence_scores_every_token_after_bos(causal):
    sentence = "And God said, Let there be light."
    ids = causal.tokenizer(sentence)["input_ids"]
    assert ids[0] == causal.tokenizer.bos_token_id  # lmp tokenizers add BOS ...
    expected = sum(direct_logprobs(causal, sentence))  # ... so the first word is scored too
    (score,) = score_candidates(causal, [sentence], [sentence])
    assert score == pytest.approx(expected, abs=1e-4)


def test_causal_completion_scores_only_the_target(causal):
    context, target = "The man went into the house.", " And he was glad."
    whole = sum(direct_logprobs(causal, context + target))
    context_only = sum(direct_logprobs(causal, context))
    (score,) = score_candidates(causal, [context + target], [target])
    assert score == pytest.approx(whole - context_only, abs=1e-4)
    assert score > whole  # the context's own log-probability is left out


def test_batched_scores_equal_one_at_a_time(causal):
    items = probe_items(seed=3, per_phenomenon=12)
    sentences = [s for i in items for s in i.sentences]
    batched = score_candidates(causal, sentences, sentences, token_budget=256)
    reference = score_one_at_a_time(causal, sentences, sentences)
    np.testing.assert_allclose(batched, reference, atol=1e-4)
    split = len(sentences) // 2
    assert np.array_equal(batched[0::2] >= batched[1::2], reference[0::2] >= reference[1::2])
    assert split > 50


def test_blimp_on_real_data_and_identical_sentences_tie(causal, tmp_path):
    folder = blimp_subset(tmp_path / "blimp", ["determiner_noun_agreement_1", "anaphor_number_agreement"], 40)
    items = read_blimp(folder) + [Item("same", ("The man is here.",) * 2, ("The man is here.",) * 2, "x")]
    result = judge("blimp", str(folder), items, score_items(causal, items))
    assert result.ties >= 1 and result.uids["same"].correct == 1
    assert {u: s.n for u, s in result.uids.items()} == {
        "determiner_noun_agreement_1": 40, "anaphor_number_agreement": 40, "same": 1}  # fmt: skip


def masked_model(tiny_run: Path, tmp_path: Path) -> Path:
    """A small randomly initialised BERT with the run's tokenizer (it has a mask token)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    folder = tmp_path / "bert"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes((tiny_run / "final" / name).read_bytes())
    cfg = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertForMaskedLM(cfg).save_pretrained(folder)
    return folder


def test_mlm_and_mntp_pseudo_log_likelihood(tiny_run, tmp_path):
    folder = masked_model(tiny_run, tmp_path)
    sentences = ["The man is here.", "The men is here.", "God made the light good and sad."]
    completions = [sentences[0], sentences[1], " good and sad."]
    mlm = load_scoring_model(folder, "mlm", device="cpu")
    mntp = load_scoring_model(folder, "mntp", device="cpu")
    for sm in (mlm, mntp):
        np.testing.assert_allclose(
            score_candidates(sm, sentences, completions),
            score_one_at_a_time(sm, sentences, completions),
            atol=1e-4,
        )
    # a masked LM under the default causal backend: refused with the backend that fits
    result = CliRunner().invoke(app, ["eval", str(folder), "--tasks", "probe"])
    assert result.exit_code == 2 and "use --backend mntp or mlm" in result.output, result.output
    # by hand for mlm: mask each word token in turn, read the prediction at its own position
    ids = mlm.tokenizer(sentences[0])["input_ids"]
    expected = 0.0
    for j in range(1, len(ids)):
        masked = torch.tensor([ids])
        masked[0, j] = mlm.tokenizer.mask_token_id
        with torch.no_grad():
            logits = mlm.model(input_ids=masked).logits[0, j]
        expected += float(torch.log_softmax(logits, -1)[ids[j]])
    assert score_candidates(mlm, sentences[:1], sentences[:1])[0] == pytest.approx(expected, abs=1e-4)
    # mntp reads one position earlier, so it gives different numbers on the same model
    assert not np.allclose(
        score_candidates(mlm, sentences, completions), score_candidates(mntp, sentences, completions)
    )


# ---------------------------------------------------------------- probe and perplexity


def test_probe_is_deterministic_and_minimal():
    a, b, c = probe_items(seed=1), probe_items(seed=1), probe_items(seed=2)
    assert a == b and a != c
    assert {i.uid for i in a} == set(PHENOMENA) and len(PHENOMENA) >= 8
    for item in a:
        good, bad = item.sentences
        assert good != bad
        # a minimal pair: the same words except one (or two swapped)
        diff = [(x, y) for x, y in zip(good.split(), bad.split(), strict=True) if x != y]
        assert 1 <= len(diff) <= 2, (good, bad)


def test_validation_perplexity_matches_training_val_loss(causal, tiny_run):
    from lm_pretrain.eval.perplexity import validation_perplexity

    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
    result = validation_perplexity(causal, tiny_run, max_tokens=2048)  # the same windows as training
    assert result["nats_per_token"] == pytest.approx(val_loss, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(val_loss), rel=1e-3)
    assert 0 < result["bits_per_byte"] < result["nats_per_token"] / math.log(2)  # > 1 byte per token


def test_file_perplexity_bits_per_byte(causal, tmp_path):
    from lm_pretrain.eval.perplexity import file_perplexity

    text = "And God said, Let there be light: and there was light. " * 3
    path = tmp_path / "held.txt"
    path.write_text(text)
    result = file_perplexity(causal, path)
    nats = -sum(direct_logprobs(causal, text))
    assert result["tokens"] == len(causal.tokenizer(text)["input_ids"]) - 1
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode()), rel=1e-4)


# ---------------------------------------------------------------- command line


def test_cli_eval_writes_tables_json_and_predictions(tiny_run, tmp_path):
    data = blimp_subset(tmp_path / "blimp", ["regular_plural_subject_verb_agreement_1"], 30)
    out, preds = tmp_path / "scores.json", tmp_path / "preds"
    result = CliRunner().invoke(
        app,
        ["eval", str(tiny_run), "--data-dir", str(data), "--tasks", "blimp,probe,perplexity",
         "--json", str(out), "--predictions", str(preds)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "regular_plural_subject_verb_agreement_1" in result.output and "bits/byte" in result.output
    scores = json.loads(out.read_text())
    uid = scores["tasks"]["blimp"]["uids"]["regular_plural_subject_verb_agreement_1"]
    assert uid["n"] == 30 and uid["accuracy"] == pytest.approx(100.0 * uid["correct"] / 30)
    assert scores["averages"]["blimp"] == uid["accuracy"]
    assert scores["perplexity"]["bits_per_byte"] > 0
    predictions = json.loads((preds / "blimp" / "predictions.json").read_text())
    assert len(predictions["regular_plural_subject_verb_agreement_1"]["predictions"]) == 30


def test_an_empty_task_file_or_a_missing_data_dir_is_named(tmp_path):
    (tmp_path / "adjunct_island.jsonl").write_text("")
    with pytest.raises(LmpError, match="adjunct_island.jsonl holds no rows"):
        load_task("blimp", tmp_path)
    with pytest.raises(LmpError, match="gone does not exist"):
        load_task("blimp", tmp_path / "gone")


def test_cli_eval_reports_a_missing_data_folder(tiny_run, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--tasks", "ewok", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no data for task ewok" in result.output
    with pytest.raises(LmpError, match="need --data-dir"):
        evaluate(tiny_run, ["blimp"])


def test_shared_context_runs_once_and_scores_the_same(causal):
    from lm_pretrain.eval.scoring import _prefix_groups, encode

    story = "And God said, Let there be light: and there was light. And God saw the light, that it was good."
    options = [" And the evening was the first day.", " And he was glad.", " The man went into the house."]
    items = [Item("regular_0_ops", tuple(story + o for o in options), tuple(options), "regular")] * 2
    sentences = [s for i in items for s in i.sentences]
    completions = [c for i in items for c in i.completions]
    groups = _prefix_groups(encode(causal.tokenizer, sentences, completions, "causal"), [3, 3])
    assert sum(len(g) for g in groups.values()) == 1  # the story is one shared prefix (duplicates merged)
    shared = score_candidates(causal, sentences, completions, group_sizes=[3, 3])
    np.testing.assert_allclose(shared, score_one_at_a_time(causal, sentences, completions), atol=1e-4)


def test_token_trees_run_each_shared_prefix_once_and_score_as_one_at_a_time(causal, monkeypatch):
    """Short causal candidates are packed as token trees: every distinct prefix runs once, in rows
    split where they fill, and each candidate scores as it does alone (also one that is a prefix of
    another, two that differ only in their last token, and a lone BOS)."""
    import dataclasses

    from lm_pretrain.eval import scoring

    sentences = [s for item in probe_items(seed=6, per_phenomenon=4) for s in item.sentences]
    story = "And God said, Let there be light: and there was light, and God saw the"
    sentences += [f"{story} {word}." for word in ("light", "land", "sea", "man", "water", "day")]
    sentences += ["The man", "The man is", "The man is here.", "The man is there.", ""]
    reference = score_one_at_a_time(causal, sentences, sentences)
    monkeypatch.setattr(scoring, "TREE_ROW_NODES", 64)

    def scored(tree_scoring: bool | None) -> tuple[np.ndarray, int, bool | None]:
        # the output-layer check (its own test below) is settled first: its one-row passes are not
        # scoring, and whether an earlier test already ran it must not change the count
        sm = dataclasses.replace(causal, tree_scoring=tree_scoring, chunked_head=True)
        tokens = []
        hook = sm.model.register_forward_pre_hook(
            lambda _, args, kwargs: tokens.append(kwargs["input_ids"].numel()), with_kwargs=True
        )
        try:
            return score_candidates(sm, sentences, sentences), sum(tokens), sm.tree_scoring
        finally:
            hook.remove()

    plain, plain_tokens, _ = scored(False)
    trees, tree_tokens, checked = scored(None)
    np.testing.assert_allclose(plain, reference, atol=1e-4)
    np.testing.assert_allclose(trees, reference, atol=1e-4)
    assert checked is True and tree_tokens < 0.8 * plain_tokens, (tree_tokens, plain_tokens)
    encoded = list(
        dict.fromkeys(ids for ids, _ in scoring.encode(causal.tokenizer, sentences, sentences, "causal"))
    )
    assert len(scoring._tree_rows(encoded, list(range(len(encoded))))) > 2  # the rows did split


def test_models_that_ignore_a_tree_mask_are_scored_the_plain_way(causal):
    """A model that drops position ids (or a 4-D mask) fails the first tree's check and is scored
    in plain batches, with the same scores."""
    import dataclasses

    class NoPositions(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.model(input_ids=input_ids, attention_mask=attention_mask)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.model.get_output_embeddings()

    sentences = [s for i in probe_items(seed=5, per_phenomenon=4) for s in i.sentences]
    sm = dataclasses.replace(causal, model=NoPositions(causal.model), tree_scoring=None)
    scores = score_candidates(sm, sentences, sentences)
    assert sm.tree_scoring is False
    np.testing.assert_allclose(scores, score_one_at_a_time(causal, sentences, sentences), atol=1e-4)


def test_the_output_layer_in_chunks_scores_as_the_whole_logits(causal, monkeypatch):
    """The output layer runs on a few positions at a time (chunks that end inside rows and inside
    trees), in plain batches and in token trees alike, and every score is the one-at-a-time one."""
    import dataclasses

    from lm_pretrain.eval import scoring

    monkeypatch.setattr(scoring, "HEAD_CHUNK_ELEMENTS", 7 * causal.vocab_size)
    sentences = [s for item in probe_items(seed=8, per_phenomenon=4) for s in item.sentences]
    sentences += ["The man", "The man is", "The man is here.", "The man is there."]
    reference = score_one_at_a_time(causal, sentences, sentences)
    for tree_scoring in (False, None):
        sm = dataclasses.replace(causal, tree_scoring=tree_scoring, chunked_head=None)
        np.testing.assert_allclose(score_candidates(sm, sentences, sentences), reference, atol=1e-4)
        assert sm.chunked_head is True


def test_a_model_that_scales_its_logits_gets_them_whole(causal):
    """A model that changes its logits after the output layer (as Cohere's logit_scale or Gemma's
    soft-capping do) fails the check and is scored from its own logits."""
    import dataclasses
    from types import SimpleNamespace

    class ScaledLogits(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            return SimpleNamespace(logits=0.5 * self.model(**inputs).logits)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.model.get_output_embeddings()

    sentences = [s for i in probe_items(seed=9, per_phenomenon=3) for s in i.sentences]
    sm = dataclasses.replace(causal, model=ScaledLogits(causal.model), tree_scoring=None, chunked_head=None)
    scores = score_candidates(sm, sentences, sentences)
    assert sm.chunked_head is False
    np.testing.assert_allclose(scores, score_one_at_a_time(sm, sentences, sentences), atol=1e-4)
    assert not np.allclose(scores, score_one_at_a_time(causal, sentences, sentences), atol=1e-2)


def test_only_contexts_longer_than_a_tree_row_use_the_key_value_cache(causal, monkeypatch):
    """Candidates that share a context go to token trees when they fit a row, and through the
    key/value cache when they do not; both score as one at a time."""
    import dataclasses

    from lm_pretrain.eval import scoring

    story = "And God said, Let there be light: and there was light. And God saw the light, that it was good."
    options = [" And the evening was the first day.", " And he was glad.", " The man went into the house."]
    sentences = [story + o for o in options]
    encoded = scoring.encode(causal.tokenizer, sentences, options, "causal")
    longest = max(len(ids) for ids, _ in encoded)
    assert len(scoring._prefix_groups(encoded, [3], min_longest=longest)) == 1
    assert scoring._prefix_groups(encoded, [3], min_longest=longest + 1) == {}
    reference = score_one_at_a_time(causal, sentences, options)
    for row_nodes, cached in ((96, False), (longest // 2, True)):
        monkeypatch.setattr(scoring, "TREE_ROW_NODES", row_nodes)
        sm = dataclasses.replace(causal, tree_scoring=None)
        calls = []
        hook = sm.model.register_forward_pre_hook(
            lambda _, args, kwargs, calls=calls: calls.append(kwargs.get("use_cache", False)),
            with_kwargs=True,
        )
        try:
            scores = score_candidates(sm, sentences, options, group_sizes=[3])
        finally:
            hook.remove()
        np.testing.assert_allclose(scores, reference, atol=1e-4)
        assert any(calls) is cached, (row_nodes, calls)


def test_broken_model_folders_are_named_with_their_fix(tiny_run, tmp_path):
    import shutil

    def broken(name: str, damage) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_run / "final", folder)
        damage(folder)
        return folder

    cases = {
        "no weights": broken("a", lambda f: (f / "model.safetensors").unlink()),
        "is damaged": broken("b", lambda f: os.truncate(f / "model.safetensors", 1000)),
        "cannot be read as JSON": broken("c", lambda f: (f / "config.json").write_text("{bad")),
        "no tokenizer": broken("d", lambda f: [p.unlink() for p in f.glob("tokenizer*")]),
    }
    for named, folder in cases.items():
        for command in (["eval", str(folder), "--tasks", "probe"], ["generate", str(folder)]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2 and named in result.output, (command, result.output)
    # a causal model under a masked backend: the message says which backend fits
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--tasks", "probe", "--backend", "mntp"])
    assert result.exit_code == 2 and "use --backend causal" in result.output


def test_weights_that_would_leave_parameters_random_are_refused(tiny_run, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    def rewritten(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_run / "final", folder)
        tensors = change(load_file(folder / "model.safetensors"))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    cases = {
        "the weights lack 3 tensor(s)": rewritten(
            "missing", lambda t: {k: v for k, v in t.items() if "layers.0.mlp" not in k}
        ),
        "the weights do not fit config.json (model.norm.weight": rewritten(
            "reshaped", lambda t: {**t, "model.norm.weight": torch.ones(t["model.norm.weight"].numel() + 1)}
        ),
    }
    for named, folder in cases.items():
        for command in (["eval", str(folder), "--tasks", "probe"], ["generate", str(folder)]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2 and named in result.output, (command, result.output)


def test_scores_never_overwrite_a_file_that_is_not_earlier_scores(tiny_run, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_run / "final", model)
    config = (model / "config.json").read_text()
    result = CliRunner().invoke(
        app, ["eval", str(model), "--tasks", "probe", "--json", str(model / "config.json")]
    )
    assert result.exit_code == 2 and "will not write over it" in result.output, result.output
    assert (model / "config.json").read_text() == config
    scores = tmp_path / "scores.json"
    for _ in range(2):  # an earlier result is replaced
        result = CliRunner().invoke(app, ["eval", str(model), "--tasks", "probe", "--json", str(scores)])
        assert result.exit_code == 0, result.output


def test_output_paths_are_checked_before_evaluating(tiny_run, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--tasks", "probe", "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output and "accuracy" not in result.output
    result = CliRunner().invoke(
        app, ["eval", str(tiny_run), "--tasks", "probe", "--predictions", str(a_file)]
    )
    assert result.exit_code == 2 and "is a file" in result.output


def test_cli_prefix_newlines_as_in_a_meco_template(tiny_run, tmp_path):
    out = tmp_path / "scores.json"
    args = ["eval", str(tiny_run), "--tasks", "probe", "--prefix", "childes\\n\\n", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["prefix"] == "childes\n\n"


def test_generate_prints_text_verbatim(tiny_run):
    prompt = "In the [/i] beginning [bold]"
    result = CliRunner().invoke(app, ["generate", str(tiny_run), "--prompt", prompt, "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(prompt)


def test_generate_notes_text_past_the_trained_context(tiny_run):
    result = CliRunner().invoke(app, ["generate", str(tiny_run), "--prompt", "The", "--max-new-tokens", "80"])
    assert result.exit_code == 0 and "past the 64 the model was trained on" in result.output, result.output
    result = CliRunner().invoke(app, ["generate", str(tiny_run), "--prompt", "The", "--max-new-tokens", "8"])
    assert result.exit_code == 0 and "trained on" not in result.output


def test_default_tasks_are_those_found_under_data_dir(tmp_path):
    from lm_pretrain.eval.runner import parse_tasks

    assert parse_tasks(None, None) == ["probe", "perplexity"]
    blimp = tmp_path / "blimp"  # a plain folder of BLiMP files: blimp, not the other data tasks
    blimp.mkdir()
    (blimp / "anaphor_number_agreement.jsonl").write_text("{}\n")
    assert parse_tasks(None, blimp) == ["blimp", "probe", "perplexity"]
    layout = tmp_path / "evaluation_data"  # the official layout: each task present is found
    for name in ("full_eval/blimp_filtered", "full_eval/ewok_filtered", "fast_eval/blimp_fast"):
        (layout / name).mkdir(parents=True)
    assert parse_tasks(None, layout) == ["blimp", "ewok", "probe", "perplexity"]
    assert parse_tasks(None, layout, fast=True) == ["blimp", "probe", "perplexity"]
    with pytest.raises(LmpError, match="no data for task blimp"):
        parse_tasks(None, tmp_path / "empty")
    assert parse_tasks("ewok, probe", None) == ["ewok", "probe"]


def test_training_eval_notes_a_full_set_under_fast(tiny_run, tmp_path):
    from lm_pretrain.eval.runner import TrainingEvaluator
    from lm_pretrain.recipe import EvalConfig

    blimp = tmp_path / "blimp"
    blimp.mkdir()
    row = {
        "sentence_good": "Dogs bark.",
        "sentence_bad": "Dogs barks.",
        "UID": "agreement",
        "field": "morphology",
    }
    (blimp / "agreement.jsonl").write_text((json.dumps(row) + "\n") * 3)
    fast = TrainingEvaluator(EvalConfig(tasks=["blimp"], data_dir=str(blimp)), tiny_run / "final", ["causal"])
    assert len(fast.notes) == 1 and "is a full set (3 items)" in fast.notes[0]
    few = EvalConfig(tasks=["blimp"], data_dir=str(blimp), items_per_uid=2)
    assert TrainingEvaluator(few, tiny_run / "final", ["causal"]).notes == []


def test_bf16_scoring_keeps_every_fp32_decision_and_rescores_close_items(causal):
    from lm_pretrain.eval.runner import needs_fp32, score_items_as_set

    items = probe_items(seed=5, per_phenomenon=20)
    items += [Item("same", ("The man is here.",) * 2, ("The man is here.",) * 2, "x")]
    fp32 = score_items(causal, items, precision="fp32")
    bf16 = score_items(causal, items, precision="bf16")
    with torch.autocast("cpu", torch.bfloat16):
        raw = score_items_as_set(causal, items)  # bf16 without the rescoring
    # bf16 ran: scores of items it decided alone differ from fp32's, items too close are fp32's own
    decided = [k for k, x in enumerate(raw) if not needs_fp32(x)]
    close = [k for k, x in enumerate(raw) if needs_fp32(x)]
    assert decided and close and len(items) - 1 in close  # the identical pair ties: always rescored
    assert max(float(np.max(np.abs(bf16[k] - fp32[k]))) for k in decided) > 1e-3
    for k in close:  # fp32 again (in other batches, so equal up to float rounding)
        np.testing.assert_allclose(bf16[k], fp32[k], atol=1e-4)
    assert [int(np.argmax(x)) for x in bf16] == [int(np.argmax(x)) for x in fp32]
    assert judge("probe", "", items, bf16).uids == judge("probe", "", items, fp32).uids


def test_bf16_rescoring_widens_its_margin_where_bf16_is_off_by_more_than_half_of_it(causal, monkeypatch):
    from lm_pretrain.eval import runner

    items = probe_items(seed=5, per_phenomenon=20)
    fp32 = score_items(causal, items, precision="fp32")
    with torch.autocast("cpu", torch.bfloat16):
        raw = runner.score_items_as_set(causal, items)
    gaps = np.array([abs(float(x[0] - x[1])) for x in raw])
    errors = np.array([runner.gap_error(x, y) for x, y in zip(raw, fp32, strict=True)])
    # a margin just above the gap of the item bf16 is furthest off relative to its gap, and a
    # share of it that this item's error exceeds (the tiny model is off by less than real ones)
    k = int(np.argmax(errors / np.maximum(gaps, 1e-9)))
    assert errors[k] > 1e-4
    monkeypatch.setattr(runner, "RECHECK_FRACTION", 0.0)
    monkeypatch.setattr(runner, "RECHECK_NATS", gaps[k] * 1.01)
    monkeypatch.setattr(runner, "RECHECK_WORST_SHARE", 0.5 * errors[k] / (gaps[k] * 1.01))
    first = {i for i, x in enumerate(raw) if runner.needs_fp32(x)}

    def rescored(out: list[np.ndarray]) -> set[int]:
        return {i for i, (x, y) in enumerate(zip(out, fp32, strict=True)) if np.allclose(x, y, atol=1e-4)}

    widened = score_items(causal, items, precision="bf16")
    assert first < rescored(widened)  # more than the first margin's items went back to fp32
    assert [int(np.argmax(x)) for x in widened] == [int(np.argmax(x)) for x in fp32]
    monkeypatch.setattr(runner, "RECHECK_WORST_SHARE", float("inf"))  # never widen
    assert rescored(score_items(causal, items, precision="bf16")) == first


def test_large_scoring_jobs_read_log_probs_through_the_compiled_kernel(causal, monkeypatch):
    """Above COMPILE_LOGPROBS_ELEMENTS the log-probs come from the compiled kernel, equal to eager
    ones in fp32 and under bf16 autocast; where compilation fails, scoring goes on eagerly."""
    from lm_pretrain.eval import scoring

    sentences = [s for i in probe_items(seed=4, per_phenomenon=6) for s in i.sentences]
    eager = score_candidates(causal, sentences, sentences)
    with torch.autocast("cpu", torch.bfloat16):
        eager_bf16 = score_candidates(causal, sentences, sentences)
    calls = []
    real = scoring.fused_target_logprobs
    monkeypatch.setattr(scoring, "COMPILE_LOGPROBS_ELEMENTS", 1)
    monkeypatch.setattr(scoring, "fused_target_logprobs", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(scoring, "_compiled", {})
    fused = score_candidates(causal, sentences, sentences)
    assert (
        calls and callable(scoring._compiled["fn"]) and scoring._compiled["fn"] is not scoring.target_logprobs
    )
    np.testing.assert_allclose(fused, eager, atol=1e-4)
    with torch.autocast("cpu", torch.bfloat16):
        np.testing.assert_allclose(score_candidates(causal, sentences, sentences), eager_bf16, atol=1e-3)

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(scoring, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="scoring without torch.compile .*InvalidCxxCompiler"):
        fallback = score_candidates(causal, sentences, sentences)
    assert scoring._compiled["fn"] is scoring.target_logprobs
    np.testing.assert_array_equal(fallback, eager)
