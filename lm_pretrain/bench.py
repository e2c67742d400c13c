"""`lmp bench`: how fast lmp trains, measured against transformers' LlamaForCausalLM in one run.

One run measures the machine's matmul peak (fp32 and bf16), then trains lmp's decoder (eager and,
with compile, torch.compile'd as train.compile does) and transformers' LlamaForCausalLM built with
the identical config and starting weights, on the same random token batches, with bf16 autocast
and fused AdamW for all. Each model trains in a process of its own, as a training run does (in one
process a model's freed memory changes the allocator's state for the next: lmp compiled took
10-25 thousand page faults a step beside transformers, about 50 alone). Steps are interleaved
(transformers, lmp, lmp compiled, transformers compiled, transformers, ...), one process working
at a time, so a noisy shared machine slows every model alike, and per-phase medians are reported:

- data: waiting for the next batch from the background worker (train_loader, as training);
- forward / backward / optimizer (gradient clipping, fused AdamW step, zero_grad);
- tokens/s from the median step, MFU = achieved model FLOP/s over the square bf16 matmul peak, and
  over the rate the model's own matmul shapes reach (model_shapes_rate), both measured in the run
  (model FLOPs per token: 6 x matmul parameters + 12 x layers x hidden x seq, the PaLM convention);
- peak memory of a training step (CPU: peak RSS above the built model, each model in its own
  process; GPU: torch.cuda.max_memory_allocated), for lmp's loss with and without chunking, and
  with activation checkpointing.

lmp trains with `forward(..., return_logits=False)`, which takes the loss from chunked_lm_loss (no
full-vocabulary fp32 logits). The loss is fetched once every LOSS_EVERY steps, never per step.
It also reports tokenizer training and encoding throughput on the builtin demo corpus, and
minimal-pair scoring throughput of `lmp eval` on lmp's grammar probe.

On a GPU the same code runs in CUDA with bf16 autocast, where SDPA picks flash attention; phases
are timed with a synchronize between them, and MFU is against the measured bf16 matmul peak.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lm_pretrain.bench_memory import step_memory_mb
from lm_pretrain.data.loader import PackedWindows, TrainBatches, train_loader
from lm_pretrain.host_memory import keep_freed_memory
from lm_pretrain.model.decoder import Decoder, DecoderConfig
from lm_pretrain.model.export import hf_config_dict
from lm_pretrain.recipe import ModelConfig, OptimConfig
from lm_pretrain.train.optim import build_optimizer

LOSS_EVERY = 10  # steps between host reads of the loss, as train.log_every does
HF = "transformers"
HF_COMPILED = "transformers compiled"
LMP = "lmp"
LMP_COMPILED = "lmp compiled"


@dataclass(frozen=True)
class Shape:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int | None = None
    vocab: int = 8192
    seq: int = 256
    batch: int = 16
    tie_embeddings: bool = True

    def decoder_config(self) -> DecoderConfig:
        """The decoder a recipe with this shape trains (the defaults are from_recipe's)."""
        model = ModelConfig(
            hidden_size=self.hidden,
            num_layers=self.layers,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            max_seq_len=self.seq,
            tie_embeddings=self.tie_embeddings,
        )
        return DecoderConfig.from_recipe(model, self.vocab, None, None, None)


def shape_from_recipe(path: Path, overrides: list[str] | None = None) -> Shape:
    """The model, sequence length and micro-batch of a recipe; the vocabulary is the tokenizer's target."""
    from lm_pretrain.recipe import load_recipe

    recipe = load_recipe(path, overrides)
    m = recipe.model
    return Shape(
        hidden=m.hidden_size,
        layers=m.num_layers,
        heads=m.num_heads,
        kv_heads=m.num_kv_heads,
        intermediate=m.intermediate_size,
        vocab=recipe.tokenizer.vocab_size,
        seq=recipe.seq_len,
        batch=recipe.train.micro_batch_size or recipe.train.batch_size,
        tie_embeddings=m.tie_embeddings,
    )


@dataclass
class ModelResult:
    name: str
    tokens_per_s: float
    step_s: float
    data_s: float
    forward_s: float
    backward_s: float
    optimizer_s: float
    data_share: float
    mfu: float
    mfu_model_shapes: float
    peak_memory_mb: float | None = None
    final_loss: float | None = None


@dataclass
class BenchResult:
    device: str
    shape: dict
    parameters: int
    flops_per_token: float
    peak_gflops: dict
    models: list[ModelResult]
    ratios: dict
    loss_memory_mb: dict = field(default_factory=dict)
    prep: dict | None = None
    eval: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- machine peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(
    dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int] | None = None, repeats: int = 5
) -> float:
    """The best GFLOP/s of an (m x k) @ (k x n) matmul; without a shape, the best over square sizes
    (the machine's peak: on AMX a 1024 cube reaches about half what a 2048 one does)."""
    if shape is None:
        sizes = (8192,) if device.type == "cuda" else (1024, 2048, 4096)
        # three timings each: a 4096 cube in fp32 takes most of a second per call on a 2-core CPU
        return max(matmul_peak(dtype, device, (s, s, s), min(repeats, 3)) for s in sizes)
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    # about 4 GFLOP of work per timing on a CPU (a few ms to a second; at most 100 calls, for tiny
    # shapes), 20 calls on a GPU
    inner = 20 if device.type == "cuda" else min(100, max(1, round(4e9 / (2 * m * k * n))))
    torch.mm(a, b)  # warm-up: thread pools, kernel selection
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        _sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * m * k * n / best / 1e9


def model_shapes_rate(cfg: DecoderConfig, rows: int, device: torch.device) -> float:
    """The bf16 GFLOP/s the model's own matmuls reach here: each projection's three products of a
    training step (forward, input gradient, weight gradient: rows = batch x seq tokens) timed
    alone, combined as their FLOP-weighted harmonic mean (the rate at which the step's matmul work
    would run back to back)."""
    h, i, kv, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim, cfg.vocab_size
    L = cfg.num_layers
    shapes = [
        ((rows, h, h), 2 * L),
        ((rows, h, kv), 2 * L),
        ((rows, h, i), 2 * L),
        ((rows, i, h), L),
        ((rows, h, v), 1),
    ]
    flops = seconds = 0.0
    for (m, k, n), count in shapes:
        work = 2 * m * k * n * count
        for product in ((m, k, n), (m, n, k), (k, m, n)):  # y = x W, dx = dy W^T, dW = x^T dy
            flops += work
            seconds += work / (matmul_peak(torch.bfloat16, device, product, repeats=3) * 1e9)
    return flops / seconds / 1e9


def flops_per_token(cfg: DecoderConfig, seq: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward + backward), plus attention's
    score and value products, 12 x layers x hidden x seq (PaLM appendix B; nanoGPT's MFU)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down
    matmul_params = cfg.num_layers * per_layer + cfg.vocab_size * h  # + lm_head
    return 6 * matmul_params + 12 * cfg.num_layers * h * seq


# ---------------------------------------------------------------- the models


def build_lmp(shape: Shape, device: torch.device, seed: int = 0) -> Decoder:
    """lmp's decoder of this shape, its weights drawn from the seed."""
    torch.manual_seed(seed)
    return Decoder(shape.decoder_config()).to(device)


def build_models(shape: Shape, device: torch.device, seed: int = 0) -> tuple[Decoder, torch.nn.Module]:
    """lmp's decoder and transformers' LlamaForCausalLM with the same config and weights."""
    lmp = build_lmp(shape, device, seed)
    return lmp, hf_twin(lmp)


def hf_twin(lmp: Decoder) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with lmp's config (the one lmp exports) and its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{**hf_config_dict(lmp.config), "use_cache": False}, attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg).to(lmp.lm_head.weight.device)
    # parameter names are transformers' own, so the state dict loads as it is
    hf.load_state_dict(lmp.state_dict(), strict=True)
    return hf


def _hf_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # what transformers' own loss does with labels: fp32 logits, mean cross-entropy
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def _hf_trainer_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # as the HF Trainer trains: labels into the model, whose forward (compiled with torch_compile=True)
    # computes the loss; transformers shifts labels itself, so labels[t + 1] is targets[t] and each
    # row's last target is left out
    labels = torch.cat([targets[:, :1], targets[:, :-1]], dim=1)
    return model(input_ids=inputs, labels=labels).loss


def _lmp_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(inputs, targets, return_logits=False).loss


def _lmp_plain_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(inputs, targets).loss


class Trainee:
    """One model under training: its loss function, optimizer and per-phase step timings."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device,
    ) -> None:
        self.name = name
        self.model = model
        self.loss_fn = loss_fn
        self.device = device
        self.optimizer = build_optimizer(model, OptimConfig(lr=3e-4))
        self.times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        self.loss_sum = torch.zeros((), device=device)
        self.last_loss: float | None = None
        self.steps = 0

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, record: bool) -> None:
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.loss_fn(self.model, inputs, targets)
        _sync(self.device)  # only to split the phases; the trainer never syncs here
        t1 = time.perf_counter()
        loss.backward()
        _sync(self.device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        t3 = time.perf_counter()
        self.loss_sum += loss.detach()
        self.steps += 1
        if self.steps % LOSS_EVERY == 0:
            self.last_loss = self.loss_sum.item() / LOSS_EVERY
            self.loss_sum.zero_()
        if record:
            self.times["forward"].append(t1 - t0)
            self.times["backward"].append(t2 - t1)
            self.times["optimizer"].append(t3 - t2)


# ---------------------------------------------------------------- data


class BackgroundBatches:
    """Packed windows of a random token stream, served exactly as training serves its batches:
    TrainBatches prepared ahead in train_loader's background worker process."""

    def __init__(self, shape: Shape, device: torch.device, seed: int = 0) -> None:
        tokens = np.random.default_rng(seed).integers(0, shape.vocab, size=shape.seq * shape.batch * 64)
        windows = PackedWindows(
            tokens.astype(np.uint16 if shape.vocab < 65536 else np.int32), shape.seq, seed, 0
        )
        endless = 1 << 40
        batches = TrainBatches(
            windows,
            micro=shape.batch,
            accum=1,
            batch_size=shape.batch,
            rank=0,
            seq_len=shape.seq,
            start=(0, 0, 0),
            last_step=endless,
            main_steps=endless,
        )
        self.loader: Iterator | None = train_loader(
            batches, background=True, pin_memory=device.type == "cuda"
        )
        self.device = device

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = next(self.loader)
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.loader = None  # the last reference: the worker process shuts down


# ---------------------------------------------------------------- prep and eval throughput


def prep_throughput(vocab: int, max_documents: int | None = None) -> dict:
    """Tokenizer training and encoding of the builtin demo corpus, as `lmp data prepare` does."""
    from lm_pretrain.data.builtin import demo_documents
    from lm_pretrain.data.tokenizer import train_tokenizer
    from lm_pretrain.recipe import TokenizerConfig

    docs = demo_documents()[:max_documents]
    texts = [d.text for d in docs]
    cfg = TokenizerConfig(vocab_size=vocab)
    start = time.perf_counter()
    tok = train_tokenizer(texts, cfg)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    encoded = tok.encode_batch(texts)
    encode_s = time.perf_counter() - start
    n_tokens = sum(len(e.ids) for e in encoded)
    words = sum(len(t.split()) for t in texts)
    return {
        "documents": len(texts),
        "words": words,
        "tokens": n_tokens,
        "tokenizer_train_s": train_s,
        "tokenizer_train_words_per_s": words / train_s,
        "encode_tokens_per_s": n_tokens / encode_s,
        "_tokenizer": tok,
        "_cfg": cfg,
    }


def eval_throughput(
    shape: Shape, tokenizer: Any, cfg: Any, pairs_per_phenomenon: int = 20, fp32_peak_gflops: float = 0.0
) -> dict:
    """Minimal pairs scored per second by `lmp eval`'s scorer on lmp's grammar probe, for an
    (untrained) model of the benchmark's shape: in fp32, and with the forward passes under bf16
    autocast; and the matmul work of every sentence's tokens, per second of fp32 scoring, as a
    fraction of the fp32 matmul peak (its limit, were each token computed: token trees compute a
    prefix sentences share once, so this can pass 1). The speed does not depend on the weights,
    but `--precision bf16` also rescores in fp32 the items too close to call, and an untrained
    model leaves nearly all of them close, so that share is measured on a trained model
    (scripts/bench_eval.py)."""
    try:
        from lm_pretrain.eval.probe import probe_items
        from lm_pretrain.eval.runner import score_items_as_set
        from lm_pretrain.eval.scoring import load_scoring_model
    except ImportError as exc:
        return {"available": False, "reason": f"lm_pretrain.eval not available ({exc})"}
    from lm_pretrain.data.tokenizer import save_hf_tokenizer, special_token_ids
    from lm_pretrain.model.export import save_model

    ids = special_token_ids(tokenizer, cfg)
    config = shape.decoder_config()
    config.vocab_size = tokenizer.get_vocab_size()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    model = Decoder(config)
    items = probe_items(0, pairs_per_phenomenon)
    sentences = {s for item in items for s in item.sentences}
    # each distinct sentence runs once: 2 FLOPs per weight per input token (attention is negligible)
    tokens = sum(len(tokenizer.encode(s).ids) - 1 for s in sentences)
    flops = (
        2 * (model.num_parameters(exclude_embeddings=True) + config.vocab_size * config.hidden_size) * tokens
    )
    out: dict[str, Any] = {"available": True, "pairs": len(items)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_model(model, folder)
        save_hf_tokenizer(tokenizer, folder, cfg, config.max_seq_len)
        sm = load_scoring_model(folder, "causal", device="cuda" if torch.cuda.is_available() else "cpu")
        for precision in ("fp32", "bf16"):
            with torch.autocast(sm.device.type, torch.bfloat16, enabled=precision == "bf16"):
                score_items_as_set(sm, items[:4])  # warm-up
                start = time.perf_counter()
                score_items_as_set(sm, items)
                seconds = time.perf_counter() - start
            out[f"{precision}_pairs_per_s"] = len(items) / seconds
        fp32_gflops = flops / (len(items) / out["fp32_pairs_per_s"]) / 1e9
        out["fp32_limit_fraction"] = fp32_gflops / fp32_peak_gflops if fp32_peak_gflops else None
    return out


# ---------------------------------------------------------------- the benchmark


def _train_worker(shape: Shape, name: str, device_type: str, threads: int, conn: Connection) -> None:
    """One model training in a process of its own: a step each time the parent sends whether to
    record it, and at None its timings, last loss and data waits."""
    try:
        torch.set_num_threads(threads)
        # as lmp train does, in every model's process: the ratios compare models and kernels, not
        # the C library's defaults (host_memory.py)
        keep_freed_memory()
        device = torch.device(device_type)
        # only the model this process trains: transformers' twin takes lmp's weights
        model = build_lmp(shape, device)
        if name in (HF, HF_COMPILED):
            model = hf_twin(model)
        if name in (LMP_COMPILED, HF_COMPILED):
            # lmp compiled as train.compile compiles it, and transformers as the HF Trainer compiles
            # it with torch_compile=True (the whole model, loss included)
            model = torch.compile(model)
        loss_fn = {HF: _hf_loss, LMP: _lmp_loss, LMP_COMPILED: _lmp_loss, HF_COMPILED: _hf_trainer_loss}[name]
        trainee = Trainee(name, model, loss_fn, device)
        data = BackgroundBatches(shape, device)  # the same seed, so every model gets the same batches
        data_times: list[float] = []
        try:
            while (record := conn.recv()) is not None:
                start = time.perf_counter()
                inputs, targets = data.next()
                if record:
                    data_times.append(time.perf_counter() - start)
                trainee.step(inputs, targets, record)
                conn.send(("ok", None))
        finally:
            data.close()
        conn.send(("ok", (trainee.times, trainee.last_loss, data_times)))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _train_interleaved(
    shape: Shape, names: list[str], device: torch.device, steps: int, warmup: int, log: Callable[[str], None]
) -> dict[str, tuple[dict[str, list[float]], float | None, list[float]]]:
    """Each model in its own process, their steps taken in turn: {name: (phase times, last loss,
    data waits)}."""
    context = multiprocessing.get_context("spawn")
    workers = []
    for name in names:
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_train_worker, args=(shape, name, device.type, torch.get_num_threads(), theirs)
        )
        process.start()
        workers.append((name, process, ours))

    def answer(name: str, conn: Connection) -> Any:
        try:
            status, payload = conn.recv()
        except EOFError:
            raise RuntimeError(f"the {name} benchmark process died (out of memory?)") from None
        if status == "error":
            raise RuntimeError(f"the {name} benchmark process failed:\n{payload}")
        return payload

    try:
        for step in range(warmup + steps):
            if step == 0:
                log("warm-up" + (" (compiling)" if LMP_COMPILED in names else ""))
            elif step == warmup:
                log(f"timing {steps} interleaved steps per model, each model in its own process")
            for name, _, conn in workers:
                conn.send(step >= warmup)
                answer(name, conn)
        results = {}
        for name, _, conn in workers:
            conn.send(None)
            results[name] = answer(name, conn)
        return results
    finally:
        for _, process, _ in workers:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()


def run_bench(
    shape: Shape,
    steps: int = 10,
    warmup: int = 2,
    compile: bool = True,
    memory: bool = True,
    prep: bool = True,
    prep_documents: int | None = None,
    eval_pairs: int = 20,
    log: Callable[[str], None] = lambda _: None,
) -> BenchResult:
    """Measure everything described in the module docstring; steps are timed after warmup."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log("measuring the matmul peak")
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    # the rate of the model's own MLP matmul: small matrices rarely reach the square-matmul peak
    mlp = (shape.batch * shape.seq, shape.hidden, shape.decoder_config().intermediate_size)
    peaks["bf16_mlp_shape"] = matmul_peak(torch.bfloat16, device, mlp)
    peaks["bf16_model_shapes"] = model_shapes_rate(shape.decoder_config(), shape.batch * shape.seq, device)

    lmp = build_lmp(shape, device)  # for its config and size; the models train in their own processes
    names = [HF, LMP] + ([LMP_COMPILED, HF_COMPILED] if compile else [])
    timings = _train_interleaved(shape, names, device, steps, warmup, log)

    cfg = lmp.config
    fpt = flops_per_token(cfg, shape.seq)
    # MFU against the square-matmul peak (the usual definition), and against what the model's own
    # matmul shapes reach here (small models rarely come near the square peak, on AMX least of all)
    peak, shapes_peak = peaks["bf16"], peaks["bf16_model_shapes"]
    results = []
    for name in names:
        times, final_loss, data_times = timings[name]
        phases = {k: statistics.median(v) for k, v in times.items()}
        data_s = statistics.median(data_times)
        # the median of whole steps, not the sum of phase medians
        step_s = (
            statistics.median(
                f + b + o
                for f, b, o in zip(times["forward"], times["backward"], times["optimizer"], strict=True)
            )
            + data_s
        )
        tps = shape.batch * shape.seq / step_s
        results.append(
            ModelResult(
                name=name,
                tokens_per_s=tps,
                step_s=step_s,
                data_s=data_s,
                forward_s=phases["forward"],
                backward_s=phases["backward"],
                optimizer_s=phases["optimizer"],
                data_share=data_s / step_s,
                mfu=tps * fpt / (peak * 1e9),
                mfu_model_shapes=tps * fpt / (shapes_peak * 1e9),
                final_loss=final_loss,
            )
        )
    by_name = {r.name: r for r in results}
    ratios = {f"{r.name} / {HF}": r.tokens_per_s / by_name[HF].tokens_per_s for r in results if r.name != HF}
    if compile:
        ratios[f"{LMP_COMPILED} / {HF_COMPILED}"] = (
            by_name[LMP_COMPILED].tokens_per_s / by_name[HF_COMPILED].tokens_per_s
        )

    loss_memory: dict = {}
    if memory and device.type == "cpu":
        log("measuring peak step memory (one process per model)")
        memory_mb = step_memory_mb(shape, ["hf", "lmp", "lmp-plain", "lmp-checkpointed"])
        by_name[HF].peak_memory_mb = memory_mb["hf"]
        by_name[LMP].peak_memory_mb = memory_mb["lmp"]
        plain = memory_mb["lmp-plain"]
        loss_memory = {
            "plain_loss": plain,
            "chunked_loss": by_name[LMP].peak_memory_mb,
            "activation_checkpointing": memory_mb["lmp-checkpointed"],
        }
        if plain is not None and by_name[LMP].peak_memory_mb is not None:
            loss_memory["saving"] = plain - by_name[LMP].peak_memory_mb
    elif memory:
        loss_memory = _gpu_loss_memory(shape, device, lmp, hf_twin(lmp), by_name)

    prep_result = eval_result = None
    if prep:
        log("tokenizer training and encoding on builtin:demo")
        prep_result = prep_throughput(shape.vocab, prep_documents)
        if eval_pairs > 0:
            log("minimal-pair scoring")
            eval_result = eval_throughput(
                shape, prep_result["_tokenizer"], prep_result["_cfg"], eval_pairs, peaks["fp32"]
            )
        prep_result = {k: v for k, v in prep_result.items() if not k.startswith("_")}

    return BenchResult(
        device=_device_name(device),
        shape=asdict(shape),
        parameters=lmp.num_parameters(),
        flops_per_token=fpt,
        peak_gflops=peaks,
        models=results,
        ratios=ratios,
        loss_memory_mb=loss_memory,
        prep=prep_result,
        eval=eval_result,
    )


def _gpu_loss_memory(
    shape: Shape, device: torch.device, lmp: Decoder, hf: torch.nn.Module, by_name: dict[str, ModelResult]
) -> dict:
    """On a GPU the allocator counts exactly: one step of each, peak allocated above the start."""
    peaks = {}
    runs = [
        (HF, hf, _hf_loss),
        (LMP, lmp, _lmp_loss),
        ("plain", lmp, _lmp_plain_loss),
        ("ckpt", lmp, _lmp_loss),
    ]
    for name, model, loss_fn in runs:
        lmp.activation_checkpointing = name == "ckpt"
        trainee = Trainee(name, model, loss_fn, device)
        inputs = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device)
        targets = torch.roll(inputs, -1, 1)
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        trainee.step(inputs, targets, record=False)
        peaks[name] = (torch.cuda.max_memory_allocated() - start) / 2**20
    lmp.activation_checkpointing = False
    by_name[HF].peak_memory_mb, by_name[LMP].peak_memory_mb = peaks[HF], peaks[LMP]
    return {
        "plain_loss": peaks["plain"],
        "chunked_loss": peaks[LMP],
        "saving": peaks["plain"] - peaks[LMP],
        "activation_checkpointing": peaks["ckpt"],
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu, {torch.get_num_threads()} threads"
