"""hybrid.masking hard: masking weighted by each token's recent loss, its state, and exact resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console
from test_hybrid import MASK, masker, windows
from test_seq_len_schedule import StopAt

from conftest import tiny_run_args
from lm_pretrain.data.loader import IGNORE_INDEX
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import load_recipe
from lm_pretrain.train.callbacks.hard_tokens import HARDNESS_FILE, TokenHardness
from lm_pretrain.train.trainer import train
from test_model import VOCAB

HARD = np.arange(4, VOCAB) % 8 == 0  # one ordinary token id in eight is "hard"


def chosen_ids(m, hardness, rows: int = 64) -> np.ndarray:
    """The original token ids of every chosen position over `rows` masked rows."""
    inputs, targets = windows(rows=rows)
    flags = torch.ones(rows, dtype=torch.bool)
    _, masked_targets = m.mask_rows(inputs, targets, flags, range(rows), 0.2, hardness)
    t = masked_targets.numpy()
    return t[t != IGNORE_INDEX], masked_targets


def table(hard_loss: float, easy_loss: float = 1.0) -> np.ndarray:
    h = np.full(VOCAB, easy_loss)
    h[4:][HARD] = hard_loss
    return h


def test_hard_masking_prefers_high_loss_tokens_and_keeps_a_floor_for_the_rest():
    m = masker(masking="hard", hard_mix=0.5, max_span=1)
    uniform_ids, uniform = chosen_ids(m, table(1.0))
    hard_ids, hard = chosen_ids(m, table(9.0))
    share = lambda ids: np.isin(ids, np.flatnonzero(np.r_[np.zeros(4, bool), HARD])).mean()  # noqa: E731
    # the same number of tokens per row either way: hardness moves the choice, not the rate
    assert ((uniform != IGNORE_INDEX).sum(1) == (hard != IGNORE_INDEX).sum(1)).all()
    assert share(uniform_ids) == pytest.approx(1 / 8, abs=0.03)
    # a hard token weighs 0.5 + 0.5 x 9/2 = 2.75 against 0.5 + 0.5 x 1/2 = 0.75 for an easy one (mean
    # hardness 2): 3.7x the odds, so far more than its 1/8 share, and easy tokens are still chosen
    assert share(hard_ids) > 0.25
    assert share(hard_ids) < 0.5
    only_hard = chosen_ids(masker(masking="hard", hard_mix=1.0, max_span=1), table(9.0))[0]
    assert share(only_hard) > share(hard_ids)


def test_hard_masking_is_a_pure_function_of_seed_sample_and_hardness():
    m = masker(masking="hard")
    a, b = chosen_ids(m, table(5.0))[1], chosen_ids(m, table(5.0))[1]
    assert torch.equal(a, b)
    assert not torch.equal(a, chosen_ids(m, table(2.0))[1])
    inputs, targets = windows(rows=4)
    x, y, _ = m.batch(inputs, targets, 100, 0.5, table(5.0))
    assert torch.equal(x, m.batch(inputs, targets, 100, 0.5, table(5.0))[0]) and (x == MASK).any()
    assert not torch.equal(y, m.batch(inputs, targets, 104, 0.5, table(5.0))[1])  # other samples


def test_token_hardness_averages_masked_losses_skips_bad_steps_and_round_trips(tmp_path):
    t = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1))
    hardness = TokenHardness(VOCAB, half_life=1, device=torch.device("cpu"))
    targets = torch.tensor([[5, 6, IGNORE_INDEX, 7], [5, 5, 5, 5]])
    losses = torch.tensor([4.0, 1.0, 99.0, 2.0, 8.0, 8.0, 8.0, 8.0])
    rows = torch.tensor([True, False])  # only masked rows count: row 1 is causal
    hardness.after_micro_batch(t, targets, rows, losses)
    hardness.after_update(t, torch.tensor(1.0), torch.tensor(True))
    h = hardness.table()
    prior = (4 + 1 + 2) / 3
    assert h[5] == pytest.approx((4 + prior) / 2) and h[6] == pytest.approx((1 + prior) / 2)
    assert h[9] == pytest.approx(prior)  # never seen: the mean
    before = h.copy()
    hardness.after_micro_batch(t, targets, rows, torch.full((8,), float("nan")))
    hardness.after_update(t, torch.tensor(float("nan")), torch.tensor(False))
    assert np.array_equal(hardness.table(), before)  # a skipped step adds nothing
    hardness.after_update(t, torch.tensor(1.0), torch.tensor(True))  # a step with no masked targets
    assert hardness.counts[5].item() == pytest.approx(0.5)  # half_life 1: halved
    torch.save(hardness.checkpoint_files()[HARDNESS_FILE], tmp_path / HARDNESS_FILE)
    restored = TokenHardness(VOCAB, half_life=1, device=torch.device("cpu"))
    restored.load_checkpoint(tmp_path)
    assert np.array_equal(restored.table(), hardness.table())


def test_hard_masking_needs_a_masked_objective(tmp_path):
    args = tiny_run_args(tmp_path / "c.txt", tmp_path / "cache", 4, **{"hybrid.masking": "hard"})
    with pytest.raises(LmpError, match="objective causal masks none"):
        load_recipe(args[0], [a for a in args[1:] if a != "--set"])


def run(corpus, tmp_path, name: str, masking: str = "hard", callbacks=()):
    sets = {"objective": "hybrid", "hybrid.masking": masking, "hybrid.hard_half_life": 2,
            "train.log_every": 1, "checkpoint.every": 100}  # fmt: skip
    args = tiny_run_args(corpus, tmp_path / "cache", 8, **sets)
    recipe = load_recipe(args[0], [a for a in args[1:] if a != "--set"])
    result = train(recipe, tmp_path / name, Console(quiet=True), callbacks=list(callbacks))
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return result, {r["step"]: (r["loss"], r.get("hard_mask_top10")) for r in records if "loss" in r}


@pytest.mark.slow
def test_hard_masking_trains_and_resumes_exactly(bible_corpus, tmp_path):
    _, straight = run(bible_corpus, tmp_path, "straight")
    _, random = run(bible_corpus, tmp_path, "random", masking="random")
    assert len(straight) == 8 and all(np.isfinite(loss) for loss, _ in straight.values())
    assert straight[1][0] == random[1][0]  # nothing learned yet: uniform hardness at step 1 ...
    assert straight[8][0] != random[8][0]  # ... then the masks differ
    assert straight[8][1] > 1.0  # the hardest tenth's loss over the mean, as logged
    first, _ = run(bible_corpus, tmp_path, "stopped", callbacks=[StopAt(4)])
    assert first.stopped_by_signal and (tmp_path / "stopped/checkpoints/step-4" / HARDNESS_FILE).is_file()
    _, resumed = run(bible_corpus, tmp_path, "stopped")
    assert resumed == straight


@pytest.mark.slow
def test_two_processes_mask_as_one_does(bible_corpus, tmp_path):
    """Every process masks with the table of all processes' losses, so the run matches one process."""
    from test_distributed import losses as logged_losses
    from test_distributed import train as train_cli

    sets = {"objective": "hybrid", "hybrid.masking": "hard", "hybrid.hard_half_life": 2}
    train_cli(bible_corpus, tmp_path / "cache", tmp_path / "one", 10, nproc=1, **sets)
    train_cli(bible_corpus, tmp_path / "cache", tmp_path / "two", 10, nproc=2, **sets)
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    worst = max(abs(one[s] - two[s]) / one[s] for s in one)
    assert worst < 1e-5  # 0.0 measured; per-process tables instead differ by about 1e-3 here
