"""The `lmp` command: thin wrappers that parse arguments, call one function per verb, print."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from lm_pretrain.errors import LmpError, check_writable
from lm_pretrain.eval.tasks import ALL_TASKS

if TYPE_CHECKING:
    pass

app = typer.Typer(
    help="lmp: pretrain small language models from a YAML recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Corpus, tokenizer and token shards.", no_args_is_help=True)
recipe_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(recipe_app, name="recipe")

# long lines and wide tables stay whole when the output goes to a file or a pipe
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, soft_wrap=True)

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a recipe field, e.g. --set train.max_steps=100 (repeatable)"),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="run the model folder's own Python (auto_map), for folders you trust; lmp's own modeling file runs without it",
    ),
]


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print an LmpError as one readable message and exit 2, never as a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LmpError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            sys.exit(2)

    return wrapper


def output_file(
    path: Path, option: str, suffixes: tuple[str, ...] = (), replaces: tuple[str, ...] = ()
) -> Path:
    """`path` checked before any work is done: not a folder, a wanted suffix, its folder made and
    writable, and, with `replaces`, an existing file only an earlier result (a JSON object with
    those keys), so that e.g. a model's config.json is never written over. LmpError naming
    `option` otherwise."""
    example = path / f"out{suffixes[0] if suffixes else '.json'}"
    if path.is_dir():
        raise LmpError(f"{option} {path} is a folder; give a file name, e.g. {example}")
    if replaces and path.is_file() and not _is_result_file(path, replaces):
        raise LmpError(
            f"{option} {path} exists and is not an earlier result of this command, so lmp will not "
            "write over it; give a new file name"
        )
    if suffixes and path.suffix.lower() not in suffixes:
        raise LmpError(f"{option} {path}: give a file name ending in {', '.join(suffixes)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise LmpError(f"{option} {path}: a folder in that path is a file") from None
    except OSError as exc:
        raise LmpError(f"{option} {path}: cannot create its folder ({exc.strerror})") from None
    check_writable(path.parent, option)
    if path.exists() and not os.access(path, os.W_OK):
        raise LmpError(f"{option} {path}: no permission to write there")
    return path


def _is_result_file(path: Path, keys: tuple[str, ...]) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in keys)


IMAGE_SUFFIXES = (".png", ".pdf", ".svg")


@app.command()
@user_errors
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<recipe name>)")] = None,
    resume: Annotated[bool, typer.Option(help="require a checkpoint in the run folder to resume")] = False,
    branch_from: Annotated[
        Path | None, typer.Option(help="start a new run from this checkpoint (a decay branch or a fork)")
    ] = None,
    decay_steps: Annotated[
        int | None, typer.Option(min=1, help="with --branch-from: decay over N steps")
    ] = None,
    decay_fraction: Annotated[
        float | None,
        typer.Option(min=0.0, max=0.9, help="with --branch-from: the decay is F of the branch's total steps"),
    ] = None,
    nproc: Annotated[
        int, typer.Option(min=1, help="processes on this machine (torch.distributed; gloo on CPU)")
    ] = 1,
    print_run_dir: Annotated[bool, typer.Option(hidden=True)] = False,  # for the SLURM scripts
) -> None:
    """Train a model: corpus -> tokenizer -> shards -> model -> checkpoints -> final export.

    A run folder that already holds checkpoints is resumed from the newest one. SIGTERM or
    SIGUSR1 stops after the current step with a checkpoint and exit code 75.
    """
    from lm_pretrain.recipe import load_recipe
    from lm_pretrain.train.signals import EXIT_STOPPED
    from lm_pretrain.train.start import Branch
    from lm_pretrain.train.trainer import finished_message
    from lm_pretrain.train.trainer import train as run_training

    loaded = load_recipe(recipe, set_)
    branch = None
    if branch_from is not None:
        if decay_fraction == 0:
            raise LmpError("--decay-fraction must be above 0 (0.1 to 0.2 is usual)")
        if decay_steps is not None and decay_fraction is not None:
            raise LmpError("give one of --decay-steps and --decay-fraction, not both")
        branch = Branch(branch_from, decay_steps, decay_fraction)
    elif decay_steps is not None or decay_fraction is not None:
        raise LmpError("--decay-steps / --decay-fraction need --branch-from CHECKPOINT")
    run_dir = out or Path("runs") / (branch.run_name(loaded.name) if branch else loaded.name)
    if print_run_dir:
        print(run_dir)
        return
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        from lm_pretrain.launch import launch_processes

        options = [x for item in set_ or [] for x in ("--set", item)] + ["--out", str(run_dir)]
        options += ["--resume"] if resume else []
        options += ["--branch-from", str(branch_from)] if branch_from else []
        options += ["--decay-steps", str(decay_steps)] if decay_steps is not None else []
        options += ["--decay-fraction", str(decay_fraction)] if decay_fraction is not None else []
        sys.exit(
            launch_processes(nproc, recipe, options, loaded, run_dir, branch, resume, console, err_console)
        )
    began = time.perf_counter()
    try:
        result = run_training(loaded, run_dir, console=console, branch=branch, resume=resume)
    except KeyboardInterrupt:
        err_console.print(
            f"\ninterrupted: nothing saved since the newest checkpoint in {run_dir}; "
            "run the same command to resume from it"
        )
        sys.exit(130)
    if result.stopped_by_signal:
        sys.exit(EXIT_STOPPED)
    if os.environ.get("RANK", "0") != "0":
        return
    console.print(finished_message(result, loaded, run_dir, time.perf_counter() - began), highlight=False)


@app.command()
@user_errors
def export(
    run: Annotated[Path, typer.Argument(help="a run folder")],
    milestones: Annotated[
        Path, typer.Option(help="write one transformers folder per milestone checkpoint (chck_<N>M) here")
    ],
    git: Annotated[bool, typer.Option(help="also a git repository with one branch per milestone")] = False,
) -> None:
    """Export a run's BabyLM milestone checkpoints for submission."""
    from lm_pretrain.milestones import export_milestones, git_lfs_available

    if milestones.exists() and not milestones.is_dir():
        raise LmpError(f"--milestones {milestones} is a file; give a folder to write the milestones into")
    written = export_milestones(
        run, milestones, git, warn=lambda m: err_console.print(f"warning: {m}", highlight=False)
    )
    for folder in written:
        console.print(f"  {folder}", highlight=False)
    console.print(f"exported {len(written)} milestone(s) to {milestones}", highlight=False)
    console.print(
        f"evaluate a milestone locally by its folder, e.g. {written[0]}"
        + (
            f"; the git repository {milestones / 'repo'} holds one branch per milestone (main: the final "
            "model) to push to a Hugging Face model repository (git push --all), where the official "
            "pipeline reads them as revisions (transformers ignores revision= for a local folder)"
            if git
            else ""
        ),
        highlight=False,
    )
    if git and not git_lfs_available():
        err_console.print(
            "warning: git-lfs is not installed, so the weights are plain git objects, which the Hub "
            "refuses over 10 MiB. Install git-lfs, then in the repository run: git lfs install --local "
            "&& git lfs migrate import --everything --include='*.safetensors'",
            highlight=False,
        )


@app.command()
@user_errors
def schedule(
    recipe: RecipeArg,
    set_: SetOpt = None,
    png: Annotated[Path | None, typer.Option(help="draw the learning-rate curve into this PNG")] = None,
) -> None:
    """Print the learning-rate schedule's key points (and draw it with --png)."""
    from lm_pretrain.recipe import load_recipe
    from lm_pretrain.train.lr_plot import describe_schedule

    loaded = load_recipe(recipe, set_)
    console.print(describe_schedule(loaded, output_file(png, "--png", IMAGE_SUFFIXES) if png else None))


@data_app.command("prepare")
@user_errors
def data_prepare(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Read the corpus, train or load the tokenizer and write the token shards (cached)."""
    from lm_pretrain.data.prepare import prepare_data
    from lm_pretrain.recipe import load_recipe

    data = prepare_data(load_recipe(recipe, set_), console=console)
    console.print(
        f"train {data.train.n_tokens:,} tokens, validation {data.val.n_tokens:,} tokens; "
        f"cache {data.cache_dir}",
        highlight=False,
    )


@recipe_app.command("show")
@user_errors
def recipe_show(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Print the fully resolved recipe (extends and --set applied, defaults filled in)."""
    from lm_pretrain.recipe import load_recipe

    print(load_recipe(recipe, set_).to_yaml(), end="")


@app.command()
@user_errors
def generate(
    model: Annotated[Path, typer.Argument(help="a run folder, checkpoint, or exported model folder")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 means greedy")] = 0.8,
    top_k: Annotated[int, typer.Option(min=1)] = 50,
    seed: int = 0,
    prefix: Annotated[
        str, typer.Option(help="conditioning text before the prompt, e.g. a MeCo model's metadata")
    ] = "",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Sample a continuation of a prompt."""
    from lm_pretrain.generate import generate as sample

    def note(message: str) -> None:
        err_console.print(f"[yellow]note:[/] {escape(message)}", highlight=False)

    text = sample(
        model, prompt, max_new_tokens, temperature, top_k, seed, _newlines(prefix), trust_remote_code, note
    )
    typer.echo(text)  # verbatim


def _newlines(prefix: str) -> str:
    # so that --prefix 'childes\n\n' means two newlines, as a MeCo template writes them
    return prefix.replace("\\n", "\n")


@app.command("eval")
@user_errors
def eval_(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="a run folder, checkpoint, or transformers model folder (several with --ensemble)"
        ),
    ],
    tasks: Annotated[
        str | None,
        typer.Option(
            help=f"comma list of {','.join(ALL_TASKS)} "
            "(default: probe, perplexity, and the data tasks found under --data-dir)"
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="BabyLM evaluation_data folder (or a BLiMP folder)")
    ] = None,
    backend: Annotated[str, typer.Option(help="causal, mlm or mntp (as the official pipeline)")] = "causal",
    fast: Annotated[bool, typer.Option("--fast", help="the official fast_eval subsets")] = False,
    prefix: Annotated[
        str, typer.Option(help="unscored text put before every sentence (\\n: a newline)")
    ] = "",
    strict_ties: Annotated[bool, typer.Option("--strict-ties", help="count exact ties as wrong")] = False,
    text: Annotated[Path | None, typer.Option(help="held-out text file for perplexity")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write scores here")] = None,
    predictions: Annotated[Path | None, typer.Option(help="write official-layout predictions here")] = None,
    seed: Annotated[int, typer.Option(help="probe seed")] = 0,
    ensemble: Annotated[
        bool, typer.Option("--ensemble", help="score the models as one: their averaged probabilities")
    ] = False,
    trust_remote_code: TrustOpt = False,
    precision: Annotated[
        str,
        typer.Option(
            help="fp32, or bf16: forward passes under bf16 autocast, items too close to call rescored "
            "in fp32 (decisions stay fp32's; 1.4x as fast on full BLiMP on a 2-core CPU)"
        ),
    ] = "fp32",
) -> None:
    """Zero-shot BabyLM evaluation (official scoring rules), grammar probe, and perplexity."""
    from lm_pretrain.eval.report import field_table, summary_table, task_table, write_json, write_predictions
    from lm_pretrain.eval.runner import evaluate, parse_tasks

    # checked before the evaluation, which can take an hour, rather than after it
    if json_out is not None:
        output_file(json_out, "--json", replaces=("tasks", "averages"))
    if predictions is not None and predictions.exists() and not predictions.is_dir():
        raise LmpError(f"--predictions {predictions} is a file; give a folder to write predictions into")
    if len(models) > 1 and not ensemble:
        raise LmpError(f"{len(models)} models given; pass --ensemble to score them as one, or give one model")
    chosen = parse_tasks(tasks, data_dir, fast)
    result = evaluate(
        models if ensemble else models[0], chosen, data_dir, backend, fast, _newlines(prefix), strict_ties, text, seed,
        console=console, explicit_tasks=tasks is not None, trust_remote_code=trust_remote_code,
        precision=precision,
    )  # fmt: skip
    for task in result.tasks:
        console.print(task_table(task))
        if task.task in ("blimp", "probe"):
            console.print(field_table(task))
    console.print(summary_table(result.tasks, result.perplexity))
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if json_out is not None:
        write_json(json_out, result.to_json())
        console.print(f"scores: {json_out}", highlight=False)
    if predictions is not None:
        for path in write_predictions(predictions, result.tasks):
            console.print(f"predictions: {path}", highlight=False)


@app.command()
@user_errors
def runs(
    dirs: Annotated[
        list[Path] | None, typer.Argument(help="folders holding run folders (default runs/)")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="one JSON object per run instead of a table")] = False,
) -> None:
    """Table of runs: size, tokens, words, steps, losses, eval scores, state, parent of branches."""

    from lm_pretrain.runs import find_runs, load_run, run_row, runs_table

    roots = dirs or [Path("runs")]
    found = [load_run(path) for path in find_runs(roots)]
    for run in found:
        for message in run.warnings:
            err_console.print(f"[yellow]warning:[/] {message}", highlight=False)
    if json_:
        for run in found:
            print(json.dumps(run_row(run)))
    elif not found:
        console.print(f"no runs under {', '.join(map(str, roots))}")
    else:
        console.print(runs_table(found, root=roots[0] if len(roots) == 1 else None))


@app.command()
@user_errors
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders", show_default=False)],
    out: Annotated[Path, typer.Option(help="image file to write (.png)")] = Path("runs.png"),
    x: Annotated[str, typer.Option(help="x axis: steps, tokens or words")] = "steps",
    metrics: Annotated[
        str | None, typer.Option(help="comma-separated, e.g. loss,val_loss,lr,eval/blimp (default: all)")
    ] = None,
    smooth: Annotated[float, typer.Option(help="moving-average weight for train loss, 0 to 0.99")] = 0.0,
) -> None:
    """Plot loss, validation loss, learning rate and eval scores of runs on shared axes."""
    from lm_pretrain.plot import plot_runs

    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    plot_runs(
        run_dirs,
        output_file(out, "--out", IMAGE_SUFFIXES),
        x=x,
        metrics=chosen,
        smooth=smooth,
        warn=lambda m: err_console.print(f"[yellow]warning:[/] {m}", highlight=False),
    )
    console.print(f"wrote {out}", highlight=False)


@app.command()
@user_errors
def sweep(
    recipe: RecipeArg,
    grid: Annotated[
        list[str],
        typer.Option("--grid", help="key.path=value1,value2,... (repeatable: every combination runs)"),
    ],
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="folder of the sweep's runs (default runs/<name>-sweep)")
    ] = None,
    slurm: Annotated[
        bool, typer.Option("--slurm", help="write a SLURM array job instead of training here")
    ] = False,
) -> None:
    """Train one run per point of a grid, one after another, then compare them by validation loss."""
    from lm_pretrain.sweep import run_sweep

    run_sweep(recipe, grid, set_ or [], out, slurm, console)


@app.command("merge-checkpoints")
@user_errors
def merge_checkpoints(
    checkpoints: Annotated[
        list[Path] | None, typer.Argument(help="checkpoint or transformers folders", show_default=False)
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder (transformers-loadable)")] = ...,
    method: Annotated[
        str | None,
        typer.Option(help="uniform, weighted, ema, loss or greedy (default: weighted with --weights)"),
    ] = None,
    weights: Annotated[
        list[str] | None, typer.Option(help="one weight per input, e.g. --weights 1,2,3 (normalised)")
    ] = None,
    decay: Annotated[float, typer.Option(help="ema: weight decay**(newest step - step)")] = 0.99,
    penalty: Annotated[float, typer.Option(help="loss: weight exp(-penalty * (loss - best loss))")] = 10.0,
    run: Annotated[
        Path | None, typer.Option(help="a run folder: its checkpoints are the inputs; its data scores them")
    ] = None,
    last_k: Annotated[
        int | None, typer.Option(min=1, help="with --run: only its newest K checkpoints")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Average checkpoints of one run into one model, streaming one tensor at a time."""
    from lm_pretrain.merge import merge_checkpoints as merge

    parsed = None
    if weights:
        try:
            parsed = [float(w) for item in weights for w in item.split(",") if w.strip()]
        except ValueError:
            raise LmpError(
                f"--weights must be numbers, e.g. --weights 1,2,3; got {','.join(weights)}"
            ) from None
    result = merge(
        checkpoints or [], out, method, parsed, decay, penalty, run, last_k, force,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    for item, weight in zip(result.inputs, result.weights, strict=True):
        loss = f"  val_loss {item.val_loss:.4f}" if item.val_loss is not None else ""
        console.print(f"{weight:8.4f}  {item.path}{loss}", highlight=False)
    soup = f"; soup validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    console.print(f"[bold green]merged[/] ({result.method}) into {result.out}{soup}", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


@app.command()
@user_errors
def bench(
    recipe: Annotated[
        Path | None, typer.Argument(help="take the shapes from this recipe", show_default=False)
    ] = None,
    set_: SetOpt = None,
    hidden: Annotated[int | None, typer.Option(min=1, help="hidden size (default 256)")] = None,
    layers: Annotated[int | None, typer.Option(min=1, help="layers (default 4)")] = None,
    heads: Annotated[int | None, typer.Option(min=1, help="attention heads (default 4)")] = None,
    vocab: Annotated[int | None, typer.Option(min=1, help="vocabulary size (default 8192)")] = None,
    seq: Annotated[int | None, typer.Option(min=1, help="sequence length (default 256)")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="sequences per step (default 16)")] = None,
    steps: Annotated[int, typer.Option(min=1, help="timed steps per model, after 2 warm-up steps")] = 10,
    compile_: Annotated[
        bool, typer.Option("--compile/--no-compile", help="also time torch.compile'd lmp and transformers")
    ] = True,
    prep: Annotated[bool, typer.Option("--prep/--no-prep", help="tokenizer and eval throughput too")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
) -> None:
    """Training speed of lmp vs transformers' Llama (same shapes, weights, batches): tokens/s, MFU."""
    from dataclasses import replace

    from lm_pretrain.bench import Shape, run_bench, shape_from_recipe
    from lm_pretrain.bench_report import result_lines, result_table, write_json

    if json_out is not None:
        output_file(json_out, "--json", replaces=("models", "ratios"))
    if set_ and recipe is None:
        raise LmpError(
            "--set changes a recipe's fields: give the RECIPE, or set the shape with --hidden, --seq, ..."
        )
    shape = shape_from_recipe(recipe, set_) if recipe is not None else Shape()
    given = {"hidden": hidden, "layers": layers, "heads": heads, "vocab": vocab, "seq": seq, "batch": batch}
    shape = replace(shape, **{k: v for k, v in given.items() if v is not None})
    if shape.hidden % shape.heads:
        raise LmpError(f"--hidden {shape.hidden} must be a multiple of --heads {shape.heads}")
    if (shape.hidden // shape.heads) % 2:
        raise LmpError(
            f"--hidden / --heads (the head size, {shape.hidden // shape.heads}) must be even for rotary embeddings"
        )
    result = run_bench(
        shape, steps=steps, compile=compile_, prep=prep, log=lambda m: console.print(f"[dim]{m}[/]")
    )
    console.print(result_table(result))
    for line in result_lines(result):
        console.print(line, highlight=False)
    if json_out is not None:
        write_json(result, json_out)
        console.print(f"results: {json_out}", highlight=False)


if __name__ == "__main__":
    app()
