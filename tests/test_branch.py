"""WSD branching: decay runs started from a constant-LR run's checkpoints, the main run untouched."""

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_run_args
from lm_pretrain.cli import app


def invoke(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_decay_branches_from_a_stable_checkpoint(bible_corpus, tmp_path):
    cache, main = tmp_path / "cache", tmp_path / "main"
    stable = {"schedule.kind": "wsd", "schedule.warmup": 4, "schedule.decay": 0, "train.log_every": 1}
    invoke(["train", *tiny_run_args(bible_corpus, cache, 40, **stable), "--out", str(main)])
    before = tree_digest(main)
    ckpt = main / "checkpoints" / "step-20"
    assert ckpt.is_dir()

    branch = tmp_path / "branch"
    args = tiny_run_args(bible_corpus, cache, 40, **stable)
    out = invoke(["train", *args, "--branch-from", str(ckpt), "--decay-steps", "10", "--out", str(branch)])
    assert "branching from" in out
    assert tree_digest(main) == before  # the main run is untouched

    record = json.loads((branch / "branch.json").read_text())
    assert record["parent_step"] == 20 and record["decay_steps"] == 10
    assert record["parent_run"] == str(main.resolve())
    rows = [r for r in metrics(branch) if "lr" in r]
    assert [r["step"] for r in rows] == list(range(21, 31))  # continues from step 20 for 10 steps
    lrs = [r["lr"] for r in rows]
    peak = 3e-3
    assert lrs[0] == pytest.approx(peak * (1 - (1 / 10) ** 0.5))  # the 1-sqrt decay's first step
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    main_rows = {r["step"]: r for r in metrics(main) if "loss" in r}
    # the branch trains on the same data the main run would have seen after step 20
    assert rows[0]["loss"] == pytest.approx(main_rows[21]["loss"], rel=1e-5)
    final = json.loads((branch / "final" / "lmp.json").read_text())
    assert final["step"] == 30
    branch_val = json.loads((branch / "summary.json").read_text())["val_loss"]
    assert branch_val < json.loads((ckpt / "trainer_state.json").read_text())["val_loss"]

    # a fraction: the decay is 20% of the branch's total steps -> 5 steps after step 20
    frac = tmp_path / "frac"
    invoke(["train", *args, "--branch-from", str(ckpt), "--decay-fraction", "0.2", "--out", str(frac)])
    assert json.loads((frac / "branch.json").read_text())["decay_steps"] == 5

    # the branch's decay starts from the parent's LR, even when the branch recipe has its own
    # final decay (under which step 40 would already be at LR 0)
    end = tmp_path / "end"
    plain = tiny_run_args(bible_corpus, cache, 40, **{**stable, "schedule.decay": 0.2})
    end_ckpt = main / "checkpoints" / "step-40"
    invoke(["train", *plain, "--branch-from", str(end_ckpt), "--decay-steps", "4", "--out", str(end)])
    first = next(r for r in metrics(end) if "lr" in r)
    assert first["step"] == 41 and first["lr"] == pytest.approx(peak * (1 - (1 / 4) ** 0.5))

    # refused, naming the field, leaving every folder as it was: a resume with another learning
    # rate, a branch with another model, and a branch resumed with another decay length
    lr_args = tiny_run_args(bible_corpus, cache, 40, **stable, **{"optim.lr": 1e-3})
    deeper = tiny_run_args(bible_corpus, cache, 40, **stable, **{"model.num_layers": 3})
    refusals = [
        ([*lr_args, "--out", str(main)], main, "optim.lr"),
        ([*deeper, "--branch-from", str(ckpt), "--out", str(tmp_path / "other")], main, "model.num_layers"),
        (
            [*args, "--branch-from", str(ckpt), "--decay-steps", "12", "--out", str(branch)],
            branch,
            "decay_steps 10",
        ),
    ]
    for command, run, named in refusals:
        digest = tree_digest(run)
        result = CliRunner().invoke(app, ["train", *command])
        assert result.exit_code == 2 and named in result.output, result.output
        assert tree_digest(run) == digest
    assert not (tmp_path / "other").exists()

    # a fork (no decay) of step 40 under a 40-step recipe would train nothing
    result = CliRunner().invoke(
        app, ["train", *args, "--branch-from", str(end_ckpt), "--out", str(tmp_path / "fork")]
    )
    assert result.exit_code == 2 and "trains 40 steps in all" in result.output, result.output
    assert not (tmp_path / "fork").exists()

    # a finished branch asked to train longer: its length is its decay's, so branch again
    out = invoke(
        [
            "train",
            *args,
            "--set",
            "train.max_steps=90",
            "--branch-from",
            str(ckpt),
            "--decay-steps",
            "10",
            "--out",
            str(branch),
        ]
    )
    assert "already finished its 30 steps" in out and "branch again into a new folder" in out


def test_branch_flag_errors(bible_corpus, tmp_path):
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 10)
    result = CliRunner().invoke(app, ["train", *args, "--decay-steps", "5"])
    assert result.exit_code == 2 and "--branch-from" in result.output
    result = CliRunner().invoke(
        app, ["train", *args, "--branch-from", str(tmp_path), "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 2 and "not an lmp checkpoint" in result.output
    result = CliRunner().invoke(
        app, ["train", *args, "--branch-from", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 2 and "nope does not exist" in result.output, result.output
    damaged = tmp_path / "checkpoints" / "step-5"
    damaged.mkdir(parents=True)
    (damaged / "trainer_state.json").write_text('{"step": 5')
    result = CliRunner().invoke(
        app, ["train", *args, "--branch-from", str(damaged), "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 2 and "trainer_state.json is damaged" in result.output, result.output
    assert "branch from another checkpoint" in result.output


def test_decay_branch_from_a_decayed_checkpoint_is_refused(bible_corpus, tmp_path):
    decayed = tmp_path / "decayed"
    args = tiny_run_args(
        bible_corpus, tmp_path / "cache", 20, **{"schedule.decay": 0.5, "checkpoint.every": 10}
    )
    invoke(["train", *args, "--out", str(decayed)])
    # step 20 ends the decay (LR 0): a "decay" from there would train at LR 0
    last = ["--branch-from", str(decayed / "checkpoints" / "step-20"), "--decay-steps", "5"]
    result = CliRunner().invoke(app, ["train", *args, *last, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "at the end of its run's decay" in result.output, result.output
    assert "before step 10" in result.output and not (tmp_path / "b").exists()
    # step 10 is where the decay begins, still at the peak: a fine branch point
    first = ["--branch-from", str(decayed / "checkpoints" / "step-10"), "--decay-steps", "5"]
    invoke(["train", *args, *first, "--out", str(tmp_path / "ok")])


def test_out_refuses_files_and_foreign_folders(bible_corpus, tmp_path):
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 10)
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    result = CliRunner().invoke(app, ["train", *args, "--out", str(target)])
    assert result.exit_code == 2 and "is a file" in result.output, result.output
    assert target.read_text() == "keep me\n"

    foreign = tmp_path / "exported-model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}\n")
    result = CliRunner().invoke(app, ["train", *args, "--out", str(foreign)])
    assert result.exit_code == 2 and "holds no lmp run" in result.output, result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]


def test_continuing_needs_the_same_corpus_and_a_checkpoint(bible_corpus, tmp_path):
    import shutil

    from lm_pretrain.data.prepare import prepare_data
    from lm_pretrain.recipe import load_recipe

    corpus, cache, run = tmp_path / "corpus.jsonl", tmp_path / "cache", tmp_path / "run"
    lines = bible_corpus.read_text().splitlines(keepends=True)
    edited = [line.replace("the", "teh") for line in lines]

    def tokenizer_of(corpus_lines: list[str]) -> bytes:
        corpus.write_text("".join(corpus_lines))
        args = tiny_run_args(corpus, cache, 10)
        recipe = load_recipe(Path(args[0]), [a for a in args[1:] if a != "--set"])
        return prepare_data(recipe).tokenizer_path.read_bytes()

    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes(tokenizer_of(lines))
    with_tokenizer = {"checkpoint.every": 10, "tokenizer.path": tokenizer}
    invoke(["train", *tiny_run_args(corpus, cache, 10, **with_tokenizer), "--out", str(run)])
    digest = tree_digest(run)

    def refused(named: str) -> None:
        args = tiny_run_args(corpus, cache, 20, **with_tokenizer)
        result = CliRunner().invoke(app, ["train", *args, "--out", str(run)])
        assert result.exit_code == 2 and named in result.output, result.output
        assert tree_digest(run) == digest

    # the tokenizer file replaced by one of another corpus: the weights would read other ids
    tokenizer.write_bytes(tokenizer_of(edited))
    corpus.write_text("".join(lines))
    refused("token ids map differently")
    # the same tokenizer over other documents: the data position would point into other text
    tokenizer.write_bytes(tokenizer_of(lines))
    corpus.write_text("".join(lines[:-5]))
    refused("is not the one")
    # a trained run whose checkpoints are gone is not silently started over
    corpus.write_text("".join(lines))
    shutil.rmtree(run / "checkpoints")
    digest = tree_digest(run)
    refused("no checkpoint to continue from")


def test_training_needs_held_out_documents(bible_corpus, tmp_path):
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 10)
    result = CliRunner().invoke(
        app, ["train", *args, "--set", "data.validation_fraction=0", "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 2 and "data.validation_fraction" in result.output, result.output
    assert not (tmp_path / "a").exists()
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a single long document " * 500, "source": "x"}) + "\n")
    args = tiny_run_args(one, tmp_path / "cache", 10)
    result = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "the corpus has 1 document(s)" in result.output, result.output
