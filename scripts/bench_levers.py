"""Does Muon beat AdamW, and does a sequence-length schedule beat a fixed length, at equal tokens?

    python scripts/bench_levers.py [--recipe recipes/demo.yaml] [--steps 600] [--lrs 1e-3,2e-3,4e-3]
                                   [--muon-lrs 2e-3,4e-3,8e-3]
                                   [--budgets 1,3] [--out runs/levers]

Each arm (adamw, muon, adamw + seq_len_schedule) trains the recipe at each LR of --lrs through
`lmp sweep` (resumable: the same command continues), at each budget (--steps x each of --budgets).
For every arm and budget it prints the best LR's final validation loss, its wall time, and, for
Muon, the share of AdamW's tokens AdamW needs to reach Muon's final loss (from AdamW's validation
curve; "not reached" if it never does). Validation runs every 1/20 of training for that curve.
The arms muon+hybrid and muon+hybrid+hard (--arms) compare random and hard-token masking under
the hybrid objective; their masked validation loss is on the same randomly masked windows.
Equal tokens: every arm trains the same steps x batch x seq_len. A tiny CI run:
    --steps 4 --lrs 2e-3 --budgets 1 --set model.hidden_size=32 --set model.max_seq_len=64 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lm_pretrain.recipe import load_recipe
from lm_pretrain.runs import best_val_loss, load_run
from lm_pretrain.sweep import parse_grid, plan_sweep
from lm_pretrain.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def arms(seq_len: int) -> dict[str, list[str]]:
    """The arms' recipe overrides; the schedule is the GPT-BERT baseline's shape at this length."""
    stages = f"[[0.6, {seq_len // 4}], [0.8, {seq_len // 2}], [1.0, {seq_len}]]"
    return {
        "adamw": ["optim.kind=adamw"],
        "muon": ["optim.kind=muon"],
        "adamw+seq_len_schedule": ["optim.kind=adamw", f"train.seq_len_schedule={stages}"],
        # the hybrid objective with random or hard-token masking (not in the default --arms)
        "muon+hybrid": ["optim.kind=muon", "objective=hybrid"],
        "muon+hybrid+hard": ["optim.kind=muon", "objective=hybrid", "hybrid.masking=hard"],
    }


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/demo.yaml")
    parser.add_argument("--steps", type=int, default=600, help="the first budget, in steps")
    parser.add_argument("--lrs", default="1e-3,2e-3,4e-3")
    parser.add_argument("--muon-lrs", default=None, help="Muon's own LR grid (default: --lrs)")
    parser.add_argument("--budgets", default="1,3", help="multiples of --steps")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more recipe overrides")
    parser.add_argument("--out", type=Path, default=Path("runs/levers"))
    parser.add_argument("--arms", default="adamw,muon,adamw+seq_len_schedule", help="a subset of the arms")
    args = parser.parse_args()
    console = Console()
    seq_len = load_recipe(args.recipe, args.sets).seq_len
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        steps = args.steps * budget
        results = {}
        chosen = args.arms.split(",")

        def lrs(arm: str) -> str:
            return args.muon_lrs if arm == "muon" and args.muon_lrs else args.lrs

        for arm, overrides in arms(seq_len).items():
            if arm not in chosen:
                continue
            sets = [*args.sets, *overrides, f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 20)}",
                    "eval=null", "checkpoint.every=100000"]  # fmt: skip
            folder, plan = plan_sweep(
                args.recipe, sets, parse_grid([f"optim.lr={lrs(arm)}"]), args.out / f"{arm}-x{budget}"
            )
            for _, recipe, run_dir in plan:
                train(recipe, run_dir, Console(quiet=True))
            runs = [load_run(run_dir) for _, _, run_dir in plan]
            best = min(runs, key=lambda r: r.last("val_loss"))
            # the best run's own training time (summary.json), so a resumed sweep reports it too
            results[arm] = (best, (best.summary or {}).get("seconds", float("nan")))
            console.print(
                f"x{budget} {arm}: " + ", ".join(f"{r.name} {r.last('val_loss'):.4f}" for r in runs)
            )
        reached = total = None
        if "adamw" in results and "muon" in results:
            adamw_curve = val_curve(results["adamw"][0].path)
            muon_final = results["muon"][0].last("val_loss")
            reached = next((tokens for tokens, loss in adamw_curve if loss <= muon_final), None)
            total = adamw_curve[-1][0]
        for arm, (run, seconds) in results.items():
            ratio = ""
            if arm == "muon" and total is not None:
                ratio = f"{reached / total:.2f}" if reached else "not reached"
            lr = run.recipe["optim"]["lr"]
            masked = run.last("val_mntp_loss")
            rows.append((f"x{budget} ({steps} steps)", arm, f"{lr:g}", f"{run.last('val_loss'):.4f}",
                         f"{best_val_loss(run)[0]:.4f}", f"{masked:.4f}" if masked is not None else "-",
                         f"{seconds / 60:.1f}", ratio))  # fmt: skip
    table = Table(
        title=f"{args.recipe.name}: each arm at its best LR of {args.lrs} (Muon: {args.muon_lrs or args.lrs}), equal tokens"
    )
    for column in (
        "budget",
        "arm",
        "best lr",
        "final val loss",
        "best val loss",
        "masked val loss",
        "min (best run)",
        "AdamW tokens to Muon's loss",
    ):
        table.add_column(column, justify="left" if column in ("budget", "arm") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
