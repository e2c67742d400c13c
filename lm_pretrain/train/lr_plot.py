"""`lmp schedule`: a recipe's learning-rate curve as key points and a PNG."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import Recipe
from lm_pretrain.train.schedule import make_schedule, total_steps


def describe_schedule(recipe: Recipe, png: Path | None = None) -> Table:
    words_per_token = None
    if recipe.max_words_seen is not None:  # the step count follows from the corpus's words per token
        from lm_pretrain.data.mixture import run_words_per_token
        from lm_pretrain.data.prepare import prepare_data

        try:
            data = prepare_data(recipe, console=None, show_progress=False)
        except LmpError as exc:
            raise LmpError(
                f"train.max_words_seen is in words, so the schedule's steps need the corpus's words per "
                f"token, read from data.path (relative to this working directory): {exc}. Or give "
                "--set train.max_steps=N to see a schedule of N steps without it"
            ) from None
        words_per_token = run_words_per_token(recipe, data)
    steps = total_steps(recipe, words_per_token)
    tokens_per_step = recipe.train.batch_size * recipe.seq_len
    schedule = make_schedule(recipe.schedule, steps, tokens_per_step)
    peak = recipe.optim.lr
    table = Table(title=f"{recipe.schedule.kind} schedule of {recipe.name}: {steps} steps, peak LR {peak:g}")
    for column in ("point", "step", "tokens", "LR"):
        table.add_column(column, justify="left" if column == "point" else "right")
    points = schedule.key_points()
    if recipe.train.seq_len_schedule is not None:  # where each sequence length starts (same tokens per step)
        from lm_pretrain.data.loader import seq_len_stages

        starts = [0] + [end for end, _ in seq_len_stages(recipe.train.seq_len_schedule, steps)[:-1]]
        lengths = [length for _, length in recipe.train.seq_len_schedule]
        points = sorted(
            points + [(f"sequence length {n}", s) for n, s in zip(lengths, starts, strict=True)],
            key=lambda p: p[1],
        )
    for name, step in points:
        table.add_row(name, f"{step:,}", f"{step * tokens_per_step:,}", f"{peak * schedule(step):.3e}")
    if png is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from lm_pretrain.plot import save_figure

        fig = Figure(figsize=(8, 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        xs = range(steps)
        ax.plot(list(xs), [peak * schedule(s) for s in xs], color="tab:blue")
        for name, step in schedule.key_points()[1:-1]:
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
            ax.annotate(name, (step, peak), rotation=90, fontsize=8, va="top", ha="right")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{recipe.name}: {recipe.schedule.kind}, {recipe.schedule.decay_shape} decay")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, png)
        table.caption = f"curve written to {png}"
    return table
