"""Speed of `lmp eval` scoring against a one-sentence-at-a-time reference on the same model and items.

    python scripts/bench_eval.py MODEL [--blimp DIR] [--pairs-per-uid N] [--uids K] [--probe N]

Prints both wall times, their ratio (target: at least 5x), the accuracy difference (must be exactly
0: batching must never change a decision) and the largest per-candidate log-probability difference
(float rounding of different batch shapes). A tiny CI run: --pairs-per-uid 2 --uids 3 --probe 2.
Always compare times measured in one run, on one machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from lm_pretrain.eval.probe import probe_items
from lm_pretrain.eval.report import judge
from lm_pretrain.eval.runner import score_items
from lm_pretrain.eval.scoring import load_scoring_model, score_one_at_a_time
from lm_pretrain.eval.tasks import Item, read_blimp
from lm_pretrain.generate import resolve_model_folder

ROOT = Path(__file__).resolve().parents[1]


def blimp_sample(folder: Path, per_uid: int, uids: int | None) -> list[Item]:
    by_uid: dict[str, list[Item]] = {}
    for item in read_blimp(folder):
        by_uid.setdefault(item.uid, []).append(item)
    chosen = sorted(by_uid)[:uids] if uids else sorted(by_uid)
    return [item for uid in chosen for item in by_uid[uid][:per_uid]]


def reference_scores(sm, items: list[Item]) -> list[np.ndarray]:
    sentences = [s for item in items for s in item.sentences]
    completions = [c for item in items for c in item.completions]
    flat = score_one_at_a_time(sm, sentences, completions)
    out, start = [], 0
    for item in items:
        out.append(flat[start : start + len(item.sentences)])
        start += len(item.sentences)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="model folder, checkpoint or run folder")
    parser.add_argument("--blimp", type=Path, default=ROOT.parent / "shared" / "data" / "blimp")
    parser.add_argument("--pairs-per-uid", type=int, default=20, help="BLiMP pairs per UID (size)")
    parser.add_argument("--uids", type=int, default=None, help="only the first K BLiMP UIDs")
    parser.add_argument("--probe", type=int, default=20, help="probe pairs per phenomenon")
    parser.add_argument("--backend", default="causal", choices=["causal", "mlm", "mntp"])
    args = parser.parse_args()

    sm = load_scoring_model(resolve_model_folder(args.model), args.backend)
    tasks: dict[str, list[Item]] = {}
    if args.blimp.is_dir() and args.pairs_per_uid > 0:
        tasks["blimp"] = blimp_sample(args.blimp, args.pairs_per_uid, args.uids)
    else:
        print(f"no BLiMP at {args.blimp}: probe only")
    if args.probe > 0:
        tasks["probe"] = probe_items(0, args.probe)
    candidates = sum(len(i.sentences) for items in tasks.values() for i in items)
    print(f"model {sm.folder}, backend {sm.backend}, {candidates:,} candidates")

    timings = {"batched": 0.0, "reference": 0.0}
    worst = 0.0
    for task, items in tasks.items():
        start = time.perf_counter()
        batched = score_items(sm, items)
        timings["batched"] += time.perf_counter() - start
        start = time.perf_counter()
        reference = reference_scores(sm, items)
        timings["reference"] += time.perf_counter() - start

        a, b = judge(task, "", items, batched), judge(task, "", items, reference)
        flips = sum(
            (x[0] >= x[1:].max()) != (y[0] >= y[1:].max()) for x, y in zip(batched, reference, strict=True)
        )
        diff = max(float(np.max(np.abs(x - y))) for x, y in zip(batched, reference, strict=True))
        worst = max(worst, diff)
        print(
            f"{task}: {len(items):,} items, batched {a.mean:.4f}% vs reference {b.mean:.4f}%: "
            f"score difference {abs(a.mean - b.mean):.4f} points, {flips} decision(s) differ, "
            f"max |log-prob difference| {diff:.2e}"
        )
    ratio = timings["reference"] / timings["batched"]
    print(
        f"wall time: batched {timings['batched']:.2f}s, one-at-a-time {timings['reference']:.2f}s, "
        f"ratio {ratio:.1f}x (target >= 5x); max |log-prob difference| {worst:.2e}"
    )


if __name__ == "__main__":
    main()
