"""The callback interface of the training loop: when each hook runs, and a callback's own state
carried through checkpoints."""

from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from conftest import tiny_run_args
from lm_pretrain.recipe import load_recipe
from lm_pretrain.train.callbacks import Callback
from lm_pretrain.train.trainer import train


def tiny_recipe(corpus: Path, cache: Path, steps: int):
    args = tiny_run_args(
        corpus, cache, steps, **{"train.log_every": 2, "train.eval_every": 4, "checkpoint.every": 2}
    )
    return load_recipe(args[0], [a for a in args[1:] if a != "--set"])


class Recorder(Callback):
    """Notes each hook with the step it ran at, and counts updates across resumes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.updates = 0

    def _note(self, hook: str, t) -> None:
        self.calls.append((hook, t.state.step))

    def on_start(self, t):
        self._note("on_start", t)

    def before_step(self, t):
        self._note("before_step", t)

    def after_update(self, t, loss, finite):
        self.updates += 1
        self._note("after_update", t)

    def on_log(self, t, record):
        assert "loss" in record  # lmp's metrics fill the record first
        self._note("on_log", t)

    def after_validation(self, t, record):
        self._note("after_validation", t)
        record["val_extra"] = 1.5
        return ", extra 1.5"

    def after_record(self, t, record):
        self._note("after_record", t)

    def before_checkpoint(self, t):
        self._note("before_checkpoint", t)

    def on_export(self, t):
        self._note("on_export", t)

    def checkpoint_files(self):
        return {"recorder.pt": {"updates": self.updates}}

    def load_checkpoint(self, folder):
        from lm_pretrain.train.checkpoint import load_state_file

        self.updates = load_state_file(folder / "recorder.pt")["updates"]


@pytest.mark.slow
def test_hooks_run_at_their_steps_and_callback_state_survives_a_resume(bible_corpus, tmp_path):
    import json

    run, cache = tmp_path / "run", tmp_path / "cache"
    first = Recorder()
    train(tiny_recipe(bible_corpus, cache, 4), run, Console(quiet=True), callbacks=[first])
    seen = Counter(hook for hook, _ in first.calls)
    assert seen == {
        "on_start": 1, "before_step": 4, "after_update": 4, "on_log": 2, "after_validation": 1,
        "after_record": 2, "before_checkpoint": 2, "on_export": 1,
    }  # fmt: skip
    # the state a hook sees: steps are counted after the update, before logging
    assert [s for h, s in first.calls if h == "on_log"] == [2, 4]
    assert [s for h, s in first.calls if h == "before_step"] == [0, 1, 2, 3]
    assert (run / "checkpoints" / "step-4" / "recorder.pt").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_extra"] for r in records if "val_extra" in r] == [1.5]  # added fields are logged

    again = Recorder()
    train(tiny_recipe(bible_corpus, cache, 6), run, Console(quiet=True), callbacks=[again])
    assert again.updates == 6  # 4 counted before, restored from step-4/recorder.pt, then 2 more
