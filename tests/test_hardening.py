"""Hostile or odd inputs end in one readable LmpError (or a warning), never a traceback or a hang."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, tiny_run_args
from lm_pretrain.cli import app
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import DataConfig, load_recipe


def _invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def _refused(result) -> str:
    """The output of a command that must end in an LmpError: exit 2 and no traceback."""
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result.output


def test_binary_recipe_is_refused_naming_the_file(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" * 8)
    child = tmp_path / "child.yaml"
    child.write_text("extends: model.bin\nname: child\n")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_text("name: caf\xe9\n", encoding="latin-1")

    for recipe, named in ((binary, binary), (child, binary), (latin1, latin1)):
        out = _refused(_invoke(["recipe", "show", recipe]))
        assert str(named) in out.replace("\n", "") and "not UTF-8" in out, out


def test_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path):
    # 9 values per list, each level 9 aliases of the one before: 9**7 (4.8M) values from ~500 bytes
    anchors = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 7)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("name: bomb\neval:\n  tasks: [" + ", ".join(anchors) + "]\n")
    assert bomb.stat().st_size < 1000

    start = time.perf_counter()
    with pytest.raises(LmpError) as exc:
        load_recipe(bomb)
    out = _refused(_invoke(["recipe", "show", bomb]))
    assert time.perf_counter() - start < 10
    assert "aliases expand to more than" in str(exc.value) and str(bomb) in str(exc.value)
    assert len(out) < 500, out[:1000]

    # a value quoted in a validation error is cut short, however long it is
    long_value = tmp_path / "long.yaml"
    long_value.write_text(f"name: long\nmodel:\n  hidden_size: {'x' * 50_000}\n")
    with pytest.raises(LmpError, match="model.hidden_size") as exc:
        load_recipe(long_value)
    assert len(str(exc.value)) < 500 and "..." in str(exc.value)


def test_unprunable_old_checkpoint_warns_and_keeps_the_new_one(tmp_path, monkeypatch, capsys):
    import shutil

    from lm_pretrain.model.decoder import Decoder, DecoderConfig
    from lm_pretrain.train import checkpoint

    model = Decoder(DecoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2))
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}\n")
    run = tmp_path / "run"

    def save(step: int) -> Path:
        state = {"step": step, "tokens": step, "words": step}
        return checkpoint.save_checkpoint(run, model, {}, tokenizer_dir, state, keep_last=1)

    old = save(1)
    # the file system refuses to delete the old checkpoint (as for a file on a read-only or
    # immutable mount, which chmod cannot simulate for root): fault injection for this module only
    real_rmtree = shutil.rmtree

    def refusing_rmtree(path, *args, **kwargs):
        if Path(path) == old:
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(
        checkpoint, "shutil", types.SimpleNamespace(**{**vars(shutil), "rmtree": refusing_rmtree})
    )
    new = save(2)

    assert (new / checkpoint.STATE_FILE).is_file()
    assert old.is_dir()  # left in place
    err = capsys.readouterr().err
    assert "warning" in err and str(old) in err and "left in place" in err
    assert len(err.strip().splitlines()) == 1


def test_out_refuses_a_folder_lmp_did_not_create(bible_corpus, tmp_path):
    from lm_pretrain.train.start import _start_state

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("name: mine  # my own notes\n")
    (mine / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    before = {p.name: p.read_text() for p in mine.iterdir()}

    out = _refused(_invoke(["train", *tiny_run_args(bible_corpus, tmp_path / "cache", 5), "--out", mine]))
    assert "holds no lmp run" in out, out
    assert {p.name: p.read_text() for p in mine.iterdir()} == before

    # a folder lmp trained into always holds status.json, and is continued
    (mine / "status.json").write_text(json.dumps({"state": "stopped", "pid": 1, "updated": 0}) + "\n")
    assert _start_state(mine, None, False) == (None, None)


def _cache_temps(folder: Path, stem: str) -> list[Path]:
    return sorted(folder.glob(f".tmp-{stem}-*")) if folder.is_dir() else []


def test_stale_cache_temp_folders_are_removed_live_ones_kept(bible_corpus, tmp_path):
    from lm_pretrain.data.prepare import prepare_data

    cache = tmp_path / "cache"
    shards = cache / "shards"
    # a build that dies mid-write (as when killed) and one still writing, both through the real code
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from lm_pretrain.data.prepare import _build_atomically\n"
        "def build(tmp):\n"
        "    (tmp / 'part.bin').write_bytes(b'x' * 100)\n"
        "    if sys.argv[2] == 'die':\n"
        "        os._exit(9)\n"
        "    time.sleep(120)\n"
        "_build_atomically(Path(sys.argv[1]), build, lambda f: False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    died = subprocess.run([sys.executable, "-c", script, shards / "dead", "die"], env=env, timeout=120)
    assert died.returncode == 9
    [stale] = _cache_temps(shards, "dead")
    live = subprocess.Popen([sys.executable, "-c", script, shards / "live", "live"], env=env)
    try:
        deadline = time.monotonic() + 120
        while not any((p / "part.bin").is_file() for p in _cache_temps(shards, "live")):
            assert live.poll() is None and time.monotonic() < deadline, "the live build did not start"
            time.sleep(0.1)
        [writing] = _cache_temps(shards, "live")
        # another host's build in a shared cache: its pid says nothing about processes here
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        elsewhere = shards / f".tmp-other-somehost-{gone.pid}-0123abcd"
        elsewhere.mkdir()

        args = tiny_run_args(bible_corpus, cache, 5, **{"tokenizer.vocab_size": 300})
        prepare_data(load_recipe(args[0], args[2::2]))

        assert not stale.exists()
        assert writing.is_dir() and (writing / "part.bin").is_file()
        assert elsewhere.is_dir()
    finally:
        live.kill()
        live.wait()


def test_fifo_and_device_corpora_are_named_and_never_opened(tmp_path):
    signal.alarm(30)  # opening a FIFO or reading /dev/zero would hang: fail instead
    try:
        if Path("/dev/zero").exists():
            with pytest.raises(LmpError, match="/dev/zero is a character device"):
                _read(Path("/dev/zero"))
        pipe_only = tmp_path / "pipe_only"
        pipe_only.mkdir()
        os.mkfifo(pipe_only / "feed.txt")
        with pytest.raises(LmpError, match=r"holds no regular text files \(it has a FIFO.*feed.txt"):
            _read(pipe_only)
        with pytest.raises(LmpError, match="is a FIFO"):
            _read(pipe_only / "feed.txt")
        # beside real text, the FIFO is skipped, not read
        (pipe_only / "book.txt").write_text("some words of text\n")
        assert [d.text for d in _read(pipe_only)] == ["some words of text"]
    finally:
        signal.alarm(0)


def _read(path: Path):
    from lm_pretrain.data.corpus import read_corpus

    return read_corpus(DataConfig(path=str(path)))


def test_export_of_a_missing_run_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "runs" / "nope"
    out = _refused(_invoke(["export", missing, "--milestones", tmp_path / "out"]))
    assert "does not exist" in out and str(missing) in out.replace("\n", ""), out
    assert "no milestone" not in out


def test_runs_and_caches_inside_the_corpus_folder_are_refused(bible_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [json.loads(line)["text"] for line in bible_corpus.read_text().splitlines()]
    (corpus / "bible.txt").write_text("\n".join(texts) + "\n")

    def train(cache: Path, out: Path) -> str:
        args = tiny_run_args(corpus, cache, 2, **{"data.source_field": "null"})
        result = CliRunner().invoke(app, ["train", *args, "--out", str(out)])
        assert result.exit_code == 2, result.output
        return result.output

    assert "inside the corpus folder" in train(tmp_path / "cache", corpus / "run")
    assert "inside the corpus folder" in train(corpus / "cache", tmp_path / "run")
    assert sorted(p.name for p in corpus.iterdir()) == ["bible.txt"]


def test_a_corpus_of_one_document_repeated_has_no_training_split(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the cat sat on the mat\n" * 2000)
    result = CliRunner().invoke(
        app,
        ["data", "prepare", str(ROOT / "recipes/demo.yaml"), "--set", f"data.path={corpus}",
         "--set", f"data.cache_dir={tmp_path / 'cache'}"],
    )  # fmt: skip
    assert result.exit_code == 2 and "the training split is empty" in result.output, result.output


def test_adam_betas_and_an_infinite_lr_are_recipe_errors():
    for override, named in (("optim.betas=[2, 0.9]", "optim.betas"), ("optim.lr=inf", "optim.lr")):
        with pytest.raises(LmpError, match=named):
            load_recipe(ROOT / "recipes/demo.yaml", [override])


def test_weights_of_another_shape_name_the_first_tensor_in_one_line(tmp_path):
    from lm_pretrain.model.decoder import Decoder, DecoderConfig
    from lm_pretrain.train.checkpoint import Checkpoint, load_weights

    def decoder(hidden: int) -> Decoder:
        return Decoder(DecoderConfig(vocab_size=64, hidden_size=hidden, num_layers=1, num_heads=2,
                                     num_kv_heads=2, intermediate_size=2 * hidden, max_seq_len=16))  # fmt: skip

    saved = Checkpoint(dict(decoder(32).state_dict()), {}, None, {})
    with pytest.raises(
        LmpError, match=r"model\.embed_tokens\.weight is \[64, 32\] there, \[64, 16\] by the recipe"
    ) as info:
        load_weights(decoder(16), saved, tmp_path)
    assert "\n" not in str(info.value)
    load_weights(decoder(32), saved, tmp_path)  # the same shape loads
