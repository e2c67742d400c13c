"""The inputs of a merge: checkpoint or transformers folders read lazily, checked to be one
architecture, and averaged one tensor name at a time (so memory stays about one model however
many inputs there are)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lm_pretrain.errors import LmpError
from lm_pretrain.run_folder import CHECKPOINTS_DIR, METRICS_FILE, STATE_FILE, read_json, step_checkpoints

# files that make up a tokenizer in a transformers folder; the output takes the first input's
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)

CONFIG_FILE = "config.json"


WEIGHTS_FILE = "model.safetensors"


INDEX_FILE = "model.safetensors.index.json"


PROVENANCE_FILE = "lmp.json"


# config.json keys that do not describe the architecture: they may differ between inputs
_CONFIG_IGNORED = {"transformers_version", "_name_or_path", "torch_dtype", "dtype"}


@dataclass
class MergeInput:
    """One input folder and what its files say about it."""

    path: Path
    files: dict[str, Path]  # tensor name -> the safetensors file holding it
    step: int | None = None
    val_loss: float | None = None  # recorded at this checkpoint's own step (None: unknown or stale)


def resolve_inputs(paths: list[Path], run: Path | None, last_k: int | None) -> list[Path]:
    """The explicit folders, else the run's checkpoints (the newest `last_k` when given)."""

    if last_k is not None and run is None:
        raise LmpError("--last-k K needs --run RUN (the run whose newest K checkpoints to merge)")
    if paths and last_k is not None:
        raise LmpError("give either checkpoint folders or --run RUN --last-k K, not both")
    if paths:
        return list(paths)
    if run is None:
        raise LmpError("nothing to merge: pass checkpoint folders, or --run RUN [--last-k K]")
    # a run may hold two folders of one step (a milestone copy beside step-N): count each step once
    by_step = {(read_json(p / STATE_FILE) or {}).get("step", p.name): p for p in step_checkpoints(run)}
    found = list(by_step.values())
    if not found:
        raise LmpError(f"{run / 'checkpoints'} holds no complete step-N checkpoint; is {run} a run folder?")
    return found[-last_k:] if last_k is not None else found


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a single-file or a sharded folder."""
    single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
    try:
        if single.is_file():
            with safe_open(str(single), "pt") as handle:
                return dict.fromkeys(handle.keys(), single)
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: folder / shard for name, shard in weight_map.items()}
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as exc:
        raise LmpError(f"the weights of {folder} cannot be read ({exc}); is the folder complete?") from None
    raise LmpError(
        f"{folder} has no {WEIGHTS_FILE} (nor {INDEX_FILE}); pass an lmp checkpoint or a transformers "
        "folder saved with safetensors (save_pretrained(..., safe_serialization=True))"
    )


def _logged_val_losses(run_dir: Path) -> dict[int, float] | None:
    """step -> val_loss from a run's metrics.jsonl, or None when the run has no metrics file."""
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        return None
    losses = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(record, dict) and record.get("val_loss") is not None and "step" in record:
            losses[int(record["step"])] = float(record["val_loss"])
    return losses


def read_input(folder: Path) -> MergeInput:
    """An input's weight files, and its step and validation loss when lmp recorded them."""
    if not folder.is_dir():
        raise LmpError(
            f"input {folder} is not a folder; pass checkpoint folders (runs/<name>/checkpoints/step-N)"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise LmpError(
            f"input {folder} has no {CONFIG_FILE}; pass an lmp checkpoint or a transformers folder"
        )
    item = MergeInput(folder, _weight_files(folder))
    # trainer_state.json is a checkpoint's own record; lmp.json is written into every lmp folder
    state = read_json(folder / STATE_FILE) or read_json(folder / PROVENANCE_FILE) or {}
    if isinstance(state.get("step"), int):
        item.step = state["step"]
    # The trainer records its latest evaluation in each checkpoint; it is this checkpoint's own
    # only when measured at this step (eval_every need not divide checkpoint.every).
    if isinstance(state.get("val_loss"), int | float) and state.get("val_loss_step") == item.step:
        item.val_loss = float(state["val_loss"])
    # inside a run, its metrics.jsonl says which steps were evaluated
    logged = _logged_val_losses(folder.parent.parent) if folder.parent.name == CHECKPOINTS_DIR else None
    if logged is not None and item.step is not None:
        item.val_loss = logged.get(item.step)
    return item


def check_compatible(inputs: list[MergeInput]) -> None:
    """LmpError naming the first difference in config, tokenizer, tensor names, shapes or dtypes."""
    first = inputs[0]
    base_config = read_json(first.path / CONFIG_FILE) or {}
    base_specs = _tensor_specs(first)
    for other in inputs[1:]:
        pair = f"{other.path} and {first.path}"
        config = read_json(other.path / CONFIG_FILE) or {}
        for key in [*base_config, *(k for k in config if k not in base_config)]:
            if key not in _CONFIG_IGNORED and base_config.get(key) != config.get(key):
                raise LmpError(
                    f"{pair} are different models: config.json {key} is {config.get(key)!r} vs "
                    f"{base_config.get(key)!r}; merge only checkpoints of one model"
                )
        for name in TOKENIZER_FILES:
            a, b = first.path / name, other.path / name
            if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
                raise LmpError(
                    f"{pair} have different tokenizers: {name} differs (or is missing in one); "
                    "merge only checkpoints trained with one tokenizer"
                )
        specs = _tensor_specs(other)
        for name in [*base_specs, *(k for k in specs if k not in base_specs)]:
            if name not in specs or name not in base_specs:
                holder, lacker = (first, other) if name in base_specs else (other, first)
                raise LmpError(
                    f"{holder.path} has tensor {name} that {lacker.path} lacks; merge only checkpoints of one model"
                )
            if specs[name] != base_specs[name]:
                raise LmpError(
                    f"{pair} differ in tensor {name}: shape/dtype {specs[name]} vs {base_specs[name]}; "
                    "merge only checkpoints of one model saved in one dtype"
                )


def _tensor_specs(item: MergeInput) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape), read from the safetensors headers without loading any tensor."""
    specs = {}
    for path in dict.fromkeys(item.files.values()):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                specs[name] = (piece.get_dtype(), tuple(piece.get_shape()))
    return specs


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    # Open per tensor: safetensors memory-maps the file, and the pages read stay resident (and
    # count in RSS) until the file is closed; keeping all inputs open would grow memory with
    # their number.
    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor(name)


def averaged_tensors(
    inputs: list[MergeInput], weights: list[float]
) -> Iterator[tuple[str, torch.Tensor, torch.dtype]]:
    """(name, fp32 weighted sum, the inputs' dtype) per tensor, in the first input's order."""
    for name in inputs[0].files:
        total, dtype = None, None
        for item, weight in zip(inputs, weights, strict=True):
            if weight == 0:
                continue  # the greedy soup leaves inputs out with weight 0: skip reading them
            tensor = _read_tensor(item.files[name], name)
            if not tensor.is_floating_point():
                raise LmpError(
                    f"{item.path}: tensor {name} is {tensor.dtype}; only floating-point weights average"
                )
            if not torch.isfinite(tensor).all():
                raise LmpError(
                    f"{item.path}: tensor {name} holds NaN or inf (the run diverged there); "
                    "leave that checkpoint out"
                )
            dtype = tensor.dtype
            if total is None:
                total = tensor.to(torch.float32) * weight
            else:
                total.add_(tensor.to(torch.float32), alpha=weight)
            del tensor
        yield name, total, dtype
