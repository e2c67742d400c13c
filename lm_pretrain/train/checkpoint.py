"""Checkpoints: one format for everything.

A checkpoint folder is a transformers-loadable model folder (config.json, model.safetensors,
tokenizer files) plus the training state beside it (optimizer.pt, rng-<rank>.pt,
trainer_state.json). So `lmp generate`, `lmp eval` and transformers all read any checkpoint,
and resume reads the same folder. Folders are written under a temporary name, fsynced and
renamed, so a kill during a save never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import Decoder
from lm_pretrain.model.export import save_model
from lm_pretrain.run_folder import CHECKPOINTS_DIR, STATE_FILE, is_step_checkpoint, step_checkpoints


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_folder(model: Decoder, tokenizer_dir: Path, out: Path, extra: dict[str, Any]) -> None:
    """A transformers-loadable folder: weights, config, tokenizer files and lmp.json provenance."""
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, out / item.name)
    (out / "lmp.json").write_text(json.dumps(extra, indent=2) + "\n")


def publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished folder into place, replacing an older one of the same name."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """This process's random generators as tensors and plain values, which torch.load reads with
    weights_only=True (no pickled numpy objects)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state(); also reads the numpy arrays of files written before lmp stored tensors."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Exactly what the RNG files of earlier lmp releases hold beyond plain values: numpy's uint32 key
# array. Allowed by object, so no other global (and none that runs code) can be unpickled.
_OLD_RNG_GLOBALS = [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_state_file(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain values only, never code.

    A file that needs anything else is refused (LmpError naming it): checkpoints are shared, and
    unpickling an arbitrary object can run any code its author wrote."""
    allowed = _OLD_RNG_GLOBALS if path.name.startswith("rng-") else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED_GLOBAL.search(str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise LmpError(
            f"{path} holds objects other than tensors and plain values{what}, which lmp never unpickles: "
            "it was not written by lmp and may be hostile. Use a checkpoint from a source you trust"
        ) from None


def save_checkpoint(
    run_dir: Path,
    model: Decoder,
    optimizer_state: dict[str, Any],
    tokenizer_dir: Path,
    state: dict[str, Any],
    keep_last: int,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoints/<name>/ (default step-<N>) atomically, then prune step-<N> folders to
    the newest `keep_last`. Named (milestone) checkpoints are always kept. `rng_states` holds
    every process's RNG state (rng-<rank>.pt); by default this process's alone."""
    folder = run_dir / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = name or f"step-{state['step']}"
    final = folder / name
    tmp = folder / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_model_folder(model, tokenizer_dir, tmp, {"kind": "checkpoint", **state})
        torch.save(optimizer_state, tmp / "optimizer.pt")
        for rank, rng in enumerate(rng_states or [rng_state()]):
            torch.save(rng, tmp / f"rng-{rank}.pt")
        for file_name, obj in (extra or {}).items():  # e.g. the weight average's state
            torch.save(obj, tmp / file_name)
        # trainer_state.json last: its presence is what marks a checkpoint as complete
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    except (OSError, RuntimeError, SafetensorError) as exc:  # disk full, read-only, quota
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        kept = step_checkpoints(run_dir)
        newest = f"the newest complete checkpoint is {kept[-1]}" if kept else "no checkpoint was saved yet"
        raise LmpError(
            f"could not write checkpoint {final} ({exc}); {newest}. Free disk space (or fix the "
            "folder's permissions) and run the same command to resume"
        ) from None
    publish(tmp, final)
    for old in [p for p in step_checkpoints(run_dir) if is_step_checkpoint(p)][:-keep_last]:
        try:
            shutil.rmtree(old)
        except OSError as exc:
            # the new checkpoint is saved: an old one that cannot be deleted costs disk, not the run
            print(
                f"warning: could not delete old checkpoint {old} ({exc.strerror or exc}); "
                "it was left in place, delete it by hand to free the space",
                file=sys.stderr,
            )
    return final


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng: dict[str, Any] | None
    state: dict[str, Any]  # trainer_state.json: step, data position, ...


def read_checkpoint(path: Path, rank: int = 0) -> Checkpoint:
    """Everything a checkpoint holds for process `rank`. A process the saving run did not have
    takes rank 0's RNG state. The LR schedule needs nothing: it is a pure function of the step."""
    from safetensors.torch import load_file

    missing = [n for n in (STATE_FILE, "model.safetensors", "optimizer.pt") if not (path / n).is_file()]
    if missing:
        raise LmpError(
            f"checkpoint {path} is incomplete (missing {', '.join(missing)}); delete it to resume from an earlier one"
        )
    try:
        weights = load_file(path / "model.safetensors")
        optimizer_state = load_state_file(path / "optimizer.pt")
        rng_file = path / f"rng-{rank}.pt"
        if not rng_file.is_file():
            rng_file = path / "rng-0.pt"
        rng = load_state_file(rng_file) if rng_file.is_file() else None
        state = json.loads((path / STATE_FILE).read_text())
    except LmpError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file means the same to the user
        raise LmpError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); it was damaged after it "
            f"was written. Move it aside, out of {path.parent} (e.g. mv {path} {path.parent.parent}/{path.name}.damaged): "
            "a resume then starts from the previous checkpoint (a branch needs another checkpoint to start from)."
        ) from None
    return Checkpoint(weights, optimizer_state, rng, state)


def load_weights(model: Decoder, checkpoint: Checkpoint, path: Path) -> None:
    weights = dict(checkpoint.weights)
    if model.config.tie_embeddings and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    expected = model.state_dict()
    for name, tensor in expected.items():  # named first: torch lists every mismatch over many lines
        found = weights.get(name)
        if found is not None and found.shape != tensor.shape:
            raise LmpError(
                f"checkpoint {path} does not fit this recipe's model: {name} is {list(found.shape)} there, "
                f"{list(tensor.shape)} by the recipe; train with the recipe the run was started with "
                "(its model section), or into a new folder with --out"
            )
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        missing = " ".join(first[:2]) if first else type(exc).__name__
        raise LmpError(f"checkpoint {path} does not fit this recipe's model: {missing}") from None
