"""Speed of `lmp eval` scoring: fp32 in plain length-bucketed batches (no token trees), fp32 batched
(token trees where they pay), bf16 batched with fp32 rescoring of close items, and a
one-sentence-at-a-time fp32 reference, on the same model and items.

    python scripts/bench_eval.py MODEL [--blimp DIR] [--pairs-per-uid N] [--uids K] [--probe N]
                                 [--no-reference]

Prints the wall times and their ratios (targets: batched at least 5x the reference, bf16 checked
at least 2x plain fp32), how many decisions differ (batching and bf16 must never change one: 0), how many
items bf16 alone would have decided otherwise and how many it sent back to fp32, and the largest
per-candidate log-probability differences. A tiny CI run: --pairs-per-uid 2 --uids 3 --probe 2.
Always compare times measured in one run, on one machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lm_pretrain.eval.probe import probe_items
from lm_pretrain.eval.report import judge
from lm_pretrain.eval.runner import gap_error, recheck_margin, score_items, score_items_as_set
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
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the (slow) one-at-a-time reference",
    )
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

    timings = {"plain": 0.0, "fp32": 0.0, "bf16": 0.0, "reference": 0.0}
    worst = {"batched": 0.0, "bf16": 0.0, "bf16_relative": 0.0, "gap": 0.0, "gap_share": 0.0}
    for task, items in tasks.items():
        sm.tree_scoring = sm.chunked_head = False  # the scorer before token trees and chunked logits
        start = time.perf_counter()
        plain = score_items(sm, items, precision="fp32")
        timings["plain"] += time.perf_counter() - start
        sm.tree_scoring = sm.chunked_head = None  # checked again on the first batches
        start = time.perf_counter()
        batched = score_items(sm, items, precision="fp32")
        timings["fp32"] += time.perf_counter() - start
        start = time.perf_counter()
        checked = score_items(sm, items, precision="bf16")
        timings["bf16"] += time.perf_counter() - start
        with torch.autocast(sm.device.type, torch.bfloat16):
            raw = score_items_as_set(sm, items)  # bf16 before any rescoring
        rescored = sum(not np.array_equal(x, y) for x, y in zip(raw, checked, strict=True))
        gaps = [gap_error(x, y) for x, y in zip(raw, batched, strict=True)]
        worst["gap"] = max(worst["gap"], max(gaps))
        worst["gap_share"] = max(
            worst["gap_share"], max(g / recheck_margin(x) for g, x in zip(gaps, raw, strict=True))
        )
        worst["bf16"] = max(
            worst["bf16"], max(float(np.max(np.abs(x - y))) for x, y in zip(raw, batched, strict=True))
        )
        worst["bf16_relative"] = max(
            worst["bf16_relative"],
            max(
                float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-6)))
                for x, y in zip(raw, batched, strict=True)
            ),
        )
        line = (
            f"{task}: {len(items):,} items; bf16 alone decides {decisions_differ(raw, batched)} otherwise "
            f"than fp32, {rescored} ({rescored / len(items):.1%}) rescored in fp32, then "
            f"{decisions_differ(checked, batched)} differ; UIDs whose accuracy differs: "
            f"{uids_differ(task, items, checked, batched)}; token trees {'used' if sm.tree_scoring else 'not used'}, "
            f"{decisions_differ(batched, plain)} decisions differ from plain batches"
        )
        if args.reference:
            start = time.perf_counter()
            reference = reference_scores(sm, items)
            timings["reference"] += time.perf_counter() - start
            diff = max(float(np.max(np.abs(x - y))) for x, y in zip(batched, reference, strict=True))
            worst["batched"] = max(worst["batched"], diff)
            line += f"; fp32 batched vs reference: {decisions_differ(batched, reference)} differ, max |diff| {diff:.2e}"
        print(line)
    pairs = sum(len(items) for items in tasks.values())
    print(
        f"wall time: fp32 plain batches {timings['plain']:.2f}s ({pairs / timings['plain']:.1f} items/s), "
        f"fp32 batched {timings['fp32']:.2f}s ({pairs / timings['fp32']:.1f} items/s, "
        f"{timings['plain'] / timings['fp32']:.2f}x plain), bf16 checked {timings['bf16']:.2f}s "
        f"({pairs / timings['bf16']:.1f} items/s, {timings['fp32'] / timings['bf16']:.2f}x fp32 batched, "
        f"{timings['plain'] / timings['bf16']:.2f}x plain: target >= 2x); max |bf16 - fp32| "
        f"{worst['bf16']:.3f} nats, {worst['bf16_relative']:.2%} of the score; the gap between an item's "
        f"candidates off by at most {worst['gap']:.3f} nats, {worst['gap_share']:.2f} of the rescoring margin"
    )
    if args.reference:
        print(
            f"one-at-a-time reference {timings['reference']:.2f}s: fp32 batched "
            f"{timings['reference'] / timings['fp32']:.1f}x faster (target >= 5x); max |log-prob "
            f"difference| {worst['batched']:.2e}"
        )


def decisions_differ(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    """Items whose chosen candidate or correctness differs between two scorings."""
    return sum(
        (x[0] > x[1:].max()) != (y[0] > y[1:].max()) or int(np.argmax(x)) != int(np.argmax(y))
        for x, y in zip(a, b, strict=True)
    )


def uids_differ(task: str, items: list[Item], a: list[np.ndarray], b: list[np.ndarray]) -> int:
    x, y = judge(task, "", items, a), judge(task, "", items, b)
    return sum(x.uids[u].correct != y.uids[u].correct for u in x.uids)


if __name__ == "__main__":
    main()
