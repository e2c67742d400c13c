"""Sampling text from any model folder lmp writes (a checkpoint, a run's final/, or a run)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lm_pretrain.errors import LmpError
from lm_pretrain.model.remote_code import trust_remote_code as trust_remote_code_for
from lm_pretrain.run_folder import model_folder

# one of these must be in a model folder (transformers' names, single file or sharded)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def resolve_model_folder(path: Path) -> Path:
    """The model folder `path` stands for (run_folder.model_folder), checked so that a broken
    folder is named with its fix rather than a transformers traceback."""
    folder = model_folder(path)
    check_model_folder(folder)
    return folder


def check_model_folder(folder: Path) -> None:
    """Raise LmpError for the broken folders people meet: a bad config, weights missing or cut
    short by an interrupted copy, no tokenizer."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise LmpError(
            f"{config_path} cannot be read as JSON ({exc}); restore it or export the model again"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise LmpError(f"{config_path} has no model_type, so it is not a transformers model config")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise LmpError(
            f"{folder} holds no weights ({', '.join(_WEIGHT_FILES[:2])}); copy the folder again, or "
            "export a checkpoint with lmp export"
        )
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise LmpError(
                f"{path} is damaged ({exc}), perhaps by a copy cut short; copy it again, or export "
                "the model again from its checkpoint"
            ) from None
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise LmpError(
            f"{folder} holds no tokenizer (tokenizer.json); lmp saves one with every model, so copy "
            "it from the run's tokenizer/ folder"
        )


def load_pretrained(
    folder: Path, auto_class: type, trust: bool, **tokenizer_args: object
) -> tuple[object, torch.nn.Module]:
    """(tokenizer, model) from a checked model folder, every failure one line: transformers
    raises many kinds, and would leave tensors the files lack, or shaped unlike the config, at
    their random initialisation with only a log line (which lmp silences)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust, **tokenizer_args
        )
    except Exception as exc:
        raise LmpError(f"cannot load the tokenizer in {folder}: {_one_line(exc)}") from None
    try:
        model, info = auto_class.from_pretrained(
            folder,
            local_files_only=True,
            trust_remote_code=trust,
            ignore_mismatched_sizes=True,  # reported below, with the shapes
            output_loading_info=True,
        )
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise LmpError(
                f"{folder}: the weights are a pickle holding more than tensors, which could run code "
                "when unpickled, so lmp will not load it: get the weights as model.safetensors"
            ) from None
        raise LmpError(f"cannot load {folder}: {_one_line(exc)}") from None
    if info["mismatched_keys"]:
        name, found, wanted = sorted(info["mismatched_keys"])[0]
        raise LmpError(
            f"{folder}: the weights do not fit config.json ({name} is {list(found)} in the files, "
            f"{list(wanted)} by the config); they belong to another model: copy or export it again"
        )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise LmpError(
            f"{folder}: the weights lack {len(missing)} tensor(s) the config needs ({shown}), so "
            "the folder is incomplete: copy or export it again"
        )
    return tokenizer, model


def _one_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    # validation errors put the cause on the line after "...:"
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def generate(
    model_path: Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    prefix: str = "",
    trust_remote_code: bool = False,
    warn: Callable[[str], None] = lambda _: None,
) -> str:
    """Sample a continuation of `prompt` with transformers' generate (offline, local files only).

    `prefix` is conditioning text placed before the prompt and left out of the result, e.g. the
    metadata a MeCo model was trained with ("childes\n\n")."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stdout to the generated text alone
    hf_logging.set_verbosity_error()
    folder = resolve_model_folder(model_path)
    # explicit, so that transformers never stops at its interactive prompt (remote_code.py)
    trust = trust_remote_code_for(folder, trust_remote_code)
    tokenizer, model = load_pretrained(folder, AutoModelForCausalLM, trust)
    model.eval()
    torch.manual_seed(seed)
    encoded = tokenizer(prefix + prompt, return_tensors="pt")
    length = encoded["input_ids"].shape[1] + max_new_tokens
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and length > context:
        warn(
            f"the prompt and --max-new-tokens make {length} tokens, past the {context} the model was "
            "trained on: text beyond that is unreliable"
        )
    with torch.no_grad():
        out = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=top_k if temperature > 0 else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True).removeprefix(prefix)
