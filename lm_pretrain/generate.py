"""Sampling text from any model folder lmp writes (a checkpoint, a run's final/, or a run)."""

from __future__ import annotations

from pathlib import Path

import torch

from lm_pretrain.errors import LmpError


def resolve_model_folder(path: Path) -> Path:
    """A model folder itself, or for a run folder its final/ export, else its newest checkpoint."""
    if (path / "config.json").is_file():
        return path
    if (path / "final" / "config.json").is_file():
        return path / "final"
    from lm_pretrain.train.checkpoint import step_checkpoints

    checkpoints = step_checkpoints(path)
    if checkpoints:
        return checkpoints[-1]
    raise LmpError(
        f"{path} is not a model folder (no config.json), nor a run folder with final/ or checkpoints/; "
        "pass runs/<name>/final, runs/<name>/checkpoints/step-<N>, or a transformers model folder"
    )


def generate(
    model_path: Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    prefix: str = "",
) -> str:
    """Sample a continuation of `prompt` with transformers' generate (offline, local files only).

    `prefix` is conditioning text placed before the prompt and left out of the result, e.g. the
    metadata a MeCo model was trained with ("childes\n\n")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stdout to the generated text alone
    hf_logging.set_verbosity_error()
    folder = resolve_model_folder(model_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    torch.manual_seed(seed)
    encoded = tokenizer(prefix + prompt, return_tensors="pt")
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
