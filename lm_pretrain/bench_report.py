"""`lmp bench`'s report: the table of models side by side, the lines under it, and the JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm_pretrain.bench import HF, BenchResult


def result_table(result: BenchResult) -> Any:
    from rich.table import Table

    s = result.shape
    title = (
        f"{result.device}: hidden {s['hidden']}, {s['layers']} layers, seq {s['seq']}, batch {s['batch']}, "
        f"vocab {s['vocab']} ({result.parameters / 1e6:.1f}M parameters), bf16 autocast; matmul peak "
        f"fp32 {result.peak_gflops['fp32']:.0f}, bf16 {result.peak_gflops['bf16']:.0f} GFLOP/s "
        f"(bf16 at the MLP's shape {result.peak_gflops['bf16_mlp_shape']:.0f}, over all the model's matmul "
        f"shapes {result.peak_gflops['bf16_model_shapes']:.0f})"
    )
    table = Table(title=title, title_justify="left")
    for column in ["model", "tokens/s", "vs transformers", "MFU", "MFU (shapes)", "data", "forward",
                   "backward", "optimizer", "peak MiB"]:  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right")
    hf_tps = next(r.tokens_per_s for r in result.models if r.name == HF)
    for r in result.models:
        table.add_row(
            r.name,
            f"{r.tokens_per_s:,.0f}",
            f"{r.tokens_per_s / hf_tps:.2f}x",
            f"{r.mfu:.1%}",
            f"{r.mfu_model_shapes:.1%}",
            f"{r.data_s * 1e3:.1f} ms ({r.data_share:.1%})",
            f"{r.forward_s * 1e3:.0f} ms",
            f"{r.backward_s * 1e3:.0f} ms",
            f"{r.optimizer_s * 1e3:.0f} ms",
            "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:,.0f}",
        )
    return table


def result_lines(result: BenchResult) -> list[str]:
    """The lines printed under the table: loss memory, preparation and evaluation throughput."""
    lines = [f"ratio {name}: {ratio:.2f}x" for name, ratio in result.ratios.items()]
    mem = result.loss_memory_mb
    if mem.get("saving") is not None:
        lines.append(
            f"lmp step peak memory: plain loss {mem['plain_loss']:,.0f} MiB, chunked loss "
            f"{mem['chunked_loss']:,.0f} MiB (saves {mem['saving']:,.0f} MiB)"
        )
    if mem.get("activation_checkpointing") is not None and mem.get("chunked_loss") is not None:
        lines.append(
            f"with train.activation_checkpointing: {mem['activation_checkpointing']:,.0f} MiB "
            f"(saves {mem['chunked_loss'] - mem['activation_checkpointing']:,.0f} MiB more)"
        )
    if result.prep:
        p = result.prep
        lines.append(
            f"data prep (builtin:demo, {p['documents']} documents, {p['words']:,} words): tokenizer training "
            f"{p['tokenizer_train_s']:.1f} s ({p['tokenizer_train_words_per_s']:,.0f} words/s), encoding "
            f"{p['encode_tokens_per_s']:,.0f} tokens/s"
        )
    if result.eval:
        e = result.eval
        if e["available"]:
            limit = e.get("fp32_limit_fraction")
            lines.append(
                f"eval: {e['pairs']} probe minimal pairs, fp32 {e['fp32_pairs_per_s']:,.1f} pairs/s"
                + (f" ({limit:.0%} of the fp32 matmul limit)" if limit else "")
                + f", bf16 forward passes {e['bf16_pairs_per_s']:,.1f} pairs/s "
                f"({e['bf16_pairs_per_s'] / e['fp32_pairs_per_s']:.2f}x)"
            )
        else:
            lines.append(f"eval: {e['reason']}")
    return lines


def write_json(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
