"""`lmp train --nproc N`: the same command once per process through torch's own launcher (as
`accelerate launch` does), after checking once, here, what would otherwise fail in every process."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from lm_pretrain.recipe import Recipe
from lm_pretrain.run_folder import STATUS_FILE
from lm_pretrain.train.start import Branch


def launch_processes(
    nproc: int,
    recipe_path: Path,
    options: list[str],
    recipe: Recipe,
    run_dir: Path,
    branch: Branch | None,
    resume: bool,
    console: Console,
    err_console: Console,
) -> int:
    """Train in `nproc` processes; the exit code (75 when a signal stopped the run)."""
    from lm_pretrain.data.prepare import prepare_data
    from lm_pretrain.train.forward import split_batch
    from lm_pretrain.train.signals import EXIT_STOPPED
    from lm_pretrain.train.start import plan_start

    # refusals and data errors once, here, rather than once per process behind tracebacks;
    # the processes then find the tokenizer and shards in the cache
    split_batch(recipe.train, nproc, f"--nproc {nproc}")
    plan_start(recipe, run_dir, branch, resume)
    prepare_data(recipe, console=console)
    os.environ["LMP_DATA_REPORTED"] = "1"  # the processes need not print the data report again
    code = _torchrun(nproc, ["-m", "lm_pretrain.cli", "train", str(recipe_path), *options], err_console)
    status = run_dir / STATUS_FILE
    # the launcher reports any worker's non-zero exit as a failure; a stop keeps its own code
    if code and status.is_file() and json.loads(status.read_text()).get("state") == "stopped":
        code = EXIT_STOPPED
    return code


def _torchrun(nproc: int, command: list[str], err_console: Console) -> int:
    """Run `python <command>` in `nproc` processes through torch's launcher (as accelerate launch
    does); the exit code of the first process that failed, else 0. The launcher's own traceback
    is left out: each process has printed its error already."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as launch

    launch_args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", *command])
    try:
        launch(launch_args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        err_console.print(f"[bold red]error:[/] training process {rank} exited with code {failure.exitcode}")
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
