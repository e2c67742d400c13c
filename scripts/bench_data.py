"""Distillation and mixtures at equal student tokens on the demo corpus and model.

    python scripts/bench_data.py [--recipe recipes/demo.yaml] [--steps 600] [--teachers 3]
                                 [--upsample python_docs] [--out runs/data-levers] [--set k=v ...]

Runs (resumable: finished runs are kept and skipped):
- teachers: the recipe at seeds 0..N-1, each trained as the recipe says;
- the student (seed 100) without distillation, distilled from teacher 0, and from all teachers
  (distill weight 0.5, temperature 2), each for the same steps, so the same student tokens;
- the student with `--upsample` upsampled 4x (relative to its size) in the last 10% of training.
Prints held-out loss (and per source) per run, the teachers' ensemble's held-out loss (averaged
probabilities), and wall times (a distilled step also runs every teacher forward).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lm_pretrain.data.loader import validation_batches
from lm_pretrain.data.prepare import prepare_data
from lm_pretrain.data.tokenizer import special_token_ids
from lm_pretrain.model.export import load_model
from lm_pretrain.recipe import load_recipe
from lm_pretrain.runs import load_run
from lm_pretrain.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
STUDENT_SEED = 100


@torch.no_grad()
def ensemble_loss(folders: list[Path], batches: list) -> float:
    """Held-out cross-entropy of the members' averaged next-token probabilities."""
    models = [load_model(folder).eval() for folder in folders]
    total = count = 0.0
    for inputs, targets in batches:
        logprobs = torch.stack([torch.log_softmax(m(inputs).logits.float(), -1) for m in models])
        mixed = torch.logsumexp(logprobs, 0) - torch.log(torch.tensor(float(len(models))))
        valid = targets != -100
        picked = mixed.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total -= picked[valid].sum().item()
        count += valid.sum().item()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/demo.yaml")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--upsample", default="python_docs", help="the source upsampled in the last 10%")
    parser.add_argument("--out", type=Path, default=Path("runs/data-levers"))
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    console = Console()
    base = [
        *args.sets,
        f"train.max_steps={args.steps}",
        "eval=null",
        f"train.eval_every={max(1, args.steps // 6)}",
    ]
    teachers = [args.out / f"teacher-{i}" for i in range(args.teachers)]
    mix = (f"{{relative_to_size: true, stages: [{{until: 0.9, weights: {{}}}}, "
           f"{{until: 1.0, weights: {{{args.upsample}: 4}}}}]}}")  # fmt: skip
    runs = {f"teacher {i} (seed {i})": (path, [f"seed={i}"]) for i, path in enumerate(teachers)}
    runs |= {
        "student, no distillation": (args.out / "student", [f"seed={STUDENT_SEED}"]),
        "student <- teacher 0": (args.out / "student-distil-1",
                                 [f"seed={STUDENT_SEED}", f"distill={{teachers: [{teachers[0]}], weight: 0.5, temperature: 2}}"]),
        f"student <- {args.teachers} teachers": (args.out / f"student-distil-{args.teachers}",
                                                 [f"seed={STUDENT_SEED}", f"distill={{teachers: [{', '.join(map(str, teachers))}], "
                                                  "weight: 0.5, temperature: 2}"]),
        f"student, {args.upsample} x4 in the last 10%": (args.out / "student-upsampled", [f"seed={STUDENT_SEED}", f"data.mixture={mix}"]),
    }  # fmt: skip
    seconds: dict[str, float] = {}
    for name, (folder, sets) in runs.items():
        recipe = load_recipe(args.recipe, [*base, *sets])
        began = time.perf_counter()
        result = train(recipe, folder, Console(quiet=True))
        seconds[name] = (time.perf_counter() - began) if not result.already_finished else float("nan")
        console.print(f"{name}: validation loss {load_run(folder).last('val_loss'):.4f}")

    recipe = load_recipe(args.recipe, base)
    data = prepare_data(recipe, Console(quiet=True), show_progress=False)
    ids = special_token_ids(data.tokenizer, recipe.tokenizer)
    val = validation_batches(
        data.val.tokens, recipe.seq_len, recipe.train.eval_tokens, recipe.train.batch_size, ids["bos"]
    )
    ensemble = ensemble_loss([t / "final" for t in teachers], val)

    sources = sorted({k.removeprefix("val_loss/") for f, _ in runs.values() for k in load_run(f).metric_keys()
                      if k.startswith("val_loss/")})  # fmt: skip
    table = Table(title=f"{args.recipe.name}: {args.steps} steps each, equal student tokens")
    for column in ["run", "val loss", *[f"val {s}" for s in sources], "wall s"]:
        table.add_column(column, justify="left" if column == "run" else "right")
    rows = {}
    for name, (folder, _) in runs.items():
        run = load_run(folder)
        per = [run.last(f"val_loss/{s}") for s in sources]
        rows[name] = {
            "val_loss": run.last("val_loss"),
            "seconds": seconds[name],
            **dict(zip(sources, per, strict=True)),
        }
        table.add_row(name, f"{run.last('val_loss'):.4f}", *[f"{v:.4f}" if v is not None else "-" for v in per],
                      f"{seconds[name]:.0f}")  # fmt: skip
    table.add_row(f"ensemble of the {args.teachers} teachers", f"{ensemble:.4f}", *["-"] * len(sources), "-")
    rows["ensemble"] = {"val_loss": ensemble}
    console.print(table)
    (args.out / "data_levers.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
