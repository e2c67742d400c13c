"""data.mixture: per-source weights in stages, a pure function of (seed, sample), exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console
from test_seq_len_schedule import StopAt

from conftest import tiny_run_args
from lm_pretrain.data.builtin import demo_documents
from lm_pretrain.data.mixture import MIX_BLOCK, MixedWindows, MixturePlan, block_counts, stage_weights
from lm_pretrain.data.shards import TokenShard
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import MixtureConfig, load_recipe
from lm_pretrain.train.trainer import train

SOURCES = ["bible_bbe", "childes", "wiki"]


def mixture(**raw: object) -> MixtureConfig:
    return MixtureConfig.model_validate(raw)


def test_weights_resolve_per_stage_with_default_and_shorthand():
    cfg = mixture(weights={"childes": 2, "default": 1}, stages=[{"until": 0.9, "weights": {}},
                  {"until": 1.0, "weights": {"wiki": 5}}])  # fmt: skip
    (first, a), (last, b) = stage_weights(cfg, SOURCES)
    assert (first, last) == (0.9, 1.0)
    assert a.tolist() == pytest.approx([0.25, 0.5, 0.25]) and b.tolist() == pytest.approx(
        [1 / 8, 2 / 8, 5 / 8]
    )
    shorthand = MixtureConfig.model_validate({"childes": 2, "default": 0})
    assert stage_weights(shorthand, SOURCES)[0][1].tolist() == [0, 1, 0]
    # relative to size: 1 everywhere is the corpus's own proportions; 4 upsamples a source 4 times
    sizes = np.array([600.0, 300.0, 100.0])
    assert stage_weights(mixture(relative_to_size=True), SOURCES, sizes)[0][1].tolist() == pytest.approx(
        [0.6, 0.3, 0.1]
    )
    up = stage_weights(mixture(relative_to_size=True, weights={"wiki": 4}), SOURCES, sizes)[0][1]
    assert up.tolist() == pytest.approx([600 / 1300, 300 / 1300, 400 / 1300])


def test_bad_mixtures_are_refused_naming_the_problem():
    with pytest.raises(LmpError, match="names source 'chidles'.*its sources: bible_bbe, childes, wiki"):
        stage_weights(mixture(weights={"chidles": 2}), SOURCES)
    with pytest.raises(LmpError, match="stage until 0.5 gives every source weight 0"):
        stage_weights(mixture(stages=[{"until": 0.5, "weights": {"default": 0}}, {"until": 1, "weights": {}}]),
                      SOURCES)  # fmt: skip
    with pytest.raises(ValueError, match="must rise to 1.0"):
        mixture(stages=[{"until": 0.5, "weights": {}}])
    with pytest.raises(ValueError, match="finite and 0 or more"):
        mixture(weights={"wiki": -1})


def test_block_counts_are_exact_shares_that_fill_the_block():
    counts = block_counts(np.array([1 / 3, 1 / 3, 1 / 3]))
    assert counts.sum() == MIX_BLOCK and sorted(counts.tolist()) == [341, 341, 342]
    assert block_counts(np.array([0.0, 1.0])).tolist() == [0, MIX_BLOCK]


def plan(main_steps: int = 200, batch: int = 16, seed: int = 3) -> MixturePlan:
    cfg = mixture(weights={"childes": 2}, stages=[{"until": 0.5, "weights": {}},
                  {"until": 1.0, "weights": {"wiki": 6, "childes": 0}}])  # fmt: skip
    return MixturePlan(stage_weights(cfg, SOURCES), main_steps, batch, seed)


def test_each_source_draws_its_windows_in_order_and_its_share_per_stage():
    p = plan()
    change = 100 * 16
    located = [p.locate(g) for g in range(2 * change + 500)]  # past the main run: the last stage goes on
    for s in range(3):
        indices = [n for source, n in located if source == s]
        assert indices == list(range(len(indices)))  # every window of the source once, in order
    first = np.bincount([s for s, _ in located[:change]], minlength=3) / change
    second = np.bincount([s for s, _ in located[change:]], minlength=3) / (len(located) - change)
    assert first == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    assert second == pytest.approx([1 / 7, 0, 6 / 7], abs=0.01)
    # spread evenly: every batch of 16 holds each source's share of 16, give or take one
    for start in range(0, change, 16):
        counts = np.bincount([s for s, _ in located[start : start + 16]], minlength=3)
        assert (np.abs(counts - 16 * np.array([0.25, 0.5, 0.25])) <= 1).all(), (start, counts)
    for samples in (0, 1, 777, change, change + 1, len(located)):
        assert (
            p.drawn(samples).tolist() == np.bincount([s for s, _ in located[:samples]], minlength=3).tolist()
        )
    # a pure function of (seed, sample): a fresh plan read backwards agrees; another seed does not
    fresh = plan()
    assert [fresh.locate(g) for g in reversed(range(len(located)))] == located[::-1]
    assert [plan(seed=4).locate(g) for g in range(200)] != located[:200]


def test_mixed_windows_come_from_their_source():
    # source 0's documents hold tokens 10..19, source 1's 20..29: a row's tokens tell its source
    rng = np.random.default_rng(0)
    docs = [(s, rng.integers(10 + 10 * s, 20 + 10 * s, size=rng.integers(50, 90))) for s in [0, 1] * 20]
    tokens = np.concatenate([d for _, d in docs]).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for _, d in docs])])
    shard = TokenShard(tokens, offsets, np.array([s for s, _ in docs]), ["a", "b"])
    p = MixturePlan(stage_weights(mixture(weights={"a": 3, "b": 1}), ["a", "b"]), 100, 8, 0)
    windows = MixedWindows(shard, p, 16, 0, bos_token_id=1, words_per_token=np.array([1.0, 0.5]))
    inputs, _ = windows.batch(40, 64)
    for row, g in zip(inputs.numpy(), range(40, 104), strict=True):
        source = p.locate(g)[0]
        assert ((row >= 10 + 10 * source) & (row < 20 + 10 * source)).all()
    drawn = p.drawn(104)
    assert windows.words_seen(104) == pytest.approx((drawn[0] * 1.0 + drawn[1] * 0.5) * 16)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    docs = [d for d in demo_documents() if d.source == "bible_bbe"][:150]
    docs += [d for d in demo_documents() if d.source == "dialogue"][:900]
    path = tmp_path_factory.mktemp("corpus") / "two.jsonl"
    path.write_text("".join(json.dumps({"text": d.text, "source": d.source}) + "\n" for d in docs))
    return path


MIX = "{weights: {dialogue: 3}, stages: [{until: 0.5, weights: {}}, {until: 1.0, weights: {bible_bbe: 6}}]}"


def run(corpus, tmp_path, name: str, callbacks=(), **extra):
    sets = {"data.mixture": MIX, "train.log_every": 1, "checkpoint.every": 100, **extra}
    args = tiny_run_args(corpus, tmp_path / "cache", 8, **sets)
    recipe = load_recipe(args[0], [a for a in args[1:] if a != "--set"])
    result = train(recipe, tmp_path / name, Console(quiet=True), callbacks=list(callbacks))
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return result, {r["step"]: (r["loss"], r["words"]) for r in records if "loss" in r}


@pytest.mark.slow
def test_mixture_counts_words_drawn_and_resumes_exactly_across_a_stage_change(two_sources, tmp_path):
    _, straight = run(two_sources, tmp_path, "straight")
    _, plain = run(two_sources, tmp_path, "plain", **{"data.mixture": None})
    # bible text has more words per token than the dialogues: the second stage draws more words
    words = [straight[s][1] for s in range(1, 9)]
    steps_words = np.diff([0, *words])
    assert steps_words[4:].mean() > steps_words[:4].mean() * 1.05
    assert straight[8][1] != plain[8][1]
    for stop in (3, 6):  # stopped before the stage change at step 4 and inside the second stage
        first, _ = run(two_sources, tmp_path, f"stopped-{stop}", [StopAt(stop)])
        assert first.stopped_by_signal and first.steps == stop
        _, resumed = run(two_sources, tmp_path, f"stopped-{stop}")
        assert resumed == straight, stop


@pytest.mark.slow
def test_mixture_works_with_metadata_packing_and_the_hybrid_objective(two_sources, tmp_path):
    extra = {"data.metadata": "{field: source, cooldown_fraction: 0.25}", "data.packing": "document",
             "objective": "hybrid"}  # fmt: skip
    result, logged = run(two_sources, tmp_path, "all", **extra)
    assert result.steps == 8 and all(np.isfinite(loss) for loss, _ in logged.values())


@pytest.mark.slow
def test_two_processes_draw_the_mixture_as_one_does(two_sources, tmp_path):
    from test_distributed import losses as logged_losses
    from test_distributed import train as train_cli

    train_cli(two_sources, tmp_path / "cache", tmp_path / "one", 6, nproc=1, **{"data.mixture": MIX})
    train_cli(two_sources, tmp_path / "cache", tmp_path / "two", 6, nproc=2, **{"data.mixture": MIX})
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    assert max(abs(one[s] - two[s]) / one[s] for s in one) < 1e-3
    words = [json.loads(line)["words"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if "loss" in line]  # fmt: skip
    assert words[-1] == [json.loads(line)["words"] for line in (tmp_path / "one" / "metrics.jsonl").read_text()
                         .splitlines() if "loss" in line][-1]  # fmt: skip
