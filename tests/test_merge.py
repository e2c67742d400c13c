"""lmp merge-checkpoints on the checkpoints of a real tiny run, and the in-training WeightAverager."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lm_pretrain.average import WeightAverager
from lm_pretrain.cli import app
from lm_pretrain.data.builtin import demo_documents
from lm_pretrain.errors import LmpError
from lm_pretrain.merge import RunScorer, merge_checkpoints
from lm_pretrain.model.decoder import Decoder, DecoderConfig

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 60, 10


def cli(args: list[str], code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run with a checkpoint and a validation loss every 10 of its 60 steps."""
    root = tmp_path_factory.mktemp("merge")
    docs = [d for d in demo_documents() if d.source == "bible_bbe"][:120]
    corpus = root / "bible.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.text, "source": d.source}) + "\n" for d in docs))
    sets = {
        "data.path": corpus,
        "data.validation_fraction": 0.05,
        "data.cache_dir": root / "cache",
        "tokenizer.vocab_size": 512,
        "model.hidden_size": 32,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.max_seq_len": 32,
        "train.batch_size": 8,
        "train.max_steps": STEPS,
        "train.precision": "fp32",
        "train.log_every": EVERY,
        "train.eval_every": EVERY,
        "train.eval_tokens": 2048,
        "checkpoint.every": EVERY,
        "checkpoint.keep_last": 100,
        "optim.lr": 3e-3,
        "schedule.kind": "constant",
        "train.compile": "false",
    }
    overrides = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    run_dir = root / "run"
    cli(["train", ROOT / "recipes/demo.yaml", "--out", run_dir, *overrides])
    return run_dir


def checkpoints(run: Path) -> list[Path]:
    return [run / "checkpoints" / f"step-{s}" for s in range(EVERY, STEPS + 1, EVERY)]


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def provenance(folder: Path) -> dict:
    return json.loads((folder / "lmp.json").read_text())


# ------------------------------------------------------------------ averaging arithmetic


def test_uniform_last_k_is_the_exact_mean_and_loads_in_transformers(run, tmp_path):
    before = tree_digest(run / "checkpoints")
    out = tmp_path / "avg"
    cli(["merge-checkpoints", "--run", run, "--last-k", 4, "--out", out])
    inputs = checkpoints(run)[-4:]
    merged = weights_of(out)
    for name, tensor in merged.items():
        # weights of 1/4 make every product exact, so summing in input order in fp32 is the
        # arithmetic the merge must do, bit for bit
        expected = weights_of(inputs[0])[name].float() * 0.25
        for folder in inputs[1:]:
            expected = expected + weights_of(folder)[name].float() * 0.25
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected), name
    assert set(merged) == set(weights_of(inputs[0]))
    record = provenance(out)
    assert record["method"] == "uniform"
    assert [i["path"] for i in record["inputs"]] == [str(p.resolve()) for p in inputs]
    assert [i["weight"] for i in record["inputs"]] == [0.25] * 4
    assert tree_digest(run / "checkpoints") == before  # inputs untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert torch.equal(model.model.embed_tokens.weight.detach(), merged["model.embed_tokens.weight"])
    ids = tokenizer("And God said", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_weighted_and_ema_weights(run, tmp_path):
    inputs = checkpoints(run)[-3:]
    cli(["merge-checkpoints", *inputs, "--weights", "1,2", "--weights", "3", "--out", tmp_path / "w"])
    weights = [i["weight"] for i in provenance(tmp_path / "w")["inputs"]]
    assert weights == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=1e-12)
    merged = weights_of(tmp_path / "w")
    for name, tensor in merged.items():
        expected = sum(w * weights_of(f)[name].double() for w, f in zip([1, 2, 3], inputs, strict=True)) / 6
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)

    cli(["merge-checkpoints", *inputs, "--method", "ema", "--decay", "0.9", "--out", tmp_path / "e"])
    steps = [json.loads((f / "trainer_state.json").read_text())["step"] for f in inputs]
    raw = [0.9 ** (max(steps) - s) for s in steps]
    ema = [i["weight"] for i in provenance(tmp_path / "e")["inputs"]]
    assert ema == pytest.approx([r / sum(raw) for r in raw], rel=1e-9)
    assert ema[0] < ema[1] < ema[2]


def test_loss_weights_use_recorded_losses(run, tmp_path):
    inputs = checkpoints(run)[-3:]
    cli(["merge-checkpoints", *inputs, "--method", "loss", "--penalty", "20", "--out", tmp_path / "l"])
    losses = [json.loads((f / "trainer_state.json").read_text())["val_loss"] for f in inputs]
    raw = [math.exp(-20 * (loss - min(losses))) for loss in losses]
    record = provenance(tmp_path / "l")
    assert [i["val_loss"] for i in record["inputs"]] == losses
    assert [i["weight"] for i in record["inputs"]] == pytest.approx([r / sum(raw) for r in raw])


def test_stale_recorded_loss_is_rescored_like_the_trainer(run, tmp_path):
    # a copy of the run whose metrics say step 40 was not evaluated: its recorded loss is stale
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        if record["step"] == 40:
            record.pop("val_loss", None)
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    inputs = [copy / "checkpoints" / "step-40", copy / "checkpoints" / "step-50"]
    cli(["merge-checkpoints", *inputs, "--method", "loss", "--out", tmp_path / "l"])
    scored = provenance(tmp_path / "l")["inputs"][0]["val_loss"]
    recorded = json.loads((inputs[0] / "trainer_state.json").read_text())["val_loss"]
    assert scored == pytest.approx(recorded, abs=1e-4)  # the run's own scorer, same number


def test_loss_recorded_at_another_step_is_rescored_outside_the_run(run, tmp_path):
    # checkpoints copied out of their run: only trainer_state.json says when val_loss was measured
    loose = []
    for name in ("step-40", "step-50"):
        shutil.copytree(run / "checkpoints" / name, tmp_path / name)
        loose.append(tmp_path / name)
    state_file = loose[0] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    true_loss = state["val_loss"]
    assert state["val_loss_step"] == state["step"] == 40
    state.update(val_loss=99.0, val_loss_step=30)  # the latest evaluation was at an earlier step
    state_file.write_text(json.dumps(state))
    cli(["merge-checkpoints", *loose, "--method", "loss", "--run", run, "--out", tmp_path / "l"])
    record = provenance(tmp_path / "l")["inputs"]
    assert record[0]["val_loss"] == pytest.approx(true_loss, abs=1e-4)
    assert record[1]["val_loss"] == json.loads((loose[1] / "trainer_state.json").read_text())["val_loss"]


def test_greedy_soup_keeps_only_improvements(run, tmp_path):
    out = tmp_path / "soup"
    cli(["merge-checkpoints", "--run", run, "--last-k", 4, "--method", "greedy", "--out", out])
    record = provenance(out)
    inputs = record["inputs"]
    best_single = min(i["val_loss"] for i in inputs)
    log = record["greedy"]
    assert log[0]["input"] == min(inputs, key=lambda i: i["val_loss"])["path"]
    assert [e["kept"] for e in log][0]
    # each candidate is kept exactly when it lowers the best soup loss so far
    best = log[0]["soup_val_loss"]
    for entry in log[1:]:
        assert entry["kept"] == (entry["soup_val_loss"] < best)
        best = min(best, entry["soup_val_loss"]) if entry["kept"] else best
    assert record["val_loss"] == best <= best_single + 1e-4
    kept = {e["input"] for e in log if e["kept"]}
    for item in inputs:
        assert item["weight"] == pytest.approx(1 / len(kept) if item["path"] in kept else 0.0)
    # the written soup scores what the search measured
    model = Decoder(_config_from(out))
    model.load_state_dict(weights_of(out), strict=False)
    assert RunScorer(run)(model) == pytest.approx(record["val_loss"], abs=1e-4)


def _config_from(folder: Path) -> DecoderConfig:
    from lm_pretrain.model.export import decoder_config_from_hf

    return decoder_config_from_hf(json.loads((folder / "config.json").read_text()))


# ------------------------------------------------------------------ safety


def _variant(src: Path, dst: Path, tensors=None, config=None, tokenizer_edit=False) -> Path:
    """A transformers folder copied from `src` with its tensors, config or tokenizer changed."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt", "trainer_state.json"))
    if tensors is not None:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    if tokenizer_edit:
        tok = json.loads((dst / "tokenizer.json").read_text())
        tok["added_tokens"][0]["content"] = "<changed>"
        (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


@pytest.mark.parametrize("change", ["extra_key", "shape", "dtype", "config", "tokenizer"])
def test_mismatches_are_refused_naming_the_first(run, tmp_path, change):
    a = checkpoints(run)[-1]
    tensors = weights_of(a)
    config = json.loads((a / "config.json").read_text())
    if change == "extra_key":
        b = _variant(a, tmp_path / "b", tensors={**tensors, "extra.weight": torch.zeros(2)})
        expected = "extra.weight"
    elif change == "shape":
        tensors["model.norm.weight"] = torch.ones(7)
        b = _variant(a, tmp_path / "b", tensors=tensors)
        expected = "model.norm.weight"
    elif change == "dtype":
        tensors["model.norm.weight"] = tensors["model.norm.weight"].bfloat16()
        b = _variant(a, tmp_path / "b", tensors=tensors)
        expected = "BF16"
    elif change == "config":
        b = _variant(a, tmp_path / "b", config={**config, "rope_theta": 500000.0})
        expected = "rope_theta"
    else:
        b = _variant(a, tmp_path / "b", tokenizer_edit=True)
        expected = "tokenizer.json"
    with pytest.raises(LmpError) as caught:
        merge_checkpoints([a, b], tmp_path / "out")
    assert expected in str(caught.value) and str(b) in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert cli(["merge-checkpoints", a, b, "--out", tmp_path / "out"], code=2).startswith("error:")


def test_non_finite_weights_are_refused(run, tmp_path):
    a = checkpoints(run)[-1]
    tensors = weights_of(a)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    b = _variant(a, tmp_path / "b", tensors=tensors)
    with pytest.raises(LmpError, match=r"b: tensor model.norm.weight holds NaN or inf"):
        merge_checkpoints([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_inputs_from_different_runs_get_a_note(run, tmp_path):
    # a second run: the same checkpoint copied under another run's checkpoints/ folder
    other = tmp_path / "other" / "checkpoints" / "step-60"
    shutil.copytree(checkpoints(run)[-1], other)
    output = cli(["merge-checkpoints", checkpoints(run)[-2], other, "--out", tmp_path / "m"])
    assert "note: the inputs come from 2 different runs" in output
    output = cli(["merge-checkpoints", *checkpoints(run)[-2:], "--run", run, "--out", tmp_path / "n"])
    assert "different runs" not in output and "--run" in output and "was not used" in output


def test_existing_output_needs_force_and_inputs_are_protected(run, tmp_path):
    inputs = checkpoints(run)[-2:]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--force" in cli(["merge-checkpoints", *inputs, "--out", out], code=2)
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces an earlier merge, never a folder of other files or a training run
    assert "holds files but no model" in cli(["merge-checkpoints", *inputs, "--out", out, "--force"], code=2)
    assert (out / "keep.txt").read_text() == "mine"
    other_run = tmp_path / "other-run"
    other_run.mkdir()
    (other_run / "recipe.yaml").write_text("name: other\n")
    (other_run / "config.json").write_text("{}\n")
    assert "is a training run" in cli(["merge-checkpoints", *inputs, "--out", other_run, "--force"], code=2)
    assert sorted(p.name for p in other_run.iterdir()) == ["config.json", "recipe.yaml"]
    merged = tmp_path / "merged"
    cli(["merge-checkpoints", *inputs, "--out", merged])
    (merged / "stale.txt").write_text("from before")
    cli(["merge-checkpoints", *inputs, "--out", merged, "--force"])
    assert not (merged / "stale.txt").exists() and (merged / "model.safetensors").is_file()
    # an input as the output is refused even with --force
    before = tree_digest(inputs[0])
    assert "inputs are never modified" in cli(
        ["merge-checkpoints", *inputs, "--out", inputs[0], "--force"], code=2
    )
    assert tree_digest(inputs[0]) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"last_k": 2}, "--last-k K needs --run"),
        ({"weights": [1.0]}, "one weight per input"),
        ({"weights": [1.0, -1.0]}, ">= 0"),
        ({"method": "ema", "weights": [1.0, 2.0]}, "--weights goes with --method weighted"),
        ({"method": "median"}, "--method must be one of"),
        ({"method": "ema", "decay": 1.5}, "--decay"),
    ],
)
def test_bad_arguments_are_refused(run, tmp_path, kwargs, message):
    with pytest.raises(LmpError, match=message):
        merge_checkpoints(checkpoints(run)[-2:], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_greedy_outside_a_run_asks_for_run(run, tmp_path):
    # copies outside any run folder: no recipe to find the validation data
    copies = [shutil.copytree(c, tmp_path / c.name) for c in checkpoints(run)[-2:]]
    with pytest.raises(LmpError, match="--run RUN"):
        merge_checkpoints(copies, tmp_path / "out", method="greedy")
    result = merge_checkpoints(copies, tmp_path / "out", method="greedy", run=run)
    assert result.val_loss is not None and sum(result.weights) == pytest.approx(1.0)


def test_failed_write_leaves_nothing(run, tmp_path, monkeypatch):
    import lm_pretrain.merge as merge

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(merge, "save_file", broken_save)
    with pytest.raises(OSError):
        merge.merge_checkpoints(checkpoints(run)[-2:], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ transformers folders


def _synthetic(folder: Path, seed: int, dtype: torch.dtype, src: Path, shards: int = 1) -> Path:
    """A transformers folder with random weights of `src`'s shapes, optionally sharded."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(t.shape, generator=generator).to(dtype) for n, t in weights_of(src).items()}
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.pt", "*.json", "*.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(src / name, folder / name)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[i::shards]}
        save_file(chunk, str(folder / part), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, part))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_bf16_and_sharded_inputs_average_in_fp32(run, tmp_path):
    src = checkpoints(run)[-1]
    a = _synthetic(tmp_path / "a", 1, torch.bfloat16, src)
    b = _synthetic(tmp_path / "b", 2, torch.bfloat16, src, shards=2)
    c = _synthetic(tmp_path / "c", 3, torch.bfloat16, src)
    cli(["merge-checkpoints", a, b, c, "--out", tmp_path / "out"])
    merged = weights_of(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    parts = [weights_of(a)]
    parts.append({k: v for p in sorted(b.glob("model-*.safetensors")) for k, v in load_file(p).items()})
    parts.append(weights_of(c))
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        exact = sum(p[name].double() for p in parts) / 3
        # summed in fp32 and rounded to bf16 once: within half a bf16 step of the exact mean
        # (summing in bf16 would round at every step and miss this bound)
        assert torch.allclose(tensor.double(), exact, rtol=2**-8, atol=1e-6), name


# ------------------------------------------------------------------ the in-training averager


def tiny_model(seed: int) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2))


def perturbed(model: Decoder, seed: int) -> list[torch.Tensor]:
    """Change every parameter in place (a stand-in for an optimizer step); return the new values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator))
    return [p.detach().clone() for p in model.parameters()]


def test_ema_arithmetic_and_swap(tmp_path):
    model = tiny_model(0)
    history = [perturbed(model, s) for s in range(1, 4)]
    averager = WeightAverager(model, "ema", decay=0.75)
    for values in history:
        with torch.no_grad():
            for p, v in zip(model.parameters(), values, strict=True):
                p.copy_(v)
        averager.update(model)
    expected = [h0.clone() for h0 in history[0]]
    for values in history[1:]:
        expected = [e + 0.25 * (v - e) for e, v in zip(expected, values, strict=True)]
    averaged = averager.averaged()
    for (name, _), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(averaged[name], e, rtol=1e-6, atol=1e-6)

    raw = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 50, (2, 8))
    reference = tiny_model(0)
    reference.load_state_dict({**reference.state_dict(), **averaged}, strict=False)
    with averager.applied(model):
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert all(
        torch.equal(p, r) for p, r in zip(model.parameters(), raw, strict=True)
    )  # restored bit for bit
    with pytest.raises(RuntimeError), averager.applied(model):
        raise RuntimeError("eval failed")
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw, strict=True))


def test_last_k_mean_and_resume():
    model = tiny_model(1)
    averager = WeightAverager(model, "last_k", k=3, every=5)
    assert [s for s in range(1, 21) if averager.due(s)] == [5, 10, 15, 20]
    history = []
    for seed in range(5):
        history.append(perturbed(model, seed))
        averager.update(model)
    averaged = averager.averaged()
    for i, (name, _) in enumerate(model.named_parameters()):
        a, b, c = (h[i] for h in history[-3:])
        assert torch.equal(averaged[name], (a + b + c) / 3), name  # only the newest 3, summed in order

    # a restored averager continues exactly like the original
    clone = WeightAverager(model, "last_k", k=3, every=5)
    clone.load_state_dict(averager.state_dict())
    perturbed(model, 99)
    averager.update(model)
    clone.update(model)
    for name, tensor in averager.averaged().items():
        assert torch.equal(clone.averaged()[name], tensor)
    with pytest.raises(LmpError, match="ema"):
        WeightAverager(model, "ema").load_state_dict(averager.state_dict())


@pytest.mark.slow
def test_run_scorer_scores_packed_documents_as_the_trainer_does(bible_corpus, tmp_path):
    from conftest import tiny_run_args
    from lm_pretrain.merge import _decoder_for, _fp32_weights, _load_fp32, read_input

    run = tmp_path / "run"
    extra = {"data.packing": "document", "train.eval_every": 4, "checkpoint.every": 4}
    args = tiny_run_args(bible_corpus, tmp_path / "cache", 4, **extra)
    result = CliRunner().invoke(app, ["train", *args, "--out", str(run)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = next(r["val_loss"] for r in logged if r["step"] == 4 and "val_loss" in r)
    item = read_input(run / "checkpoints" / "step-4")
    model = _decoder_for([item])
    _load_fp32(model, _fp32_weights(item))
    # documents kept apart by their BOS, as in training; across boundaries the loss differs
    assert abs(RunScorer(run)(model) - trained) < 1e-4


def test_output_inside_what_training_wrote_is_refused(run, tmp_path):
    inputs = checkpoints(run)[-2:]
    final = tree_digest(run / "final")
    assert "part of the training run" in cli(
        ["merge-checkpoints", *inputs, "--out", run / "final", "--force"], code=2
    )
    assert tree_digest(run / "final") == final
    assert "part of the training run" in cli(
        ["merge-checkpoints", *inputs, "--out", run / "checkpoints" / "avg"], code=2
    )
    assert not (run / "checkpoints" / "avg").exists()
    # a folder of the user's own beside them is fine
    cli(["merge-checkpoints", *inputs, "--out", tmp_path / "elsewhere"])


def test_one_input_and_a_last_k_past_the_checkpoints_are_noted(run, tmp_path):
    output = cli(["merge-checkpoints", checkpoints(run)[-1], "--out", tmp_path / "one"])
    assert "note: one input" in output and "a copy of its weights" in output
    output = cli(["merge-checkpoints", "--run", run, "--last-k", 100, "--out", tmp_path / "all"])
    assert "--last-k 100: the run has" in output and "all merged" in output
    output = cli(["merge-checkpoints", "--run", run, "--last-k", 2, "--out", tmp_path / "two"])
    assert "note:" not in output
