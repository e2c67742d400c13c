"""Checkpoints and model folders are untrusted input: nothing in them runs code unless the user
said so. Each test builds a hostile file whose payload would write a marker file, and checks that
the marker never appears and the refusal names the file."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_run_args
from lm_pretrain.cli import app
from lm_pretrain.model.export import MODELING_FILE
from lm_pretrain.train.checkpoint import load_state_file, set_rng_state


class WritesMarker:
    """Unpickling this object opens (creates) the marker file: arbitrary code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def cli(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(bible_corpus, tmp_path_factory) -> tuple[Path, list[str]]:
    """A 2-step hybrid run with a weight average: checkpoints hold optimizer.pt, rng-0.pt and
    average.pt; final/ holds lmp's own modeling file under auto_map."""
    root = tmp_path_factory.mktemp("trained")
    extra = {"objective": "hybrid", "train.average": "{kind: ema, decay: 0.9}", "checkpoint.every": 2}
    args = tiny_run_args(bible_corpus, root / "cache", 2, **extra)
    result = cli(["train", *args, "--out", root / "run"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root / "run", args


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optimizer.pt", "rng-0.pt", "average.pt"])
def test_a_pickle_payload_in_a_checkpoint_never_runs_on_resume_or_branch(trained, tmp_path, name):
    run_src, args = trained
    run = copy_run(run_src, tmp_path)
    marker = tmp_path / "marker"
    path = run / "checkpoints" / "step-2" / name
    state = load_state_file(path)
    torch.save({"hidden": WritesMarker(marker), "state": state}, path)  # still a "valid" file

    longer = [a.replace("train.max_steps=2", "train.max_steps=4") for a in args]
    resumed = cli(["train", *longer, "--out", run])
    branched = cli(["train", *longer, "--branch-from", path.parent, "--out", tmp_path / "branch"])
    for result in (resumed, branched):
        assert result.exit_code == 2, result.output + repr(result.exception)
        assert name in result.output and "never unpickles" in result.output, result.output
        assert "io.open" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_rng_files_of_earlier_releases_still_restore_exactly(tmp_path):
    # what lmp wrote before: Python's and numpy's own state objects, pickled
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, tmp_path / "rng-0.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_state_file(tmp_path / "rng-0.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def with_code(folder: Path, config: str, auto_map: dict, marker: Path) -> Path:
    """The folder asks transformers to import evil.py, which writes the marker when imported."""
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('ran')\n")
    path = folder / config
    data = json.loads(path.read_text())
    data["auto_map"] = {**data.get("auto_map", {}), **auto_map}
    path.write_text(json.dumps(data))
    return folder


HOSTILE = [
    ("config.json", {"AutoModelForCausalLM": "evil.Model", "AutoConfig": "evil.Config"}),
    ("tokenizer_config.json", {"AutoTokenizer": ["evil.Tokenizer", "evil.TokenizerFast"]}),
]


@pytest.mark.slow
@pytest.mark.parametrize("config,auto_map", HOSTILE, ids=["model-code", "tokenizer-code"])
def test_a_model_folder_asking_for_its_own_code_is_refused_without_the_flag(
    trained, tmp_path, config, auto_map
):
    marker = tmp_path / "marker"
    folder = with_code(
        Path(shutil.copytree(trained[0] / "final", tmp_path / "model")), config, auto_map, marker
    )
    commands = [
        ["eval", folder, "--tasks", "probe"],
        ["eval", folder, "--tasks", "probe", "--backend", "mntp"],
        ["generate", folder, "--prompt", "And God said"],
    ]
    for command in commands:
        result = cli(command)
        assert result.exit_code == 2, result.output + repr(result.exception)
        assert config in result.output and "evil.py" in result.output, result.output
        assert "--trust-remote-code" in result.output and "Traceback" not in result.output
        assert not marker.exists()
    # the user's opt-in runs it (no interactive question either way)
    cli(["generate", folder, "--prompt", "And God said", "--trust-remote-code"])
    assert marker.exists()


@pytest.mark.slow
def test_lmp_own_modeling_file_is_trusted_by_content_not_by_name(trained, tmp_path):
    folder = Path(shutil.copytree(trained[0] / "final", tmp_path / "model"))
    result = cli(["eval", folder, "--tasks", "probe", "--backend", "mntp"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    with (folder / MODELING_FILE).open("a") as handle:
        handle.write("\nprint('changed')\n")
    result = cli(["eval", folder, "--tasks", "probe", "--backend", "mntp"])
    assert result.exit_code == 2 and MODELING_FILE in result.output, result.output


@pytest.mark.slow
def test_merge_leaves_untrusted_code_out_and_the_output_loads(trained, tmp_path):
    marker = tmp_path / "marker"
    a = Path(shutil.copytree(trained[0] / "final", tmp_path / "a"))
    with_code(a, *HOSTILE[0], marker)
    b = Path(shutil.copytree(a, tmp_path / "b"))
    merged = cli(["merge-checkpoints", a, b, "--out", tmp_path / "merged"])
    assert merged.exit_code == 0, merged.output + repr(merged.exception)
    assert "evil.Model" in merged.output and "--trust-remote-code" in merged.output
    out = tmp_path / "merged"
    config = json.loads((out / "config.json").read_text())
    # lmp's own masked-LM entry and file are kept, the foreign ones dropped
    assert config["auto_map"] == {"AutoModelForMaskedLM": "modeling_lmp.LmpForMaskedNextToken"}
    assert (out / MODELING_FILE).is_file() and not (out / "evil.py").exists()
    for backend in ("causal", "mntp"):
        result = cli(["eval", out, "--tasks", "probe", "--backend", backend])
        assert result.exit_code == 0, result.output + repr(result.exception)
    assert not marker.exists()

    trusted = cli(["merge-checkpoints", a, b, "--out", tmp_path / "trusted", "--trust-remote-code"])
    assert trusted.exit_code == 0, trusted.output
    assert (tmp_path / "trusted" / "evil.py").is_file() and not marker.exists()  # copied, not run
