"""The one exception type a user is meant to read: the CLI prints it without a traceback."""

from __future__ import annotations

import os
from pathlib import Path


class LmpError(Exception):
    """A problem with the user's input (recipe, corpus, checkpoint) that names the fix."""


def check_writable(path: Path, what: str) -> None:
    """Refuse, before any work, a folder (existing or to be made) that cannot be written:
    its nearest existing folder must be writable."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LmpError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        why = "its file system is read-only" if read_only else f"no permission to write in {existing}"
        raise LmpError(f"{what} {path}: cannot write there ({why}); choose another folder")
