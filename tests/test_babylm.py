"""BabyLM tracks: the official corpus layout, word budgets, words seen, milestone checkpoints."""

import json

import pytest

from conftest import write_babylm_folder
from lm_pretrain.data.corpus import read_corpus, word_counts
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import DataConfig


def test_babylm_layout_reads_train_files_only(tmp_path):
    written = write_babylm_folder(tmp_path / "babylm", 20_000)
    docs = read_corpus(DataConfig(path=str(tmp_path / "babylm"), lines_per_document=50))
    counts = word_counts(docs)
    assert counts == dict(sorted(written.items()))  # every .train word, no .dev line
    assert all("held out" not in d.text for d in docs)
    childes = [d for d in docs if d.source == "childes"]
    assert all(len(d.text.split("\n")) == 50 for d in childes[:-1])  # blocks of 50 lines


def test_babylm_folder_mistakes_are_named(tmp_path):
    # the whole download: train_10M and train_100M side by side must not be mixed
    write_babylm_folder(tmp_path / "all" / "train_10M", 2_000)
    write_babylm_folder(tmp_path / "all" / "train_100M", 3_000)
    with pytest.raises(LmpError, match="in 2 folders.*point data.path at the one folder"):
        read_corpus(DataConfig(path=str(tmp_path / "all")))
    # a held-out folder alone is not a training corpus
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "childes.dev").write_text("a held out line\n")
    with pytest.raises(LmpError, match="no <source>.train files.*training folder"):
        read_corpus(DataConfig(path=str(tmp_path / "dev")))
    # an empty .train file is a failed download, not a source to drop quietly
    write_babylm_folder(tmp_path / "one", 2_000)
    (tmp_path / "one" / "train" / "switchboard.train").write_text("")
    with pytest.raises(LmpError, match=r"switchboard\.train is empty"):
        read_corpus(DataConfig(path=str(tmp_path / "one")))


def test_over_budget_is_an_error_naming_the_totals(tmp_path):
    write_babylm_folder(tmp_path / "babylm", 12_000)
    with pytest.raises(LmpError) as exc:
        read_corpus(DataConfig(path=str(tmp_path / "babylm"), word_budget=10_000))
    msg = str(exc.value)
    assert "over data.word_budget 10,000" in msg and "data.over_budget: subsample" in msg


def test_subsampling_is_proportional_deterministic_and_within_budget(tmp_path):
    written = write_babylm_folder(tmp_path / "babylm", 120_000)
    cfg = DataConfig(
        path=str(tmp_path / "babylm"), word_budget=100_000, over_budget="subsample", lines_per_document=8
    )
    docs = read_corpus(cfg)
    counts = word_counts(docs)
    total_written = sum(written.values())
    assert sum(counts.values()) <= 100_000
    assert sum(counts.values()) > 99_000  # whole 8-line documents fill the budget closely
    for source, n in counts.items():
        share = written[source] * 100_000 // total_written
        assert share - 100 <= n <= share  # each source keeps its proportion
    assert read_corpus(cfg) == docs  # deterministic


@pytest.mark.slow
def test_words_seen_milestones_and_export(tmp_path):
    import subprocess

    from typer.testing import CliRunner

    from conftest import tiny_run_args
    from lm_pretrain.cli import app

    write_babylm_folder(tmp_path / "babylm", 60_000)
    run = tmp_path / "run"
    sets = tiny_run_args(
        tmp_path / "babylm",
        tmp_path / "cache",
        1,
        **{
            "data.source_field": None,
            "data.word_budget": 50_000,
            "data.over_budget": "subsample",
            "data.lines_per_document": 20,
            "train.max_steps": None,
            "train.max_words_seen": 1_050_000,
            "model.hidden_size": 32,
            "model.num_layers": 1,
            "model.num_heads": 1,
            "model.max_seq_len": 128,
            "train.batch_size": 64,
            "train.micro_batch_size": 64,
            "train.log_every": 50,
            "train.eval_every": 10_000,
            "checkpoint.every": 10_000,
            "checkpoint.keep_last": 1,
        },
    )
    result = CliRunner().invoke(app, ["train", *sets, "--out", str(run)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "saved chck_1M" in result.output

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    per_step = 64 * 128
    assert 1_050_000 <= last["words"] < 1_050_000 + per_step  # stopped by the words-seen bound
    assert last["epoch"] > 15  # many passes over a 50k-word corpus
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["chck_1M", f"step-{last['step']}"]  # the milestone survives keep_last 1
    state = json.loads((run / "checkpoints" / "chck_1M" / "trainer_state.json").read_text())
    assert 1_000_000 <= state["words"] < 1_000_000 + per_step

    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(run), "--milestones", str(out), "--git"])
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    assert not (out / "chck_1M" / "optimizer.pt").exists()
    AutoModelForCausalLM.from_pretrained(out / "chck_1M", local_files_only=True)
    branches = subprocess.run(
        ["git", "-C", str(out / "repo"), "branch", "--format=%(refname:short)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(branches) == ["chck_1M", "main"]
    # ready for the Hub: weights tracked by LFS, files readable by the team
    attributes = subprocess.run(
        ["git", "-C", str(out / "repo"), "show", "chck_1M:.gitattributes"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "*.safetensors filter=lfs" in attributes
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (out / "chck_1M").iterdir())
    from lm_pretrain.milestones import git_lfs_available

    assert ("git-lfs is not installed" in result.output) != git_lfs_available()


def test_milestone_names_follow_the_2025_rules():
    from lm_pretrain.milestones import milestone_name, milestone_words

    names = [milestone_name(w) for w in milestone_words()]
    assert names[:10] == [f"chck_{n}M" for n in range(1, 10)] + ["chck_10M"]
    assert names[9:19] == [f"chck_{n}M" for n in range(10, 101, 10)]
    assert names[18:] == [f"chck_{n}M" for n in range(100, 1001, 100)]
    assert len(names) == len(set(names)) == 28


def test_branch_export_takes_parent_milestones_up_to_the_branch_point(tmp_path):
    from lm_pretrain.milestones import export_milestones

    def milestone(run, name, step, words):
        folder = run / "checkpoints" / name
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "words": words}))
        (folder / "model.safetensors").write_text(f"{run.name}/{name}")
        (folder / "optimizer.pt").write_text("resume only")

    parent, branch = tmp_path / "parent", tmp_path / "branch"
    milestone(parent, "chck_1M", 10, 1_000_000)
    milestone(parent, "chck_2M", 20, 2_000_000)
    milestone(parent, "chck_3M", 30, 3_000_000)  # past the branch point: not this branch's history
    milestone(branch, "chck_3M", 28, 3_000_000)
    (branch / "branch.json").write_text(json.dumps({"parent_run": str(parent), "parent_step": 25}))

    written = export_milestones(branch, tmp_path / "out")
    assert [p.name for p in written] == ["chck_1M", "chck_2M", "chck_3M"]
    contents = [(p / "model.safetensors").read_text() for p in written]
    assert contents == ["parent/chck_1M", "parent/chck_2M", "branch/chck_3M"]
    assert not (tmp_path / "out" / "chck_1M" / "optimizer.pt").exists()

    # the parent moved away: the branch's own milestones, with a warning naming what is missing
    import shutil

    from typer.testing import CliRunner

    from lm_pretrain.cli import app

    shutil.move(parent, tmp_path / "moved")
    result = CliRunner().invoke(app, ["export", str(branch), "--milestones", str(tmp_path / "out2")])
    assert result.exit_code == 0, result.output
    assert "which is gone" in result.output and "up to step 25" in result.output
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["chck_3M"]


def test_export_names_damaged_run_files_and_keeps_out_of_the_run(tmp_path):
    from lm_pretrain.milestones import export_milestones

    run = tmp_path / "run"
    (run / "checkpoints" / "chck_1M").mkdir(parents=True)
    (run / "status.json").write_text('{"state": "finished"}')
    state = run / "checkpoints" / "chck_1M" / "trainer_state.json"
    state.write_text(json.dumps({"step": 10, "words": 1_000_000}))
    with pytest.raises(LmpError, match="part of the training run"):
        export_milestones(run, run / "checkpoints" / "chck_1M" / "export")
    assert not (run / "checkpoints" / "chck_1M" / "export").exists()
    (run / "branch.json").write_text(json.dumps({"parent_run": str(run), "parent_step": 5}))
    with pytest.raises(LmpError, match="leads back to"):
        export_milestones(run, tmp_path / "out")
    (run / "branch.json").write_text("{bad")
    with pytest.raises(LmpError, match=r"branch\.json is damaged"):
        export_milestones(run, tmp_path / "out")
    (run / "branch.json").unlink()
    state.write_text(json.dumps({"step": 10}))
    with pytest.raises(LmpError, match=r"trainer_state\.json is damaged"):
        export_milestones(run, tmp_path / "out")
    with pytest.raises(LmpError, match="not a training run"):
        export_milestones(run / "checkpoints" / "chck_1M", tmp_path / "out")
