"""`lmp plot`: loss, validation loss, learning rate and eval scores of runs on shared axes.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): headless on any machine,
no global backend switch in the caller's process, and no figure registry that would leak
memory when the trainer redraws progress.png at every validation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter

from lm_pretrain.errors import LmpError
from lm_pretrain.run_folder import PROGRESS_FILE
from lm_pretrain.runs import EVAL_PREFIX, Run, find_runs, is_run_dir, load_run, run_state

X_KEYS = {"steps": "step", "tokens": "tokens", "words": "words"}
DEFAULT_METRICS = ("loss", "val_loss", "val_mntp_loss", "lr")  # each drawn when logged
_TITLES = {
    "loss": "train loss",
    "val_loss": "validation loss",
    "val_mntp_loss": "validation loss, masked next-token",
    "lr": "learning rate",
    "tokens_per_s": "tokens / s",
}
# logged once per step interval and noisy; evaluations and the schedule are drawn as they are
_NOT_SMOOTHED = {"lr", "epoch", "tokens", "words", "time", "step"}
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Curve:
    """One run's line in one panel, as drawn (after the branch offset and smoothing)."""

    run: str
    metric: str
    x: list[float]
    y: list[float]


def smoothed(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's bias correction (weight 0 = unchanged)."""
    if weight <= 0:
        return list(values)
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))  # early points are not pulled towards 0
    return out


def _should_smooth(metric: str) -> bool:
    return metric not in _NOT_SMOOTHED and not metric.startswith(("val", EVAL_PREFIX))


def _anchor(parent: Run | None, step: int | None) -> dict | None:
    """The parent's record at the branch point (the newest one at or before it)."""
    if parent is None or step is None:
        return None
    before = [r for r in parent.records if r["step"] <= step]
    return before[-1] if before else None


def run_curve(
    run: Run, metric: str, x_key: str, parent: Run | None = None
) -> tuple[list[float], list[float]]:
    """(x, y) of one metric of one run. A branch is drawn from its parent's step: if its own
    counting restarted at 0 it is shifted to the branch point, and it starts at the parent's
    value there, so the two curves join."""
    xs, ys = run.series(metric, x_key)
    anchor = _anchor(parent, run.parent_step)
    first_step = run.records[0]["step"] if run.records else None
    if run.parent_step and first_step is not None and first_step < run.parent_step:
        offset = run.parent_step if x_key == "step" else (anchor or {}).get(x_key)
        if isinstance(offset, (int, float)):
            xs = [x + offset for x in xs]
    if anchor is not None:
        ax_, ay = anchor.get(x_key), anchor.get(metric)
        if isinstance(ax_, (int, float)) and isinstance(ay, (int, float)) and (not xs or ax_ < xs[0]):
            xs, ys = [ax_, *xs], [ay, *ys]
    return xs, ys


def _labels(runs: list[Run]) -> list[str]:
    """Folder names, with the parent folder added where two runs share a name."""
    names = [run.name for run in runs]
    out = []
    for run in runs:
        name = run.name
        label = f"{run.path.parent.name}/{name}" if names.count(name) > 1 else name
        if run.parent is not None:
            label += f" (from {run.parent.name} @{run.parent_step})"
        state = run_state(run)
        if state not in ("finished", "unknown"):
            label += f" [{state}]"
        out.append(label)
    return out


def _title(metric: str) -> str:
    if metric.startswith(EVAL_PREFIX):
        return f"eval: {metric.removeprefix(EVAL_PREFIX)}"
    return _TITLES.get(metric, metric)


def _loss_top(curves: Iterable[tuple[list[float], list[float]]]) -> float | None:
    """An upper y limit that leaves out the first tenth of training, where the loss falls from
    ln(vocab) in a few steps and would otherwise squash the rest of the curve."""
    tops, highs = [], []
    for xs, ys in curves:
        if len(ys) < 10:
            return None  # too few points to tell the early drop from the rest
        start = xs[0] + 0.1 * (xs[-1] - xs[0])
        later = [y for x, y in zip(xs, ys, strict=True) if x >= start]
        tops.append(max(later))
        highs.append(max(ys))
    if not tops:
        return None
    lows = min(min(ys) for _, ys in curves)
    top = max(tops) + 0.1 * (max(tops) - lows)
    return top if top < max(highs) else None


def _parents(runs: list[Run]) -> dict[int, Run | None]:
    """Each branch's parent run: one of `runs` when listed, else read from its folder."""
    by_path = {run.path.resolve(): run for run in runs}
    parents: dict[int, Run | None] = {}
    for i, run in enumerate(runs):
        parent = None
        if run.parent is not None:
            # as written (absolute, or relative to where lmp runs), else beside the branch
            candidates = [run.parent]
            if not run.parent.is_absolute():
                candidates.append(run.path.parent / run.parent)
            for candidate in candidates:
                if candidate.resolve() in by_path:
                    parent = by_path[candidate.resolve()]
                    break
                if candidate.is_dir():
                    parent = load_run(candidate)
                    break
        parents[i] = parent
    return parents


def plot_runs(
    run_dirs: list[Path],
    out: Path | None,
    x: str = "steps",
    metrics: list[str] | None = None,
    smooth: float = 0.0,
    warn: Callable[[str], None] | None = None,
) -> Figure:
    """Draw `metrics` (default: loss, validation loss, learning rate and every eval score) of
    the runs, one panel per metric, one colour per run, and write the figure to `out` (PNG;
    skipped when None). Lines carry the run's label, panels the metric as title, so callers
    can read back what was drawn with `curves(fig)`."""
    if x not in X_KEYS:
        raise LmpError(f"--x must be one of {', '.join(X_KEYS)}, got {x!r}")
    if not 0 <= smooth < 1:
        raise LmpError(f"--smooth must be in [0, 1) (0 = off, 0.9 = strong), got {smooth}")
    if not run_dirs:
        raise LmpError("give at least one run folder")
    for d in run_dirs:
        inside = [] if is_run_dir(Path(d)) else find_runs([Path(d)])
        if inside:
            raise LmpError(
                f"{d} is a folder of runs; pass run folders, e.g. {' '.join(map(str, inside[:2]))}"
            )
    runs = [load_run(Path(d)) for d in run_dirs]
    for run in runs:
        for message in run.warnings:
            (warn or (lambda m: None))(message)
    x_key = X_KEYS[x]
    if not any(run.series("step", "step")[0] for run in runs):
        names = ", ".join(str(d) for d in run_dirs)
        raise LmpError(f"nothing to plot yet: {names} logged no metrics (did training reach its first step?)")
    if not any(run.series(x_key, "step")[0] for run in runs):
        raise LmpError(f"no run logs {x_key!r} (--x {x}); try --x steps")

    available = {key for run in runs for key in run.metric_keys()}
    if metrics:
        missing = [m for m in metrics if m not in available]
        if len(missing) == len(metrics):
            raise LmpError(
                f"no run logs {', '.join(missing)}; logged metrics: {', '.join(sorted(available)) or 'none'}"
            )
        chosen = list(metrics)
    else:
        evals = sorted(k for k in available if k.startswith(EVAL_PREFIX))
        chosen = [m for m in (*DEFAULT_METRICS, *evals) if m in available]
        if not chosen:
            raise LmpError("nothing to plot yet: the runs have logged no loss")

    parents = _parents(runs)
    labels = _labels(runs)
    ncols = 1 if len(chosen) == 1 else 2
    nrows = math.ceil(len(chosen) / ncols)
    # fixed margins in inches rather than constrained layout, which doubles the drawing time
    legend_h = 0.3 * math.ceil(len(runs) / 2) + 0.25
    height = 3.4 * nrows + legend_h + 0.3
    fig = Figure(figsize=(6.0 * ncols, height))
    fig.subplots_adjust(
        left=0.6 / (6.0 * ncols),
        right=1 - 0.2 / (6.0 * ncols),
        bottom=0.55 / height,
        top=1 - (legend_h + 0.3) / height,
        hspace=0.35,  # of an axes height: room for the x label and the next title
        wspace=0.8 / 6.0,
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    for ax in axes[1 : len(chosen)]:
        ax.sharex(axes[0])  # one x range for all panels, each keeping its tick labels

    for ax, metric in zip(axes, chosen, strict=False):  # spare panels stay hidden
        drawn = []
        for i, run in enumerate(runs):
            color = _COLORS[i % len(_COLORS)]
            xs, ys = run_curve(run, metric, x_key, parents[i])
            if not ys:
                continue
            if smooth and _should_smooth(metric):
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1, label="_raw")
                ys = smoothed(ys, smooth)
            marker = "o" if len(ys) < 30 or metric.startswith(("val", EVAL_PREFIX)) else None
            line = ax.plot(xs, ys, color=color, linewidth=1.6, marker=marker, markersize=3)[0]
            line.set_label(labels[i])
            if run.parent is not None and xs:
                ax.axvline(xs[0], color=color, linestyle=":", linewidth=1, alpha=0.6)
            drawn.append((xs, ys))
        ax.set_title(_title(metric))
        ax.set_gid(metric)  # the metric key, for curves()
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
        if x_key != "step":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        if metric == "lr" and drawn:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax.set_ylim(bottom=0)  # warmup and decay read best against zero
        if metric in ("loss", "val_loss", "val_mntp_loss") and drawn:
            top = _loss_top(drawn)
            if top is not None:
                ax.set_ylim(top=top)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, alpha=0.6)

    handles = [
        Line2D([], [], color=_COLORS[i % len(_COLORS)], linewidth=2, label=label)
        for i, label in enumerate(labels)
    ]
    fig.legend(handles=handles, loc="upper center", ncols=min(len(runs), 2), frameon=False)
    if smooth:
        fig.text(0.995, 0.005, f"smoothing {smooth:g} (faint: raw)", ha="right", va="bottom", fontsize=8)
    if out is not None:
        save_figure(fig, Path(out))
    return fig


def save_figure(fig: Figure, out: Path) -> None:
    """Write atomically, so a viewer that reloads the file never sees half an image."""
    fmt = out.suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise LmpError(f"cannot write {out}: use a .png (or .pdf, .svg) file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format=fmt, dpi=100)
    os.replace(tmp, out)


def curves(fig: Figure) -> list[Curve]:
    """The labelled lines of a figure drawn by plot_runs, i.e. what a reader sees."""
    found = []
    for ax in fig.axes:
        metric = ax.get_gid()
        if metric is None:
            continue
        for line in ax.get_lines():
            label = line.get_label()
            if label.startswith("_"):
                continue
            found.append(Curve(label, metric, list(line.get_xdata()), list(line.get_ydata())))
    return found


def write_run_plot(run_dir: Path) -> Path:
    """<run>/progress.png for the trainer, with the parent of a branch for context.

    Never raises: a plot must not stop training. On odd data the old image stays.
    """
    run_dir = Path(run_dir)
    out = run_dir / PROGRESS_FILE
    try:
        dirs = [run_dir]
        run = load_run(run_dir)
        parent = _parents([run])[0]
        if parent is not None:
            dirs.insert(0, parent.path)
        plot_runs(dirs, out)
    except Exception:  # noqa: BLE001 - by design: any failure leaves training untouched
        pass
    return out
