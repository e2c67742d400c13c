"""Reading recipe files: PyYAML's safe loader (no Python objects), duplicate keys and alias bombs
refused, `extends:` inheritance and `--set key.path=value` overrides. Validation is recipe.py's."""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from lm_pretrain.errors import LmpError
from lm_pretrain.run_folder import RECIPE_FILE


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# values quoted in error messages are cut to this many characters: a recipe value can be huge
_QUOTE_CHARS = 200
_repr = reprlib.Repr()
_repr.maxlevel = 4
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 20
_repr.maxstring = _repr.maxlong = _repr.maxother = _QUOTE_CHARS


def quote(value: Any) -> str:
    """repr(value) for an error message, at most about 200 characters (reprlib never walks
    the whole of a huge value)."""
    text = _repr.repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "..."


# YAML aliases may stand for values many times the size of the file ("billion laughs"):
# validating or quoting them would take minutes and gigabytes, so such a document is refused
MAX_YAML_VALUES = 10_000


class _TooManyValues(Exception):
    """A YAML document whose aliases expand past MAX_YAML_VALUES values (or into themselves)."""


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Raise _TooManyValues when the node graph, with every alias expanded, holds more than
    MAX_YAML_VALUES nodes. Each distinct node is visited once (sizes are memoized), so a bomb
    is measured in time linear in the file."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _yaml_children(node))
            if sizes[key] > MAX_YAML_VALUES:
                raise _TooManyValues
        elif key not in sizes:
            if key in on_path:  # an alias inside its own anchor: endless
                raise _TooManyValues
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _yaml_children(node) if id(child) not in sizes)


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice (YAML would keep the last silently), reads
    1e6 as a number (YAML 1.1 wants 1.0e6) and refuses aliases that expand too far."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                given_twice = key in seen
            except TypeError:  # a list or mapping as a key: SafeLoader reports it below
                continue
            if given_twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {quote(key)} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    """One YAML document through _RecipeLoader, a SafeLoader: plain values only, never objects."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(path) :], path))
        raise LmpError(f"recipes extend each other in a cycle ({cycle}); one must stop extending")
    if path.is_dir() and (path / RECIPE_FILE).is_file():
        raise LmpError(
            f"{path} is a run folder, not a recipe; to resume it: lmp train {path / RECIPE_FILE} --out {path}"
        )
    if path.is_dir():
        raise LmpError(f"{path} is a folder; give a recipe file, e.g. {path / 'recipe.yaml'}")
    if not path.is_file():
        raise LmpError(f"recipe file {path} does not exist")
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:  # a binary file, or text in another encoding
        raise LmpError(
            f"recipe {path} is not UTF-8 text (byte {exc.start} cannot be decoded); "
            "give a YAML recipe file, or save this one as UTF-8"
        ) from None
    except OSError as exc:
        raise LmpError(f"recipe {path} cannot be read ({exc.strerror or exc}); check the file") from None
    except _TooManyValues:
        raise LmpError(
            f"recipe {path}: YAML aliases expand to more than {MAX_YAML_VALUES:,} values; "
            "write the values out"
        ) from None
    except yaml.YAMLError as exc:
        raise LmpError(f"recipe {_yaml_problem(exc, path)}") from None
    if not isinstance(raw, dict):
        raise LmpError(f"recipe {path} must be a mapping of fields, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise LmpError(f"{path}: extends must be a path to another recipe, got {quote(parent)}")
    if not (path.parent / parent).is_file():
        raise LmpError(f"{path}: extends {parent!r}, but {path.parent / parent} does not exist")
    base = _read_yaml(path.parent / parent, chain + (path,))
    return _deep_merge(base, raw)


def _yaml_problem(exc: yaml.YAMLError, path: Path) -> str:
    """'FILE:LINE:COLUMN is not valid YAML: problem' from a parser error (PyYAML's own text spans
    several lines and names no file)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return f"{where} is not valid YAML: {problem}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=100` -> (["train", "max_steps"], 100); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise LmpError(f"--set {text!r}: expected key.path=value, e.g. --set train.max_steps=100")
    try:
        parsed = _load_yaml(value) if value.strip() else None
    except _TooManyValues:
        raise LmpError(
            f"--set {key.strip()}: YAML aliases expand to more than {MAX_YAML_VALUES:,} values; "
            "write the values out"
        ) from None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = dict(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[keys[-1]] = value
    return out
