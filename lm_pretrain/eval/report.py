"""From candidate scores to accuracies, tables, the JSON report and official-layout predictions.

Decisions follow the official pipeline: the prediction is the first candidate with the highest
score, and the correct candidate is listed first, so an exact tie counts as correct. Ties are
counted and reported; strict mode counts them as losses instead. Accuracy is per UID; a task's
score is the unweighted mean over UIDs (entity tracking: mean over UIDs within each subset file,
then over subsets, as the official code does).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from lm_pretrain.eval.tasks import Item


@dataclass
class UidStats:
    n: int = 0
    correct: int = 0
    ties: int = 0
    field: str = ""

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.n if self.n else 0.0


@dataclass
class TaskResult:
    task: str
    source: str
    uids: dict[str, UidStats]
    mean: float
    strict_ties: bool
    # uid -> [{"id": "<uid>_<k>", "pred": completion}] as the official --save_predictions writes
    predictions: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def ties(self) -> int:
        return sum(s.ties for s in self.uids.values())

    @property
    def n_items(self) -> int:
        return sum(s.n for s in self.uids.values())

    def fields(self) -> dict[str, float]:
        """Unweighted mean of UID accuracies within each field (BLiMP: morphology, syntax, ...)."""
        groups: dict[str, list[float]] = defaultdict(list)
        for stats in self.uids.values():
            groups[stats.field].append(stats.accuracy)
        return {name: sum(accs) / len(accs) for name, accs in sorted(groups.items())}

    def to_json(self) -> dict:
        return {
            "mean": self.mean,
            "items": self.n_items,
            "ties": self.ties,
            "strict_ties": self.strict_ties,
            "source": self.source,
            "fields": self.fields(),
            "uids": {
                uid: {
                    "accuracy": s.accuracy,
                    "correct": s.correct,
                    "n": s.n,
                    "ties": s.ties,
                    "field": s.field,
                }
                for uid, s in sorted(self.uids.items())
            },
        }


def judge(
    task: str, source: str, items: Sequence[Item], scores: Sequence[np.ndarray], strict_ties: bool = False
) -> TaskResult:
    """Accuracy per UID from each item's candidate scores (correct candidate first)."""
    uids: dict[str, UidStats] = {}
    predictions: dict[str, list[dict[str, str]]] = defaultdict(list)
    for item, item_scores in zip(items, scores, strict=True):
        best_other = float(np.max(item_scores[1:]))
        first = float(item_scores[0])
        tie = first == best_other
        correct = first > best_other or (tie and not strict_ties)
        stats = uids.setdefault(item.uid, UidStats(field=item.field))
        stats.n += 1
        stats.correct += int(correct)
        stats.ties += int(tie)
        chosen = int(np.argmax(item_scores))  # first maximum, as torch.max on the official side
        uid_preds = predictions[item.uid]
        uid_preds.append({"id": f"{item.uid}_{len(uid_preds)}", "pred": item.completions[chosen]})
    return TaskResult(task, source, uids, task_mean(task, uids), strict_ties, dict(predictions))


def task_mean(task: str, uids: dict[str, UidStats]) -> float:
    if not uids:
        return 0.0
    if task != "entity_tracking":
        return sum(s.accuracy for s in uids.values()) / len(uids)
    subsets: dict[str, list[float]] = defaultdict(list)
    for stats in uids.values():
        subsets[stats.field].append(stats.accuracy)
    return sum(sum(a) / len(a) for a in subsets.values()) / len(subsets)


def task_table(result: TaskResult) -> Table:
    ties = f", {result.ties} tie(s) counted {'wrong' if result.strict_ties else 'correct'}"
    table = Table(title=f"{result.task}: {result.mean:.2f}% over {len(result.uids)} UIDs{ties}")
    table.add_column("UID")
    table.add_column("field")
    table.add_column("items", justify="right")
    table.add_column("accuracy %", justify="right")
    for uid, stats in sorted(result.uids.items()):
        table.add_row(uid, stats.field, str(stats.n), f"{stats.accuracy:.2f}")
    return table


def field_table(result: TaskResult) -> Table:
    table = Table(title=f"{result.task} by field (mean of UIDs)")
    table.add_column("field")
    table.add_column("UIDs", justify="right")
    table.add_column("accuracy %", justify="right")
    counts: dict[str, int] = defaultdict(int)
    for stats in result.uids.values():
        counts[stats.field] += 1
    for name, acc in result.fields().items():
        table.add_row(name, str(counts[name]), f"{acc:.2f}")
    table.add_row("all", str(len(result.uids)), f"{result.mean:.2f}", style="bold")
    return table


def summary_table(results: Sequence[TaskResult], perplexity: dict | None) -> Table:
    table = Table(title="lmp eval")
    table.add_column("task")
    table.add_column("score", justify="right")
    table.add_column("items", justify="right")
    table.add_column("ties", justify="right")
    for result in results:
        table.add_row(result.task, f"{result.mean:.2f}%", f"{result.n_items:,}", str(result.ties))
    if perplexity:
        table.add_row(
            "perplexity",
            f"{perplexity['perplexity']:.2f} ({perplexity['bits_per_byte']:.3f} bits/byte)",
            f"{perplexity['tokens']:,} tokens",
            "",
        )
    return table


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def write_predictions(folder: Path, results: Sequence[TaskResult]) -> list[Path]:
    """<folder>/<task>/predictions.json: {uid: {"predictions": [{"id", "pred"}, ...]}} per task,
    the file the official run.py writes with --save_predictions."""
    written = []
    for result in results:
        path = folder / result.task / "predictions.json"
        payload = {uid: {"predictions": preds} for uid, preds in result.predictions.items()}
        write_json(path, payload)
        written.append(path)
    return written
