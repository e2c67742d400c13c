"""optim.kind muon: which tensors Muon updates, one update against a reference computed here,
resume exactness, and the refusals."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, tiny_run_args
from lm_pretrain.cli import app
from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import Decoder, DecoderConfig
from lm_pretrain.recipe import OptimConfig, load_recipe
from lm_pretrain.train.optim import MUON_SETTINGS, build_optimizer, muon_parameters, set_learning_rates


def tiny(tie: bool = True) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, tie_embeddings=tie
    )
    return Decoder(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tie):
    model = tiny(tie)
    on_muon = set(muon_parameters(model))
    expected = {
        f"model.layers.{i}.self_attn.{p}.weight"
        for i in range(2)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    expected |= {
        f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert on_muon == expected
    optimizer = build_optimizer(model, OptimConfig(kind="muon"))
    by_id = {id(p): n for n, p in model.named_parameters()}
    muon = {by_id[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {by_id[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert muon == expected and not muon & adamw
    assert "model.embed_tokens.weight" in adamw and "model.norm.weight" in adamw
    assert ("lm_head.weight" in adamw) == (not tie)  # a tied head is the embedding


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation of Muon (Jordan et al. 2024), in fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / g.norm()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_one_step_matches_a_reference():
    model = tiny()
    cfg = OptimConfig(kind="muon", lr=1e-2, weight_decay=0.05)
    optimizer = build_optimizer(model, cfg)
    set_learning_rates(optimizer, 0.5, cfg.lr)  # the schedule's ratio applies to both optimizers
    torch.manual_seed(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    optimizer.step()
    params = dict(model.named_parameters())
    lr = cfg.lr * 0.5

    # Muon: decoupled weight decay, then the orthogonalised direction (momentum only scales the
    # first step's gradient, which the normalisation removes) at the AdamW-matched RMS scale
    name = "model.layers.1.mlp.up_proj.weight"  # 64 x 32
    w, g = before[name], grads[name]
    expected = w * (1 - lr * cfg.muon.weight_decay) - lr * 0.2 * math.sqrt(max(w.shape)) * newton_schulz(g)
    torch.testing.assert_close(params[name].detach(), expected, rtol=0, atol=3e-4)  # Muon runs NS in bf16

    # AdamW, first step: the bias-corrected update is the gradient's sign (|g| >> eps)
    name = "model.embed_tokens.weight"
    w, g = before[name], grads[name]
    torch.testing.assert_close(
        params[name].detach(), w * (1 - lr * cfg.weight_decay) - lr * g.sign(), rtol=0, atol=1e-6
    )
    name = "model.norm.weight"  # no weight decay on norms
    torch.testing.assert_close(
        params[name].detach(), before[name] - lr * grads[name].sign(), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("nesterov,adjust", [(True, "match_rms_adamw"), (False, "original")])
def test_the_batched_step_computes_torch_muons_update(nesterov, adjust):
    """lmp steps torch.optim.Muon's state with the Newton-Schulz iterations of same-shaped
    matrices batched; three steps of it against Muon's own step from the same start."""
    cfg = OptimConfig.model_validate(
        {"kind": "muon", "lr": 1e-2, "muon": {"nesterov": nesterov, "adjust_lr": adjust}}
    )
    ours, theirs = tiny(), tiny()
    fast, reference = build_optimizer(ours, cfg), build_optimizer(theirs, cfg)
    assert all(MUON_SETTINGS <= group.keys() for group in fast.muon.param_groups)  # not the fallback
    torch.manual_seed(2)
    for _ in range(3):
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fast.step()
        reference.muon.step()
        reference.adamw.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        # bitwise on the project's hosts; a rounding's worth of room for other matmul kernels
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for a, b in zip(
        fast.state_dict()["state"].values(), reference.state_dict()["state"].values(), strict=True
    ):
        assert a.keys() == b.keys()


def test_state_dict_round_trips_into_a_fresh_optimizer():
    model = tiny()
    cfg = OptimConfig(kind="muon")
    first = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    first.step()
    saved = first.state_dict()
    second = build_optimizer(model, cfg)
    second.load_state_dict(saved)
    again = second.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    assert saved["state"].keys() == again["state"].keys()
    for i, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(again["state"][i][key])), (i, key)
    adamw_state = build_optimizer(model, OptimConfig()).state_dict()
    with pytest.raises(LmpError, match="optim.kind"):
        second.load_state_dict(adamw_state)


def test_refusals_name_the_fix(monkeypatch):
    with pytest.raises(LmpError, match="train.distributed=ddp"):
        load_recipe(ROOT / "recipes/demo.yaml", ["optim.kind=muon", "train.distributed=fsdp"])
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(LmpError, match=r"PyTorch 2\.9 and newer"):
        build_optimizer(tiny(), OptimConfig(kind="muon"))


def losses(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_muon_training_resumes_bit_for_bit(bible_corpus, tmp_path):
    sets = {"optim.kind": "muon", "schedule.kind": "constant", "train.log_every": 1, "checkpoint.every": 4}
    sets["train.average"] = "{kind: ema}"
    for name, steps in [("straight", [8]), ("resumed", [4, 8])]:
        for n in steps:
            args = tiny_run_args(bible_corpus, tmp_path / "cache", n, **sets)
            result = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / name)])
            assert result.exit_code == 0, result.output + repr(result.exception)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == list(range(1, 9)) and straight == resumed
    assert straight[8] < straight[1]


@pytest.mark.slow
def test_muon_under_two_processes_and_compile_trains_as_one_eager_process(bible_corpus, tmp_path):
    import os
    import subprocess
    import sys

    sets = {
        "optim.kind": "muon",
        "schedule.kind": "constant",
        "train.log_every": 1,
        "train.precision": "fp32",
    }
    for name, nproc, extra in [("one", 1, {}), ("two", 2, {"train.compile": True})]:
        args = tiny_run_args(bible_corpus, tmp_path / "cache", 6, **sets, **extra)
        cmd = [sys.executable, "-m", "lm_pretrain.cli", "train", *args, "--out", str(tmp_path / name)]
        cmd += ["--nproc", str(nproc)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "miscomputes" not in done.stdout
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    assert max(abs(one[s] - two[s]) / one[s] for s in one) < 1e-3, (one, two)
