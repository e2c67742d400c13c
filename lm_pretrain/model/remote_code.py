"""Which model folders may run their own Python.

transformers runs a folder's Python files when its config.json or tokenizer_config.json maps an
auto class to them (auto_map) and the caller allows remote code. Model folders are
shared between teams, so lmp runs such code only when it is lmp's own modeling file for masked
and hybrid models (recognised by its content, not its name) or when the user passed
--trust-remote-code. Everything else is refused before transformers sees the folder, and lmp
always passes trust_remote_code explicitly, so transformers never asks at a prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lm_pretrain.errors import LmpError

CODE_CONFIGS = ("config.json", "tokenizer_config.json")
OWN_MODELING_SOURCE = Path(__file__).with_name("hf_masked_next_token.py")
# sha256 of the modeling files earlier lmp releases wrote into exported folders
_EARLIER_OWN_HASHES = {"9fe0d0bb0fed8054376d2de359ed624aae5858c71b6f2373fa27c63e9c03f471"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_lmp_modeling_file(path: Path) -> bool:
    """Whether `path` is, byte for byte, a modeling file some lmp release exports."""
    if not path.is_file():
        return False
    digest = _sha256(path)
    return digest == _sha256(OWN_MODELING_SOURCE) or digest in _EARLIER_OWN_HASHES


def _auto_map(path: Path) -> dict:
    try:
        found = json.loads(path.read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return {}  # unreadable or not a JSON object: transformers fails on it without running code
    return found if isinstance(found, dict) else {}


def code_references(folder: Path) -> list[tuple[str, str]]:
    """(config file, referenced code) for each auto_map entry of the folder's configs. A local
    reference "module.Class" names module.py in the folder; "repo--module.Class" is another
    repository's code."""
    found = []
    for name in CODE_CONFIGS:
        for value in _auto_map(folder / name).values():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str) and ref:
                    found.append((name, ref))
    return found


def local_file(ref: str) -> str | None:
    """The folder file a local reference names; None for another repository's code."""
    if "--" in ref or "." not in ref:
        return None
    return ref.rsplit(".", 1)[0].replace(".", "/") + ".py"


def foreign_code(folder: Path) -> list[tuple[str, str]]:
    """The references that are not lmp's own modeling file, as (config file, reference)."""
    return [
        (where, ref)
        for where, ref in code_references(folder)
        if (file := local_file(ref)) is None or not is_lmp_modeling_file(folder / file)
    ]


def trust_remote_code(folder: Path, allowed: bool) -> bool:
    """The trust_remote_code value to load `folder` with: True for lmp's own modeling file or,
    with `allowed` (the user's --trust-remote-code), for any code; False for a folder without
    code. LmpError for a folder that asks to run other code when the user did not allow it."""
    folder = Path(folder)
    if not code_references(folder):
        return False
    foreign = foreign_code(folder)
    if foreign and not allowed:
        where, ref = foreign[0]
        what = local_file(ref) or f"{ref}, from another repository"
        raise LmpError(
            f"{folder / where} asks to run the folder's own Python ({what}); lmp runs a model "
            "folder's code only with --trust-remote-code: pass it if you trust whoever wrote this folder"
        )
    return True
