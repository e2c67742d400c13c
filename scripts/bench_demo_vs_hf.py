"""The demo end to end: `lmp train recipes/demo.yaml` against the HF Trainer on the same model,
corpus and tokens, back to back on this machine.

    python scripts/bench_demo_vs_hf.py [--recipe recipes/demo.yaml] [--out runs/demo-vs-hf] [--set k=v ...]

Arms, one after another: lmp as the recipe says, lmp with train.compile flipped, and transformers'
LlamaForCausalLM (the same config as lmp's export) under transformers.Trainer, eager and with
torch_compile=True, each from the same initial weights, on lmp's tokenizer and training windows
(the same samples in the same order), the same batch, steps, peak LR, warmup, WSD decay, AdamW
(fused) and bf16 autocast. Every arm is then scored on the same held-out windows (lmp's validation
split), and the script prints wall time (data preparation excluded: the token cache is built first),
tokens/s and held-out loss per arm. The HF Trainer's loss leaves out each window's last target
(transformers shifts labels itself): 1/seq_len fewer targets, the same tokens seen.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lm_pretrain.bench import hf_twin
from lm_pretrain.data.loader import PackedWindows, validation_batches
from lm_pretrain.data.prepare import prepare_data
from lm_pretrain.data.tokenizer import special_token_ids
from lm_pretrain.model.decoder import Decoder, DecoderConfig
from lm_pretrain.recipe import load_recipe
from lm_pretrain.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


class Windows(torch.utils.data.IterableDataset):
    """lmp's training samples 0..n-1, in the order lmp trains them, as HF Trainer examples (an
    iterable dataset: the Trainer keeps its order instead of shuffling it again)."""

    def __init__(self, windows: PackedWindows, count: int) -> None:
        self.windows, self.count = windows, count

    def __iter__(self):  # noqa: ANN204
        for index in range(self.count):
            ids = torch.from_numpy(self.windows.window(index)[:-1].astype("int64"))
            yield {"input_ids": ids, "labels": ids.clone()}


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, batches: list) -> float:
    """Mean next-token cross-entropy over lmp's validation windows (full logits, fp32 softmax)."""
    model.eval()
    total = count = 0.0
    for inputs, targets in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += (targets != -100).sum().item()
    return total / count


def hf_arm(recipe, data, ids, compile_: bool, out: Path, val: list) -> dict:
    from transformers import Trainer, TrainingArguments

    cfg = recipe.train
    steps, warmup = cfg.max_steps, round(recipe.schedule.warmup * cfg.max_steps)
    decay = round(recipe.schedule.decay * cfg.max_steps)
    config = DecoderConfig.from_recipe(
        recipe.model, data.tokenizer.get_vocab_size(), ids["bos"], ids["eos"], ids["pad"]
    )
    torch.manual_seed(recipe.seed)  # as lmp train seeds before building its model
    model = hf_twin(Decoder(config))
    windows = PackedWindows(data.train.tokens, recipe.seq_len, recipe.seed, ids["bos"])
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=recipe.optim.lr, weight_decay=recipe.optim.weight_decay, adam_beta1=recipe.optim.betas[0],
        adam_beta2=recipe.optim.betas[1], max_grad_norm=recipe.optim.grad_clip or 0.0, warmup_steps=warmup,
        lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs={"num_decay_steps": decay},
        optim="adamw_torch_fused", bf16=True, use_cpu=True, torch_compile=compile_, logging_strategy="no",
        save_strategy="no", report_to="none", dataloader_num_workers=1, seed=recipe.seed,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Windows(windows, steps * cfg.batch_size))
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "val_loss": held_out_loss(model, val)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/demo.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/demo-vs-hf"))
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--arms", default="lmp,lmp-flipped,hf,hf-compiled")
    args = parser.parse_args()
    console = Console()
    recipe = load_recipe(args.recipe, args.sets)
    data = prepare_data(recipe, Console(quiet=True), show_progress=False)  # the token cache, before timing
    ids = special_token_ids(data.tokenizer, recipe.tokenizer)
    tokens = recipe.train.max_steps * recipe.train.batch_size * recipe.seq_len
    val = validation_batches(
        data.val.tokens, recipe.seq_len, recipe.train.eval_tokens, recipe.train.batch_size, ids["bos"]
    )
    rows = {}
    for arm in args.arms.split(","):
        if arm.startswith("lmp"):
            compile_ = recipe.train.compile != (arm == "lmp-flipped")
            r = load_recipe(args.recipe, [*args.sets, f"train.compile={str(compile_).lower()}", "eval=null"])
            began = time.perf_counter()
            train(r, args.out / arm, Console(quiet=True))
            seconds = time.perf_counter() - began
            records = [
                json.loads(line) for line in (args.out / arm / "metrics.jsonl").read_text().splitlines()
            ]
            val_loss = [x["val_loss"] for x in records if "val_loss" in x][-1]
            name = f"lmp ({'compiled' if compile_ else 'eager'})"
            rows[name] = {"seconds": seconds, "val_loss": val_loss, "optimizer": r.optim.kind}
        else:
            rows[f"HF Trainer ({'torch_compile' if arm == 'hf-compiled' else 'eager'})"] = {
                **hf_arm(recipe, data, ids, arm == "hf-compiled", args.out / arm, val),
                "optimizer": "adamw",
            }
        console.print(f"{arm}: {rows[list(rows)[-1]]}")
    table = Table(
        title=f"{args.recipe.name}: {recipe.train.max_steps} steps, {tokens:,} tokens, {os.cpu_count()} CPUs"
    )
    for column in ("arm", "optimizer", "wall s", "tokens/s", "held-out loss"):
        table.add_column(column, justify="left" if column in ("arm", "optimizer") else "right")
    for name, r in rows.items():
        table.add_row(name, r["optimizer"], f"{r['seconds']:.0f}", f"{tokens / r['seconds']:,.0f}",
                      f"{r['val_loss']:.4f}")  # fmt: skip
    console.print(table)
    (args.out / "demo_vs_hf.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
