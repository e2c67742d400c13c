"""JSON Lines read one object per line, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lm_pretrain.errors import LmpError


def json_objects(
    lines: Iterable[tuple[int, str]], path: Path, fix: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank (number, text) line of `path`; LmpError naming the
    file, the line and `fix` for a line that is not a JSON object."""
    for number, line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmpError(f"{path}:{number}: not valid JSON ({exc.msg}); {fix}") from None
        if not isinstance(value, dict):
            raise LmpError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        yield number, value
