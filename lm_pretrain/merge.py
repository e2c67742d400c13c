"""`lmp merge-checkpoints`: average the weights of several checkpoints of one run, streaming.

Averaging checkpoints of one run is a cheap stand-in for (or complement to) learning-rate decay
and a way to judge a constant-LR run mid-way. The inputs are lmp checkpoints or transformers
folders (config.json + model.safetensors, or a sharded model.safetensors.index.json); the output is
a transformers folder with the first input's config and tokenizer files, plus lmp.json that records
the inputs, their weights and the method.

Memory: tensors are read one name at a time from every input and summed in fp32, each sum cast to
the inputs' dtype as soon as it is complete. So the process holds the output model plus one fp32
tensor and one input tensor, however many inputs there are (scripts/bench_merge_rss.py measures
it). The greedy soup also keeps an fp32 running sum and a model to score, about three models.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lm_pretrain.errors import LmpError, check_writable
from lm_pretrain.merge_inputs import (
    CONFIG_FILE,
    PROVENANCE_FILE,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    MergeInput,
    averaged_tensors,
    check_compatible,
    read_input,
    resolve_inputs,
)
from lm_pretrain.run_folder import (
    CHECKPOINTS_DIR,
    RECIPE_FILE,
    STATE_FILE,
    STATUS_FILE,
    check_outside_run,
    read_json,
    root_run,
    run_of_checkpoint,
)

METHODS = ("uniform", "weighted", "ema", "loss", "greedy")
# copied to the output when present (they describe the model, not one checkpoint's training)
EXTRA_FILES = ("generation_config.json", "modeling_lmp.py")
# scores a model: its validation loss in nats/token, lower is better
Scorer = Callable[[torch.nn.Module], float]


@dataclass
class MergeResult:
    out: Path
    method: str
    inputs: list[MergeInput]
    weights: list[float]
    val_loss: float | None = None  # the greedy soup's score on the run's validation data
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # things worth a look that did not stop the merge


# ------------------------------------------------------------------ inputs


# ------------------------------------------------------------------ weights per method


def normalise(weights: list[float]) -> list[float]:
    """Weights scaled to sum to 1; LmpError for negative, non-finite or all-zero weights."""
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise LmpError(f"--weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise LmpError(f"--weights must not all be zero, got {weights}")
    return [w / total for w in weights]


def ema_weights(steps: list[int], decay: float) -> list[float]:
    """decay ** (newest step - step), normalised: an EMA of the weights sampled at these steps."""
    if not 0 < decay <= 1:
        raise LmpError(f"--decay must be in (0, 1], got {decay}")
    newest = max(steps)
    # in log space, so a long gap underflows to 0 instead of raising
    return normalise([math.exp((newest - s) * math.log(decay)) for s in steps])


def loss_weights(losses: list[float], penalty: float) -> list[float]:
    """exp(-penalty * (loss - best loss)), normalised: 0 is uniform, large keeps the best alone."""
    if penalty < 0:
        raise LmpError(f"--penalty must be >= 0, got {penalty}")
    best = min(losses)
    return normalise([math.exp(-penalty * (loss - best)) for loss in losses])


# ------------------------------------------------------------------ streaming average


def write_average(inputs: list[MergeInput], weights: list[float], folder: Path) -> None:
    """model.safetensors in `folder`: the weighted average, each tensor in the inputs' dtype."""
    out: dict[str, torch.Tensor] = {}
    for name, total, dtype in averaged_tensors(inputs, weights):
        out[name] = total.to(dtype)  # no copy when the inputs are fp32
        del total
    save_file(out, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


# ------------------------------------------------------------------ scoring on a run's validation data


class RunScorer:
    """Validation loss of a set of weights on a run's own validation windows, as the trainer scores."""

    def __init__(self, run_dir: Path) -> None:
        from lm_pretrain.data.loader import validation_batches
        from lm_pretrain.data.prepare import prepare_data
        from lm_pretrain.recipe import load_recipe
        from lm_pretrain.train.forward import make_accelerator, packing_bos

        recipe_path = run_dir / RECIPE_FILE
        if not recipe_path.is_file():
            raise LmpError(
                f"{recipe_path} is missing: scoring needs the run's recipe to find its validation data; "
                "pass --run RUN pointing at the run folder that holds recipe.yaml"
            )
        self.run_dir = run_dir
        self.recipe = load_recipe(recipe_path)
        data = prepare_data(self.recipe, console=None, show_progress=False)  # cached after training
        micro = self.recipe.train.micro_batch_size or self.recipe.train.batch_size
        self.batches = validation_batches(
            data.val.tokens,
            self.recipe.seq_len,
            self.recipe.train.eval_tokens,
            micro,
            data.special_ids["bos"],
        )
        self.accelerator = make_accelerator(self.recipe.train.precision)
        self.document_bos = packing_bos(self.recipe, data.special_ids["bos"])

    def __call__(self, model: torch.nn.Module) -> float:
        from lm_pretrain.train.forward import validation_loss

        model = model.to(self.accelerator.device)
        return validation_loss(model, self.batches, self.accelerator, self.document_bos)


def _find_run(inputs: list[MergeInput], run: Path | None) -> Path | None:
    """--run, else the run folder that all inputs are checkpoints of."""
    if run is not None:
        return run
    parents = {i.path.resolve().parent for i in inputs}
    if len(parents) == 1:
        (folder,) = parents
        if folder.name == CHECKPOINTS_DIR and (folder.parent / RECIPE_FILE).is_file():
            return folder.parent
    return None


def _decoder_for(inputs: list[MergeInput]):
    from lm_pretrain.model.decoder import Decoder
    from lm_pretrain.model.export import decoder_config_from_hf

    config_path = inputs[0].path / CONFIG_FILE
    try:
        return Decoder(decoder_config_from_hf(read_json(config_path) or {}))
    except LmpError as exc:
        raise LmpError(f"{config_path}: {exc}; scoring needs a model lmp's decoder can run") from None


def _load_fp32(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    missing = [k for k in model.state_dict() if k not in tensors and k != "lm_head.weight"]
    if missing:
        raise LmpError(f"the checkpoints lack {missing[0]}, which lmp's decoder needs to score them")
    model.load_state_dict(tensors, strict=False)


def _fp32_weights(item: MergeInput) -> dict[str, torch.Tensor]:
    return {name: total for name, total, _ in averaged_tensors([item], [1.0])}


def score_inputs(inputs: list[MergeInput], get_scorer: Callable[[], Scorer]) -> list[float]:
    """Each input's validation loss: the recorded one when fresh, else scored now."""
    model = None
    for item in inputs:
        if item.val_loss is None:
            model = model or _decoder_for(inputs)
            _load_fp32(model, _fp32_weights(item))
            item.val_loss = get_scorer()(model)
    return [item.val_loss for item in inputs]


def greedy_soup(inputs: list[MergeInput], scorer: Scorer) -> tuple[list[float], float, list[dict[str, Any]]]:
    """Add inputs best-first to a uniform soup, keeping each only if the soup's loss improves.

    Returns the weights (1/kept for kept inputs, 0 for the rest), the soup's loss and a log.
    """
    losses = score_inputs(inputs, lambda: scorer)
    order = sorted(range(len(inputs)), key=lambda i: losses[i])
    model = _decoder_for(inputs)
    # fp32 running sum of the kept inputs; a candidate soup is (sum + candidate) / (kept + 1)
    soup_sum = _fp32_weights(inputs[order[0]])
    kept = [order[0]]
    _load_fp32(model, soup_sum)
    best = scorer(model)  # rescored, so every comparison below uses one scorer
    log = [{"input": str(inputs[order[0]].path), "soup_val_loss": best, "kept": True}]
    for index in order[1:]:
        candidate = _fp32_weights(inputs[index])
        n = len(kept) + 1
        _load_fp32(model, {name: (soup_sum[name] + candidate[name]) / n for name in soup_sum})
        loss = scorer(model)
        keep = loss < best
        log.append({"input": str(inputs[index].path), "soup_val_loss": loss, "kept": keep})
        if keep:
            for name in soup_sum:
                soup_sum[name].add_(candidate[name])
            kept.append(index)
            best = loss
        del candidate
    weights = [1.0 / len(kept) if i in kept else 0.0 for i in range(len(inputs))]
    return weights, best, log


# ------------------------------------------------------------------ the command


def merge_checkpoints(
    paths: list[Path],
    out: Path,
    method: str | None = None,
    weights: list[float] | None = None,
    decay: float = 0.99,
    penalty: float = 10.0,
    run: Path | None = None,
    last_k: int | None = None,
    force: bool = False,
    scorer: Scorer | None = None,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Average checkpoints into `out` (see the module docstring); `scorer` overrides the run's."""
    method = method or ("weighted" if weights else "uniform")
    if method not in METHODS:
        raise LmpError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if weights and method != "weighted":
        raise LmpError(f"--weights goes with --method weighted, not {method}")
    folders = resolve_inputs(paths, run, last_k)
    _check_output(out, folders, force)
    inputs = [read_input(folder) for folder in folders]
    if len({i.path.resolve() for i in inputs}) != len(inputs):
        raise LmpError("an input is given twice; to count one checkpoint more, use --method weighted")
    check_compatible(inputs)
    if not any((inputs[0].path / name).is_file() for name in TOKENIZER_FILES):
        raise LmpError(
            f"{inputs[0].path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...), so the merged "
            "folder would not load with its tokenizer; copy the run's tokenizer files into the inputs"
        )

    @functools.cache  # data preparation (cached on disk) and the validation windows: once
    def run_scorer() -> Scorer:
        if scorer is not None:
            return scorer
        run_dir = _find_run(inputs, run)
        if run_dir is None:
            raise LmpError(
                f"method {method} scores models on a run's validation data (soups, and inputs whose loss "
                "was not recorded at their own step), and the inputs are not checkpoints of one run "
                "folder; pass --run RUN, the run whose recipe.yaml names that data"
            )
        return RunScorer(run_dir)

    soup_loss, details = None, {}
    if method == "uniform":
        chosen = normalise([1.0] * len(inputs))
    elif method == "weighted":
        if not weights or len(weights) != len(inputs):
            raise LmpError(
                f"--method weighted needs one weight per input: {len(inputs)} inputs, "
                f"{len(weights or [])} weights (e.g. --weights 1,2,3)"
            )
        chosen = normalise(weights)
    elif method == "ema":
        missing = [i.path for i in inputs if i.step is None]
        if missing:
            raise LmpError(
                f"--method ema weights by training step, and {missing[0]} records none "
                f"({STATE_FILE} or {PROVENANCE_FILE} with 'step'); use --method uniform or weighted"
            )
        chosen = ema_weights([i.step for i in inputs], decay)
        details = {"decay": decay}
    elif method == "loss":
        losses = score_inputs(inputs, run_scorer)
        chosen = loss_weights(losses, penalty)
        details = {"penalty": penalty}
    else:
        chosen, soup_loss, log = greedy_soup(inputs, run_scorer())
        details = {"greedy": log}

    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dropped = _write_output(inputs, chosen, tmp, method, soup_loss, details, trust_remote_code)
        from lm_pretrain.train.checkpoint import publish

        publish(tmp, out)  # fsync and rename: a kill never leaves a half-written output
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    notes = _notes(inputs, paths, run, method, last_k)
    if dropped:
        notes.append(
            f"the inputs ask to run their own Python ({', '.join(dropped)}); the merged folder leaves it out "
            "and loads with transformers' own classes (pass --trust-remote-code to copy that code along)"
        )
    return MergeResult(out, method, inputs, chosen, soup_loss, details, notes)


def _run_root(folder: Path) -> Path | None:
    """The run a checkpoint comes from, followed through branches to the run that set its init."""
    run_dir = run_of_checkpoint(folder)
    return None if run_dir is None else root_run(run_dir)


def _notes(
    inputs: list[MergeInput], paths: list[Path], run: Path | None, method: str, last_k: int | None
) -> list[str]:
    notes = []
    if len(inputs) == 1:
        notes.append(f"one input ({inputs[0].path}): the output is a copy of its weights")
    elif last_k is not None and len(inputs) < last_k:
        notes.append(f"--last-k {last_k}: the run has {len(inputs)} checkpoints, all merged")
    roots = {_run_root(i.path) for i in inputs} - {None}
    if len(roots) > 1:
        notes.append(
            f"the inputs come from {len(roots)} different runs; averaging models trained from "
            "different initialisations usually gives a far worse model than either"
        )
    if paths and run is not None and method not in ("loss", "greedy"):
        notes.append(
            f"--run {run} was not used: the inputs are the folders given, and {method} scores nothing"
        )
    return notes


def _check_output(out: Path, folders: list[Path], force: bool) -> None:
    resolved = out.resolve()
    for folder in folders:
        # replacing --out must never delete an input, and writing it must never add to one
        if folder.resolve().is_relative_to(resolved) or resolved.is_relative_to(folder.resolve()):
            raise LmpError(
                f"--out {out} overlaps the input {folder}; inputs are never modified, pick another --out"
            )
    if out.exists() and not out.is_dir():
        raise LmpError(f"--out {out} is a file; pick a folder name")
    if out.exists() and not force:
        raise LmpError(f"--out {out} already exists; pass --force to replace it, or pick another folder")
    # --force replaces an earlier model folder, never a run or a folder of other things
    run_files = [n for n in (RECIPE_FILE, STATUS_FILE, CHECKPOINTS_DIR) if (out / n).exists()]
    if run_files:
        raise LmpError(
            f"--out {out} is a training run ({', '.join(run_files)}); it is never replaced, pick another folder"
        )
    check_outside_run(out, "--out")  # nor what training writes in one
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise LmpError(
            f"--out {out} holds files but no model (config.json); it is not replaced, pick another folder"
        )
    check_writable(out, "--out")


def _write_output(
    inputs: list[MergeInput],
    weights: list[float],
    folder: Path,
    method: str,
    soup_loss: float | None,
    details: dict[str, Any],
    trust_remote_code: bool = False,
) -> list[str]:
    """Write the merged folder; returns the code references left out of it (see _copy_code)."""
    first = inputs[0].path
    shutil.copy2(first / CONFIG_FILE, folder / CONFIG_FILE)
    copied = [name for name in (*TOKENIZER_FILES, *EXTRA_FILES) if (first / name).is_file()]
    for name in copied:
        if not name.endswith(".py"):  # code is _copy_code's to decide
            shutil.copy2(first / name, folder / name)
    dropped = _copy_code(first, folder, trust_remote_code)
    write_average(inputs, weights, folder)
    provenance = {
        "kind": "merge",
        "method": method,
        **details,
        "inputs": [
            {"path": str(i.path.resolve()), "step": i.step, "val_loss": i.val_loss, "weight": w}
            for i, w in zip(inputs, weights, strict=True)
        ],
        # the newest input's step: where in training this average stands
        "step": max((i.step for i in inputs if i.step is not None), default=None),
        "val_loss": soup_loss,
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return dropped


def _copy_code(source: Path, folder: Path, trusted: bool) -> list[str]:
    """Keep the merged folder loadable by what it can run: code an auto_map entry names is copied
    when it is lmp's own modeling file or the user trusts it (--trust-remote-code); otherwise the
    entry is dropped from the copied configs, and its reference returned."""
    from lm_pretrain.model import remote_code

    foreign = set() if trusted else {ref for _, ref in remote_code.foreign_code(source)}
    for _, ref in remote_code.code_references(source):
        file = remote_code.local_file(ref)
        if ref not in foreign and file is not None and (source / file).is_file():
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / file, folder / file)
    for name in remote_code.CODE_CONFIGS if foreign else ():
        path = folder / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        kept = {
            key: value
            for key, value in (config.get("auto_map") or {}).items()
            if not ({value} if isinstance(value, str) else set(value or [])) & foreign
        }
        if kept:
            config["auto_map"] = kept
        else:
            config.pop("auto_map", None)
        path.write_text(json.dumps(config, indent=2) + "\n")
    return sorted(foreign)
